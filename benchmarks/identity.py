"""What content-addressed identity costs: hashing N blocks of a model vs loading them (prints JSON).

    PYTHONPATH=. .venv/bin/python -m benchmarks.identity [--model DIR] [--blocks 10]

Works on a private copy of the model directory, so evicting its pages from the OS cache (posix_fadvise
DONTNEED, "cold") touches no file anyone else reads. Cases: load cold / warm; hash with no digest cache, cold
(a client's first start) and warm (a server right after loading the same blocks); hash with the digest cache (a
restart: reads the small JSON only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from petalnode.compute import load_block_span, load_model_info, resolve_model
from petalnode.compute._digest_cache import CACHE_FILE_NAME


def _evict(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())  # written just now: dirty pages are not evicted
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()
    source = resolve_model(args.model).path
    with tempfile.TemporaryDirectory(prefix="petalnode-identity-") as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(CACHE_FILE_NAME))
        n = args.blocks

        def hash_fresh() -> tuple[float, int]:
            (copy / CACHE_FILE_NAME).unlink(missing_ok=True)
            info = load_model_info(copy)
            seconds, _ = _timed(lambda: info.span_digest(0, n))
            return seconds, info.reader.bytes_hashed

        load_block_span(load_model_info(source), 0, 1)  # imports and first-use setup, not measured
        _evict(copy)
        load_cold_s, _ = _timed(lambda: load_block_span(load_model_info(copy), 0, n))
        load_warm_s, _ = _timed(lambda: load_block_span(load_model_info(copy), 0, n))
        _evict(copy)
        hash_cold_s, hashed = hash_fresh()
        hash_warm_s, _ = hash_fresh()
        info = load_model_info(copy)
        hash_cached_s, _ = _timed(lambda: info.span_digest(0, n))
        assert info.reader.bytes_hashed == 0
        print(json.dumps({
            "model": source.name, "blocks": n, "bytes_hashed": hashed,
            "load_cold_s": round(load_cold_s, 3), "load_warm_s": round(load_warm_s, 3),
            "hash_no_cache_cold_s": round(hash_cold_s, 3), "hash_no_cache_warm_s": round(hash_warm_s, 3),
            "hash_cached_s": round(hash_cached_s, 4),
            "hash_MiB_per_s_warm": round(hashed / hash_warm_s / 2**20, 1),
        }, indent=2))


if __name__ == "__main__":
    main()

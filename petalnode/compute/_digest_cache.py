# Block digests cached next to the weights, so a restart (or a client starting again) hashes nothing.
#
# Invariants:
# - The cache is one small JSON file: {"version", "fingerprint", "blocks": {index: hex}}. The fingerprint is
#   (size, mtime_ns, inode) of config.json, the safetensors index (if any) and every weights file; a cache whose
#   fingerprint differs from the files' current one is ignored whole (a changed file, a copy, a new download).
# - It lives in the model directory (CACHE_FILE_NAME) when that is writable, else under the petalnode cache dir
#   (compute/_model_source.py `cache_dir`, e.g. for a model inside site-packages), named by the directory's path.
# - Writes are atomic (temporary file + rename); a lost race between two processes only costs a re-hash. A cache
#   that cannot be read, parsed or written is ignored with a debug log: it is an optimisation, never the truth
#   about a file we did not fingerprint.
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from petalnode.compute._digest import DIGEST_BYTES
from petalnode.compute._model_source import cache_dir

log = logging.getLogger(__name__)

CACHE_FILE_NAME = ".petalnode-digests.json"
_CACHE_VERSION = 1
# A cache file is a few KiB (64 hex chars per block); anything much larger is not ours.
_MAX_CACHE_BYTES = 4 * 1024**2

Fingerprint = dict[str, list[int]]


def fingerprint(directory: Path, files: Iterable[Path]) -> Fingerprint:
    """(size, mtime_ns, inode) of each file, keyed by its path relative to `directory`."""
    out: Fingerprint = {}
    for path in sorted(set(files)):
        st = path.stat()
        out[os.path.relpath(path, directory)] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def cache_path(directory: Path, *, writable: bool | None = None) -> Path:
    """Next to the weights if we may write there, else in the user's cache dir (keyed by the directory).

    `writable` defaults to whether this process may write into `directory`.
    """
    if writable is None:
        writable = os.access(directory, os.W_OK)
    if writable:
        return directory / CACHE_FILE_NAME
    name = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "digests" / f"{name}.json"


def load_cached(path: Path, current: Fingerprint) -> dict[int, bytes]:
    """The cached block digests if `path` holds a valid cache made for exactly these files, else {}."""
    try:
        if path.stat().st_size > _MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or data.get("fingerprint") != current:
        return {}
    blocks = data.get("blocks")
    if not isinstance(blocks, dict):
        return {}
    out: dict[int, bytes] = {}
    for key, value in blocks.items():
        try:
            index, digest = int(key), bytes.fromhex(value)
        except (TypeError, ValueError):
            return {}
        if index < 0 or len(digest) != DIGEST_BYTES:
            return {}
        out[index] = digest
    return out


def store_cached(path: Path, current: Fingerprint, digests: Mapping[int, bytes]) -> None:
    """Merge `digests` into the cache at `path` (or its fallback location if `path` cannot be written)."""
    merged = {**load_cached(path, current), **digests}
    body = json.dumps({"version": _CACHE_VERSION, "fingerprint": current,
                       "blocks": {str(i): d.hex() for i, d in sorted(merged.items())}}, separators=(",", ":"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(body)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        log.debug("could not write the digest cache %s: %s", path, e)

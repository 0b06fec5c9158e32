"""Size, speed and error of every tensor codec on one activation tensor; prints JSON when run directly.

    python benchmarks/codec_speed.py [--seq-len 128] [--hidden 576] [--repeats 20] [--threads 1]

Sizes are of the complete wire form (the msgpack tensor map, headers included) because that is what a hop
sends. Throughput is in MB/s (10**6 bytes) of fp32-equivalent input, i.e. numel * 4 bytes however the tensor is
stored, so codecs compare on the same footing; encode is tensor -> bytes (encode_tensor + packb), decode is
bytes -> tensor (unpackb + decode_tensor, with all validation). Times are medians over `repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from petalnode.codecs import TensorCodec, decode_tensor, encode_tensor, packb, unpackb
from petalnode.errors import CodecError


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls allocate and load kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _errors(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    diff = (x64 - y64).abs()
    finite = torch.isfinite(x64)
    if not bool(finite.all()):  # raw codecs keep NaN/inf; measure the error where it is defined
        diff = diff[finite]
        x64 = x64[finite]
    if diff.numel() == 0:
        return {"max_abs_error": 0.0, "mean_abs_error": 0.0, "rel_l2_error": 0.0, "max_rel_error_vs_absmax": 0.0}
    norm = float(x64.norm())
    absmax = float(x64.abs().max())
    return {
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
        # ||x - x'|| / ||x||: how much of the signal the codec loses overall.
        "rel_l2_error": float(diff.norm()) / norm if norm else 0.0,
        # worst error as a fraction of the tensor's largest magnitude.
        "max_rel_error_vs_absmax": float(diff.max()) / absmax if absmax else 0.0,
    }


def measure_codecs(tensor: torch.Tensor, repeats: int = 20) -> dict[str, Any]:
    """Measure every codec, with and without zstd, on `tensor` (hidden size = its last dimension).

    Args:
        tensor: an activation, e.g. hidden states of shape (batch, seq, hidden); any float dtype.
        repeats: timed runs per measurement (the median is reported).

    Returns:
        {"shape", "dtype", "numel", "hidden_size", "vectors", "repeats", "torch_threads", "codecs": {name: row}},
        where name is "raw", "raw+zstd", "fp16", ..., and each row has: codec, zstd, wire_bytes,
        bytes_per_vector, relative_to_fp32, encode_ms, decode_ms, encode_mb_s, decode_mb_s, max_abs_error,
        mean_abs_error, rel_l2_error, max_rel_error_vs_absmax; or codec, zstd and "error" if the codec refuses
        the tensor (fp16 overflow, int8 with NaN/inf).
    """
    if tensor.dim() == 0:
        raise ValueError("need at least one dimension (the hidden size)")
    x = tensor.detach().cpu().contiguous()
    numel = x.numel()
    hidden = x.shape[-1]
    vectors = numel // hidden if hidden else 0
    fp32_bytes = numel * 4
    rows: dict[str, dict[str, Any]] = {}
    for codec in TensorCodec:
        for zstd in (False, True):
            name = codec.value + ("+zstd" if zstd else "")
            row: dict[str, Any] = {"codec": codec.value, "zstd": zstd}
            rows[name] = row
            try:
                data = packb(encode_tensor(x, codec, zstd=zstd))
            except CodecError as e:
                row["error"] = str(e)
                continue
            decoded = decode_tensor(unpackb(data))
            encode_s = _median_seconds(lambda c=codec, z=zstd: packb(encode_tensor(x, c, zstd=z)), repeats)
            decode_s = _median_seconds(lambda d=data: decode_tensor(unpackb(d)), repeats)
            row.update(
                wire_bytes=len(data),
                bytes_per_vector=len(data) / vectors if vectors else None,
                relative_to_fp32=len(data) / fp32_bytes if fp32_bytes else None,
                encode_ms=encode_s * 1e3,
                decode_ms=decode_s * 1e3,
                encode_mb_s=fp32_bytes / 1e6 / encode_s,
                decode_mb_s=fp32_bytes / 1e6 / decode_s,
                **_errors(x, decoded),
            )
    return {
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "numel": numel,
        "hidden_size": hidden,
        "vectors": vectors,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "codecs": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores are shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    tensor = torch.randn(args.batch, args.seq_len, args.hidden, generator=generator)
    result = measure_codecs(tensor, repeats=args.repeats)
    result["input"] = f"torch.randn seed {args.seed}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

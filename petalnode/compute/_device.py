"""Device, dtype and thread choices for a compute process.

CUDA when available (bf16 where the GPU supports it, else fp16); CPU otherwise. On the CPU the dtype is chosen
by measurement: bf16 only if a block-sized matmul is clearly faster than fp32 (true on CPUs with AMX/AVX512-BF16,
false on most others), cached per CPU model so the measurement runs once. `PETALNODE_DTYPE` (fp32, fp16, bf16 or
auto) replaces that choice for every process that inherits it, which is how the exactness tests pin fp32 on
machines where the measurement would pick bf16; an explicit `--dtype` still wins.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from petalnode.errors import ConfigError

# bf16 must beat fp32 by this factor to be chosen: it costs precision, so a tie goes to fp32.
_BF16_MIN_SPEEDUP = 1.3


def choose_device(requested: str | None = None) -> torch.device:
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise ConfigError(f"not a torch device: {requested!r}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} requested but CUDA is not available on this machine")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name.lower() not in table:
        raise ConfigError(f"unsupported dtype {name!r}; choose one of fp32, fp16, bf16")
    return table[name.lower()]


def choose_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    requested = requested or os.environ.get("PETALNODE_DTYPE") or None
    if requested and requested != "auto":
        return parse_dtype(requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _measured_cpu_dtype()


def _measured_cpu_dtype() -> torch.dtype:
    from petalnode.compute._model_source import cache_dir

    cpu = platform.processor() or platform.machine()
    cache_file = cache_dir() / "cpu-dtype.json"
    key = f"{cpu}|torch-{torch.__version__}|threads-{torch.get_num_threads()}"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return parse_dtype(cached["dtype"])
    except (OSError, ValueError, KeyError, ConfigError):
        pass
    speedup = measure_bf16_speedup()
    dtype = torch.bfloat16 if speedup >= _BF16_MIN_SPEEDUP else torch.float32
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "dtype": str(dtype).removeprefix("torch."),
                                          "bf16_speedup": speedup}))
    except OSError:
        pass
    return dtype


def measure_bf16_speedup(size: int = 1024, repeats: int = 5) -> float:
    """fp32 time / bf16 time for a [size x size] matmul with 16 rows (a decode step's shape)."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(16, size, dtype=dtype)
        b = torch.randn(size, size * 3, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(10):
                a @ b
            best = min(best, time.perf_counter() - started)
        timings[dtype] = best
    return timings[torch.float32] / timings[torch.bfloat16]


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads explicitly (several processes sharing few cores must not oversubscribe)."""
    if num_threads is None:
        env = os.environ.get("PETALNODE_NUM_THREADS")
        num_threads = int(env) if env else max(1, os.cpu_count() or 1)
    if num_threads < 1:
        raise ConfigError(f"thread count must be at least 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    return num_threads

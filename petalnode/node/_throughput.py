"""Measure how fast this machine runs one block, once per (model, device, dtype, threads), and cache it.

Throughput is announced as decode steps per second through ONE block, so a route through k blocks of a server
takes about k / throughput seconds per token; clients and the placement policy compare servers with it.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from petalnode.compute import cache_dir

log = logging.getLogger(__name__)

_WARMUP_STEPS = 2
_TIMED_STEPS = 8
_PREFIX_TOKENS = 32


def measure_block_throughput(span: torch.nn.Module, hidden_size: int, dtype: torch.dtype) -> float:
    """Decode steps per second through one block, measured on `span` with a short cached prefix."""
    device = next(span.parameters()).device
    cache = span.new_cache()
    num_blocks = span.end - span.start
    with torch.inference_mode():
        span.forward_span(
            torch.randn(1, _PREFIX_TOKENS, hidden_size, dtype=dtype, device=device), cache,
            torch.arange(_PREFIX_TOKENS, device=device)[None],
        )
        position = _PREFIX_TOKENS
        timings = []
        for step in range(_WARMUP_STEPS + _TIMED_STEPS):
            hidden = torch.randn(1, 1, hidden_size, dtype=dtype, device=device)
            started = time.perf_counter()
            span.forward_span(hidden, cache, torch.tensor([[position]], device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= _WARMUP_STEPS:
                timings.append(time.perf_counter() - started)
            position += 1
    median = sorted(timings)[len(timings) // 2]
    return num_blocks / max(median, 1e-9)


def cached_block_throughput(
    key: str, span: torch.nn.Module, hidden_size: int, dtype: torch.dtype
) -> float:
    """`measure_block_throughput`, remembered in the cache dir under `key` (model, device, dtype, threads)."""
    path = cache_dir() / "throughput.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    value = table.get(key)
    if isinstance(value, int | float) and value > 0:
        return float(value)
    value = measure_block_throughput(span, hidden_size, dtype)
    table[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache throughput in %s: %s", path, e)
    return value

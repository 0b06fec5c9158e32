"""Where a server's compute comes from: real torch blocks, or (in the churn simulator) a cheap stand-in.

The node asks its backend for the model's description, for a span of blocks, and for the span's throughput; it
never imports torch model code itself. The simulator swaps in a deterministic stand-in with the same interface
and runs it inline on the event loop (so virtual time stays exact); everything else in the node is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch

from petalnode.node._executor import ComputeExecutor

T = TypeVar("T")


class ComputeBackend(Protocol):
    def model_info(self, model: str | None) -> Any:
        """A `petalnode.compute.ModelInfo` (or an object with the same attributes and methods)."""
        ...

    def load_span(
        self, info: Any, start: int, end: int, *, dtype: torch.dtype, device: torch.device,
        progress: Callable[[int], None] | None,
    ) -> torch.nn.Module: ...

    def throughput(self, info: Any, span: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> float: ...

    def executor(self) -> Any:
        """An object with `async run(fn, *, priority)` and `close()`."""
        ...

    def choose(self, device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]: ...

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run blocking setup work (loading) without stalling the loop."""
        ...


class TorchBackend:
    """Real blocks from safetensors, computed on a dedicated thread."""

    def model_info(self, model: str | None) -> Any:
        from petalnode.compute import load_model_info

        return load_model_info(model)

    def load_span(
        self, info: Any, start: int, end: int, *, dtype: torch.dtype, device: torch.device,
        progress: Callable[[int], None] | None,
    ) -> torch.nn.Module:
        from petalnode.compute import load_block_span

        return load_block_span(info, start, end, dtype=dtype, device=device, progress=progress)

    def throughput(self, info: Any, span: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> float:
        from petalnode.node._throughput import cached_block_throughput

        key = f"{info.source.name}|{device}|{dtype}|threads={torch.get_num_threads()}"
        return cached_block_throughput(key, span, info.hidden_size, dtype)

    def executor(self) -> ComputeExecutor:
        return ComputeExecutor()

    def choose(self, device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
        from petalnode.compute import choose_device, choose_dtype

        chosen = choose_device(device)
        return chosen, choose_dtype(chosen, dtype)

    async def offload(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)


class InlineExecutor:
    """Runs compute directly on the event loop: for stand-in compute that costs microseconds (simulator)."""

    async def run(self, fn: Callable[[], T], *, priority: int = 0) -> T:
        return fn()

    def close(self) -> None:
        pass

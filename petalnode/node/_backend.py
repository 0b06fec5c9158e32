"""Where a server's compute comes from: real torch blocks, or (in the churn simulator) a cheap stand-in.

The node asks its backend for the model's description, for a span of blocks, and for the span's throughput; it
never imports torch model code itself. The simulator swaps in a deterministic stand-in with the same interface
and runs it inline on the event loop (so virtual time stays exact); everything else in the node is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from petalnode.errors import ConfigError
from petalnode.node._executor import ComputeExecutor

if TYPE_CHECKING:
    import torch

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
        """An object with `async run(fn, *, priority, peer)` and `close()` (`peer`: whose job, for fair turns)."""
        ...

    def choose(self, device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]: ...

    async def offload(self, fn: Callable[[], T]) -> T:
        """Run blocking setup work (loading) without stalling the loop."""
        ...



@runtime_checkable
class LoraCapableBackend(Protocol):
    """A backend that can also attach LoRA adapters (`TorchBackend`; the simulator's stand-in cannot)."""

    def load_adapters(
        self, info: Any, span: torch.nn.Module, specs: Sequence[str], start: int, end: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> frozenset[str]: ...


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
        import torch

        from petalnode.node._throughput import cached_block_throughput

        key = f"{info.source.name}|{device}|{dtype}|threads={torch.get_num_threads()}"
        return cached_block_throughput(key, span, info.hidden_size, dtype)

    def load_adapters(
        self, info: Any, span: torch.nn.Module, specs: Sequence[str], start: int, end: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> frozenset[str]:
        """Load the LoRA adapters `specs` (`PATH_OR_HUB_ID` or `NAME=PATH_OR_HUB_ID`) for blocks [start, end) of
        `span` and attach them; returns the names clients select them by. Raises `ConfigError` if one cannot."""
        from petalnode.compute import attach_adapters, load_lora_adapter, span_adapters

        adapters = []
        for spec in specs:
            name, path = split_adapter_spec(spec)
            adapters.append(load_lora_adapter(path, info, start, end, dtype=dtype, device=device, name=name))
        attach_adapters(span, adapters)
        return span_adapters(span)

    def executor(self) -> ComputeExecutor:
        return ComputeExecutor()

    def choose(self, device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
        from petalnode.compute import choose_device, choose_dtype

        chosen = choose_device(device)
        return chosen, choose_dtype(chosen, dtype)

    async def offload(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)


def split_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH_OR_HUB_ID` -> (NAME, PATH_OR_HUB_ID); `PATH_OR_HUB_ID` -> (None, it): the name defaults later.

    An existing path containing "=" is taken whole, so such directories still work without a name.
    """
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).expanduser().exists():
        return None, spec
    if not name or not path:
        raise ConfigError(f"adapter {spec!r} must be PATH_OR_HUB_ID or NAME=PATH_OR_HUB_ID")
    return name, path


class InlineExecutor:
    """Runs compute directly on the event loop: for stand-in compute that costs microseconds (simulator)."""

    async def run(self, fn: Callable[[], T], *, priority: int = 0, peer: object = None) -> T:
        return fn()

    def close(self) -> None:
        pass

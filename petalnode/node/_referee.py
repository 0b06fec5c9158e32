"""The client's own copy of the model as the last opinion in a dispute between servers.

When a verifying client sees two servers disagree on some blocks and no third server hosts them, it cannot tell
who lied from the servers alone. A client that has the model's weights on disk (the library loads the config,
tokenizer and head from a local copy) can run those blocks itself, once, on the inputs it kept: that decides.
Only the disputed blocks' weights are read, and the last range used stays loaded (disputes come in bursts).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import torch


class Referee(Protocol):
    """Runs blocks [start, end) on whole sequences, stateless; `dtype` is what it computes in."""

    dtype: torch.dtype

    async def run(self, start: int, end: int, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        ...

    async def run_backward(
        self, start: int, end: int, hidden: torch.Tensor, grad_output: torch.Tensor, prompts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients for the input and the deep prompts of blocks [start, end), as a server's backward."""
        ...


class LocalReferee:
    """Blocks computed in this process from the client's copy of the checkpoint (a `ModelInfo`)."""

    def __init__(self, info: Any, *, dtype: torch.dtype = torch.float32) -> None:
        self.info = info
        self.dtype = dtype
        self._loaded: tuple[tuple[int, int], torch.nn.Module] | None = None
        self.runs = 0

    async def run(self, start: int, end: int, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        return await asyncio.to_thread(self._run, start, end, hidden, prompts)

    async def run_backward(
        self, start: int, end: int, hidden: torch.Tensor, grad_output: torch.Tensor, prompts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return await asyncio.to_thread(self._run_backward, start, end, hidden, grad_output, prompts)

    def _span(self, start: int, end: int) -> torch.nn.Module:
        from petalnode.compute import load_block_span

        if self._loaded is None or self._loaded[0] != (start, end):
            self._loaded = None  # free the previous range before reading the next
            self._loaded = ((start, end), load_block_span(self.info, start, end, dtype=self.dtype))
        self.runs += 1
        return self._loaded[1]

    def _run(self, start: int, end: int, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        from petalnode.compute import span_forward

        span = self._span(start, end)
        span_prompts = None if prompts is None else prompts[start:end].to(self.dtype)
        return span_forward(span, hidden.to(self.dtype), span_prompts).float()

    def _run_backward(
        self, start: int, end: int, hidden: torch.Tensor, grad_output: torch.Tensor, prompts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from petalnode.compute import span_backward

        span = self._span(start, end)
        span_prompts = None if prompts is None else prompts[start:end].to(self.dtype)
        grad_hidden, grad_prompts = span_backward(span, hidden.to(self.dtype), grad_output.to(self.dtype),
                                                  span_prompts)
        return grad_hidden.float(), None if grad_prompts is None else grad_prompts.float()

"""The client's own copy of the model as the last opinion in a dispute between servers.

When a verifying client sees two servers disagree on some blocks and no third server hosts them, it cannot tell
who lied from the servers alone. A client that has the model's weights on disk (the library loads the config,
tokenizer and head from a local copy) can run those blocks itself, once, on the inputs it kept: that decides.
Only the disputed blocks' weights are read, and the last range used stays loaded (disputes come in bursts).
With verify="full" and a range no second server hosts, the referee is also the shadow itself (`open_session`: a
KV-cache session over its copy), so the guarantee holds at the price of the client computing those blocks too.
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

    async def open_session(self, start: int, end: int, max_length: int, batch_size: int,
                           prompts: torch.Tensor | None) -> RefereeSession:
        """A stateful session over blocks [start, end), stepped like a server's."""
        ...


class RefereeSession:
    """A shadow the client computes itself: a KV-cache session over its own copy of some blocks."""

    def __init__(self, span: torch.nn.Module, *, max_length: int, batch_size: int, hidden_size: int,
                 dtype: torch.dtype, prompts: torch.Tensor | None, inline: bool = False) -> None:
        # inline: compute on the event loop (the simulator's stand-in blocks cost microseconds; a thread would let
        # its virtual clock run ahead while waiting); real blocks run in a thread.
        from petalnode.compute import InferenceSession

        self.dtype = dtype
        self._inline = inline
        self._session = InferenceSession(
            session_id="referee", span=span, max_length=max_length, batch_size=batch_size, reserved_bytes=0,
            hidden_size=hidden_size, dtype=dtype, last_used=0.0, prompts=None if prompts is None else prompts.to(dtype))

    async def step(self, hidden: torch.Tensor, start_position: int) -> torch.Tensor:
        if self._inline:
            return self._session.step(hidden.to(self.dtype), start_position=start_position).float()
        out = await asyncio.to_thread(self._session.step, hidden.to(self.dtype), start_position=start_position)
        return out.float()

    async def aclose(self) -> None:
        self._session._close()


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

    async def open_session(self, start: int, end: int, max_length: int, batch_size: int,
                           prompts: torch.Tensor | None) -> RefereeSession:
        span = await asyncio.to_thread(self._span, start, end)
        return RefereeSession(span, max_length=max_length, batch_size=batch_size, hidden_size=self.info.hidden_size,
                              dtype=self.dtype, prompts=None if prompts is None else prompts[start:end])

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

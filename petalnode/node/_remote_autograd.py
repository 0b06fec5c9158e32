"""Autograd through the swarm: `loss.backward()` on the client runs the backward pass on the servers.

The forward pass goes through the swarm with a trace of every hop's input; the backward pass sends the output
gradient back hop by hop (servers recompute, keeping no state, so a dead server's part goes to another). Large
batches are split into chunks that fit a request and run concurrently, so the chunks pipeline through the chain.
Frozen block weights never leave the servers; only hidden states, prompts and their gradients travel.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from petalnode.errors import BadRequestError
from petalnode.node._swarm_client import MAX_PASS_TOKENS, PassHop

if TYPE_CHECKING:
    from petalnode.node._remote_chain import RemoteBlockChain


def batch_chunks(batch: int, seq: int, max_tokens: int | None = None) -> list[slice]:
    """Row slices of a [batch, seq] pass such that each holds at most `max_tokens` positions."""
    max_tokens = MAX_PASS_TOKENS if max_tokens is None else max_tokens
    if seq > max_tokens:
        raise BadRequestError(f"a sequence of {seq} positions exceeds the {max_tokens} a request may carry")
    rows = max(1, max_tokens // seq)
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _prompt_chunk(prompts: torch.Tensor | None, rows: slice, batch: int) -> torch.Tensor | None:
    if prompts is None or prompts.shape[1] == 1 or batch == 1:
        return prompts
    return prompts[:, rows]


class RemoteChainFunction(torch.autograd.Function):
    """y = blocks(hidden, prompts) computed by the swarm; differentiable in `hidden` and `prompts`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None, chain: RemoteBlockChain, adapter: str | None,
    ) -> torch.Tensor:
        client = chain.client
        batch = hidden.shape[0]
        chunks = batch_chunks(batch, hidden.shape[1])
        traces: list[list[PassHop]] = [[] for _ in chunks]
        hidden = hidden.detach()
        prompts = None if prompts is None else prompts.detach()

        async def run() -> list[torch.Tensor]:
            return list(await asyncio.gather(*(
                client.forward(hidden[rows], prompts=_prompt_chunk(prompts, rows, batch), adapter=adapter,
                               trace=trace)
                for rows, trace in zip(chunks, traces, strict=True)
            )))

        outputs = chain.run(run())
        ctx.chain, ctx.adapter, ctx.chunks, ctx.traces, ctx.batch = chain, adapter, chunks, traces, batch
        ctx.prompts = prompts
        return torch.cat(outputs, dim=0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        client, prompts, batch = ctx.chain.client, ctx.prompts, ctx.batch
        grad_output = grad_output.contiguous()

        async def run() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
            return list(await asyncio.gather(*(
                client.backward(trace, grad_output[rows], prompts=_prompt_chunk(prompts, rows, batch),
                                adapter=ctx.adapter)
                for rows, trace in zip(ctx.chunks, ctx.traces, strict=True)
            )))

        results = ctx.chain.run(run())
        grad_hidden = torch.cat([g for g, _ in results], dim=0)
        grad_prompts = None
        if prompts is not None:
            parts = [gp for _, gp in results]
            if prompts.shape[1] == batch and batch > 1:
                grad_prompts = torch.cat(parts, dim=1)  # type: ignore[arg-type]
            else:  # one prompt shared by the batch: its gradient sums over every chunk
                grad_prompts = torch.stack(parts).sum(dim=0)  # type: ignore[arg-type]
        return grad_hidden, grad_prompts, None, None

"""Serving a loaded span of blocks over RPC: inference streams, stateless forward/backward passes, and info.

Invariants:
- Every request is checked before any compute: model name, block range inside the hosted span, tensor shape
  and size. Bad requests get `BadRequestError`; a full cache gets `OutOfCacheMemoryError`; a full compute
  queue gets `BusyError`. None of them costs the server anything but the reply.
- With fair shares on (a `FairShareLedger`), every call is first counted against its peer's request rate, a
  session open against the peer's session count and cache share (node/_fair_share.py), and compute jobs are
  queued per peer, peers taking turns (node/_fair_queue.py). A peer over its share gets `BusyError`.
- A session lives exactly as long as its stream: when the client closes it, vanishes, or the stream fails,
  the session's cache is freed. Sessions idle past the idle timeout are closed by the owner's upkeep task.
- Compute runs on the `ComputeExecutor` thread; this module only awaits it. Inference steps run at a higher
  priority than forward/backward passes, so bulk training traffic never stalls interactive users.
- Training keeps no per-client state: backward recomputes the span from the inputs sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from petalnode import __version__
from petalnode._timeouts import DEFAULT_TIMEOUTS
from petalnode.codecs import TensorCodec
from petalnode.compute import SessionManager, span_backward, span_forward
from petalnode.errors import BadRequestError, BusyError, ComputeError, InvalidStateError
from petalnode.node._executor import PRIORITY_BULK, PRIORITY_INFERENCE, ComputeExecutor
from petalnode.node._fair_share import FairShareLedger
from petalnode.node._protocol import (
    BackwardRequest,
    BackwardResult,
    ForwardRequest,
    ForwardResult,
    InferenceOpened,
    InferenceResult,
    InferenceStep,
    InfoRequest,
    OpenInference,
    ServerInfo,
)
from petalnode.rpc import RPC, CallContext, RPCStream

log = logging.getLogger(__name__)
T = TypeVar("T")

# Largest number of positions one forward pass may carry (batch x sequence), to bound a request's memory.
MAX_FORWARD_TOKENS = 8192
FIRST_MESSAGE_TIMEOUT_S = DEFAULT_TIMEOUTS.first_message  # Node passes Timeouts.first_message


@dataclass
class HostedSpan:
    model: str
    start: int
    end: int
    span: torch.nn.Module
    hidden_size: int
    dtype: torch.dtype
    throughput: float
    # Names of the LoRA adapters attached to `span` (a request may select one of them).
    adapters: frozenset[str] = frozenset()


class BlockServer:
    """RPC handlers for one hosted span."""

    def __init__(
        self,
        hosted: HostedSpan,
        sessions: SessionManager,
        executor: ComputeExecutor,
        *,
        first_message_timeout_s: float | None = FIRST_MESSAGE_TIMEOUT_S,
        fair_share: FairShareLedger | None = None,
    ) -> None:
        """`fair_share`: per-peer limits and compute turns (None: first come, first served)."""
        self.hosted = hosted
        self.fair_share = fair_share
        self.first_message_timeout_s = first_message_timeout_s
        self.sessions = sessions
        self.executor = executor
        self.steps_served = 0
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def register(self, rpc: RPC) -> None:
        rpc.add_stream_handler("inference", self.rpc_inference, request_type=(OpenInference, InferenceStep))
        rpc.add_unary_handler("forward", self.rpc_forward, request_type=ForwardRequest)
        rpc.add_unary_handler("backward", self.rpc_backward, request_type=BackwardRequest)
        rpc.add_unary_handler("info", self.rpc_info, request_type=InfoRequest)

    def _check_range(self, model: str, start: int, end: int) -> torch.nn.Module:
        hosted = self.hosted
        if model != hosted.model:
            raise BadRequestError(f"this server hosts model {hosted.model!r}, not {model!r}")
        if not hosted.start <= start < end <= hosted.end:
            raise BadRequestError(f"blocks {start}:{end} are not inside the hosted {hosted.start}:{hosted.end}")
        return hosted.span.subspan(start, end)

    def _check_hidden(self, hidden: torch.Tensor, batch_size: int | None = None) -> None:
        if hidden.ndim != 3 or hidden.shape[-1] != self.hosted.hidden_size or not hidden.is_floating_point():
            raise BadRequestError(
                f"hidden states must be float [batch, seq, {self.hosted.hidden_size}], got "
                f"{tuple(hidden.shape)} {hidden.dtype}"
            )
        if hidden.shape[0] * hidden.shape[1] > MAX_FORWARD_TOKENS:
            raise BadRequestError(f"at most {MAX_FORWARD_TOKENS} positions per request, got {hidden.shape[:2]}")
        if batch_size is not None and hidden.shape[0] > batch_size:
            raise BadRequestError(f"batch {hidden.shape[0]} exceeds the session's batch size {batch_size}")

    def _check_prompts(
        self, prompts: torch.Tensor | None, start: int, end: int, batch: int, max_prefix: int
    ) -> torch.Tensor | None:
        """Deep prompts must be float [end - start, 1 or batch, prefix <= max_prefix, hidden]."""
        if prompts is None:
            return None
        blocks, prompt_batch, prefix, hidden = prompts.shape
        if (
            not prompts.is_floating_point() or blocks != end - start or prompt_batch not in (1, batch)
            or not 1 <= prefix <= max_prefix or hidden != self.hosted.hidden_size
        ):
            raise BadRequestError(
                f"deep prompts must be float [{end - start}, 1 or {batch}, 1..{max_prefix}, {self.hosted.hidden_size}]"
                f", got {tuple(prompts.shape)} {prompts.dtype}"
            )
        if not torch.isfinite(prompts).all():
            raise BadRequestError("deep prompts contain non-finite values")
        return prompts.to(self.hosted.dtype)

    def _adapter(self, name: str | None) -> Callable[[], contextlib.AbstractContextManager[None]]:
        """A factory of contexts applying LoRA adapter `name` on the compute thread (no-ops for None)."""
        if name is None:
            return contextlib.nullcontext
        if name not in self.hosted.adapters:
            hosted = ", ".join(sorted(self.hosted.adapters)) or "none"
            raise BadRequestError(f"unknown adapter {name!r}; this server has: {hosted}")
        from petalnode.compute import active_adapter

        return functools.partial(active_adapter, name)

    def _admit_call(self, context: CallContext) -> object:
        """Count the call against its peer's rate; returns the key its compute jobs queue under."""
        if self.fair_share is None:
            return None
        self.fair_share.check_request(context.remote_peer_id)
        return context.remote_peer_id

    async def rpc_info(self, request: InfoRequest, context: CallContext) -> ServerInfo:
        self._admit_call(context)
        hosted = self.hosted
        return ServerInfo(
            model=hosted.model, start_block=hosted.start, end_block=hosted.end, throughput=hosted.throughput,
            cache_tokens_left=self.sessions.free_tokens, sessions=len(self.sessions), version=__version__,
            dtype=str(hosted.dtype).removeprefix("torch."),
        )

    async def rpc_forward(self, request: ForwardRequest, context: CallContext) -> ForwardResult:
        peer = self._admit_call(context)
        span = self._check_range(request.model, request.start_block, request.end_block)
        hidden = request.hidden
        self._check_hidden(hidden)
        prompts = self._check_prompts(request.prompts, request.start_block, request.end_block, hidden.shape[0],
                                      hidden.shape[1])
        adapter = self._adapter(request.adapter)

        def run() -> torch.Tensor:
            with adapter():
                return span_forward(span, hidden.to(self.hosted.dtype), prompts)

        return ForwardResult(hidden=await self._run_bulk(run, peer))

    async def rpc_backward(self, request: BackwardRequest, context: CallContext) -> BackwardResult:
        peer = self._admit_call(context)
        span = self._check_range(request.model, request.start_block, request.end_block)
        hidden, grad_output = request.hidden, request.grad_output
        self._check_hidden(hidden)
        if grad_output.shape != hidden.shape or not grad_output.is_floating_point():
            raise BadRequestError(
                f"grad_output must be a float tensor shaped like the hidden states {tuple(hidden.shape)}, got "
                f"{tuple(grad_output.shape)} {grad_output.dtype}"
            )
        if not torch.isfinite(grad_output).all():
            raise BadRequestError("grad_output contains non-finite values")
        prompts = self._check_prompts(request.prompts, request.start_block, request.end_block, hidden.shape[0],
                                      hidden.shape[1])
        adapter = self._adapter(request.adapter)

        def run() -> tuple[torch.Tensor, torch.Tensor | None]:
            with adapter():
                return span_backward(span, hidden.to(self.hosted.dtype), grad_output, prompts)

        grad_hidden, grad_prompts = await self._run_bulk(run, peer)
        return BackwardResult(grad_hidden=grad_hidden, grad_prompts=grad_prompts)

    async def _run_bulk(self, fn: Callable[[], T], peer: object) -> T:
        """Forward/backward work: queued behind inference steps; compute errors become bad requests."""
        try:
            return await self.executor.run(fn, priority=PRIORITY_BULK, peer=peer)
        except (ComputeError, InvalidStateError) as e:
            raise BadRequestError(str(e)) from e

    async def rpc_inference(self, stream: RPCStream, context: CallContext) -> None:
        opening = await stream.receive(timeout_s=self.first_message_timeout_s)
        if not isinstance(opening, OpenInference):
            raise BadRequestError("an inference stream must start with OpenInference")
        peer = self._admit_call(context)
        if self._draining:
            raise BusyError("server is leaving; use another server")
        span = self._check_range(opening.model, opening.start_block, opening.end_block)
        try:
            reply_codec = TensorCodec(opening.reply_codec)
        except ValueError:
            raise BadRequestError(f"unknown reply codec {opening.reply_codec!r}") from None
        # The manager that owns this session: after a move, old sessions finish on the old span.
        prompts = self._check_prompts(opening.prompts, opening.start_block, opening.end_block, opening.batch_size,
                                      opening.max_length)
        adapter = self._adapter(opening.adapter)
        sessions = self.sessions
        grant = None
        if self.fair_share is not None:
            # Cache tokens at batch 1 over the whole hosted span (what `free_tokens` and the announcement count).
            hosted_blocks = self.hosted.end - self.hosted.start
            tokens = math.ceil(opening.batch_size * opening.max_length * (opening.end_block - opening.start_block)
                               / hosted_blocks)
            capacity = sessions.cache_budget_bytes // sessions.kv_bytes_per_token
            grant = self.fair_share.admit_session(context.remote_peer_id, tokens=tokens, capacity_tokens=capacity)
        try:
            session = sessions.open(opening.max_length, batch_size=opening.batch_size, span=span, prompts=prompts)
        except BaseException:
            if grant is not None:
                self.fair_share.release(grant)
            raise
        log.info("session %s from %s: blocks %d:%d, max_length %d", session.session_id, context.remote_peer_id,
                 opening.start_block, opening.end_block, opening.max_length)
        try:
            await stream.send(InferenceOpened(session_id=session.session_id, max_length=session.max_length))
            while True:
                step = await stream.receive(timeout_s=sessions.idle_timeout_s)
                if not isinstance(step, InferenceStep):
                    raise BadRequestError("expected InferenceStep")
                if self._draining or sessions is not self.sessions:
                    # Hand the session back: the client replays it elsewhere (no step is lost or half-done).
                    raise BusyError("server is leaving or moving to other blocks; continue elsewhere")
                self._check_hidden(step.hidden, opening.batch_size)
                self._admit_call(context)
                sessions.get(session.session_id)  # touch: the session is in use

                def run(step: InferenceStep = step) -> torch.Tensor:
                    with adapter():
                        return session.step(step.hidden, start_position=step.start_position)

                self._in_flight += 1
                self._idle.clear()
                try:
                    try:
                        hidden = await self.executor.run(run, priority=PRIORITY_INFERENCE, peer=peer)
                    except (ComputeError, InvalidStateError) as e:
                        raise BadRequestError(str(e)) from e
                    self.steps_served += 1
                    await stream.send(InferenceResult(hidden=hidden, position=session.position),
                                      tensor_codec=reply_codec)
                finally:
                    self._in_flight -= 1
                    if not self._in_flight:
                        self._idle.set()
        finally:
            sessions.close(session.session_id)
            if grant is not None:
                self.fair_share.release(grant)

    # -- leaving and moving -------------------------------------------------------------------------------
    def start_draining(self) -> None:
        """Refuse new sessions and hand existing ones back after their current step."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no step is being computed or sent (bounded); True if it got there."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self._in_flight == 0

    def replace_span(self, hosted: HostedSpan, sessions: SessionManager) -> SessionManager:
        """Serve `hosted` from now on; sessions on the old span are handed back at their next step."""
        old = self.sessions
        self.hosted, self.sessions = hosted, sessions
        return old

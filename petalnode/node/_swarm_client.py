"""The swarm client (async): finds servers through the DHT, routes, and runs inference sessions with failover.

It lives in one event loop: the synchronous `RemoteBlockChain` facade runs it in a background thread for
transformers' `generate`; the churn simulator runs it directly in its virtual-time loop over the in-memory
transport. The client owns its transport, RPC and client-mode DHT node.

Fault tolerance (the part Petals gets wrong): every hop of an inference session keeps the hidden states it was
sent for positions [0, position). When a hop fails (connection lost, heartbeat missed, timeout, typed error,
busy, a reply of the wrong shape), the client bans that server with exponential backoff, routes a replacement
for exactly that hop's blocks (possibly several servers), replays the kept inputs through the replacement to
rebuild its caches, and retries the step. Positions are explicit in every step, so a replacement continues at
the exact position, and greedy output is identical to a run without failures.

Whose fault an error is, and so who is banned and when to give up, is decided in `_failover.py` (pure); this
module gathers the facts and does the I/O. A step the session cannot take is refused here before sending.

Training passes (`forward` with a trace, then `backward`) are stateless on servers: the trace keeps each hop's
input, so the backward of a hop whose server died is recomputed by any other server(s) hosting those blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from petalnode._lifecycle import CleanupStack, set_state, wait_uncancellable
from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts, timeout_scope
from petalnode.codecs import TensorCodec
from petalnode.dht import DHTNode
from petalnode.errors import (
    BadRequestError,
    ClosedResourceError,
    CodecError,
    ConfigError,
    DHTError,
    InvalidStateError,
    LocalProtocolError,
    NoRouteError,
    OpenTimeoutError,
    PetalnodeError,
    RemoteProtocolError,
    StepTimeoutError,
    VerificationRollback,
)
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.node._bans import BanList
from petalnode.node._failover import (
    Attempts,
    GiveUp,
    Phase,
    Propagate,
    accepted,
    next_action,
    no_second_opinion,
    retry_original_server,
    route_retry_delay_s,
    view_needs_refresh,
)
from petalnode.node._observed import ObservedSpeeds
from petalnode.node._pass_verifier import PassVerifier
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
from petalnode.node._referee import Referee
from petalnode.node._routing import RouteHop, choose_route
from petalnode.node._swarm import fetch_swarm
from petalnode.node._swarm_view import ServerView, SwarmView, describe_runs
from petalnode.node._verification import VerifyMode, VerifyStats, parse_server_dtype
from petalnode.node._verifier import SessionVerifier
from petalnode.rpc import RPC, RPCStream
from petalnode.swarm_key import SwarmKey, load_swarm_key
from petalnode.transport import TcpTransport, Transport

log = logging.getLogger(__name__)

# Defaults of Timeouts.step / wait_for_blocks (kept as names for callers); a client reads its `timeouts`.
STEP_TIMEOUT_S = DEFAULT_TIMEOUTS.step
WAIT_FOR_BLOCKS_S = DEFAULT_TIMEOUTS.wait_for_blocks
# A period, not a timeout: the swarm view is re-read from the DHT when older than this.
SWARM_VIEW_MAX_AGE_S = 10.0


class _Unset(enum.Enum):
    """Marker for 'keyword not given' (None already means 'no limit')."""

    TOKEN = 0


_UNSET = _Unset.TOKEN
# Positions (batch x sequence) in one forward/backward request; servers refuse more (MAX_FORWARD_TOKENS).
MAX_PASS_TOKENS = 8192
# A step redone after a check found a lying server is checked again; each redo banned a liar, so this bounds them.
MAX_VERIFIED_REDOS = 8


@dataclass
class _Hop:
    """One server's part of a session, and everything needed to replace it."""

    peer_id: PeerId
    start: int
    end: int
    stream: RPCStream
    # Hidden states sent to this hop for positions [0, position): [batch, position, hidden].
    inputs: torch.Tensor | None = None
    failures: int = field(default=0)
    # The stream failed and the hop was not replaced yet (replaced before its next use, see SwarmSession.step).
    broken: bool = False

    def remember(self, hidden: torch.Tensor, start_position: int) -> None:
        if self.inputs is None or start_position == 0:
            self.inputs = hidden
        else:
            self.inputs = torch.cat([self.inputs[:, :start_position], hidden], dim=1)


class _ReplayFailed(Exception):
    """A replacement hop failed while its cache was being rebuilt; `error` is what its server call raised."""

    def __init__(self, peer_id: PeerId, error: Exception) -> None:
        super().__init__(f"replay through {peer_id} failed: {error}")
        self.peer_id = peer_id
        self.error = error


class SwarmSession:
    """An inference session through a route of servers, with failover (decisions in `_failover.py`)."""

    def __init__(
        self, client: SwarmClient, max_length: int, batch_size: int, *, adapter: str | None = None,
        prompts: torch.Tensor | None = None, verify: VerifyMode = VerifyMode.OFF,
    ) -> None:
        self._client = client
        self.max_length = max_length
        self.batch_size = batch_size
        self.adapter = adapter
        self.prompts = prompts
        self.hops: list[_Hop] = []
        self.position = 0
        self.reroutes = 0
        self.closed = False
        # (batch, hidden size) of the steps so far: servers refuse a change of either mid-session.
        self._shape: tuple[int, int] | None = None
        # The last block's outputs for positions [0, position) (what verification compares the last hop with).
        self.outputs: torch.Tensor | None = None
        self.verifier = None if verify is VerifyMode.OFF else SessionVerifier(self, verify, client.rng)
        self._unverified_steps = 0  # steps returned since the last check

    @property
    def dtype(self) -> torch.dtype:
        return self._client.dtype

    @property
    def verify_stats(self) -> VerifyStats | None:
        return None if self.verifier is None else self.verifier.stats

    async def open(self) -> None:
        self.hops = await self._client._open_hops(0, self._client.num_blocks, self.max_length, self.batch_size,
                                                  adapter=self.adapter, prompts=self.prompts)
        if self.verifier is not None:
            for hop in self.hops:
                self.verifier.hop_started(hop, 0)

    def boundary(self, block: int) -> torch.Tensor | None:
        """The hidden states the session used at block boundary `block` (the input of the hop starting there, or
        the final outputs), for positions [0, position); None if no hop starts there."""
        if block == self._client.num_blocks:
            return self.outputs
        return next((hop.inputs for hop in self.hops if hop.start == block), None)

    async def verify(self) -> None:
        """Check every position so far on independent servers (a no-op with verify off).

        Raises:
            VerificationRollback: outputs already returned were wrong; the session now holds [0, e.position).
            VerificationError: verify="full" and some blocks cannot be checked.
        """
        if self.verifier is None or self.closed:
            return
        rollback = await self.verifier.check()
        if rollback is not None:
            self._roll_back(rollback)
            self.verifier.stats.rollbacks += 1
            raise VerificationRollback(rollback)

    def _roll_back(self, position: int) -> None:
        """Forget positions from `position` on (their outputs were wrong); the next step starts there."""
        self.position = min(self.position, position)
        for hop in self.hops:
            if hop.inputs is not None:
                hop.inputs = hop.inputs[:, :position]
        if self.outputs is not None:
            self.outputs = self.outputs[:, :position]
        if self.verifier is not None:
            self.verifier.rolled_back(position)

    async def step(self, hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
        """[batch, n, hidden] at positions [start, start + n) through every block; returns the last block's output.

        Raises:
            BadRequestError: the step does not fit the session (past max_length, wrong batch or shape, a start
                beyond the cache), checked here before anything is sent; or two servers refused it as bad.
                No server is banned for either.
            NoRouteError: the step failed over too often, or some blocks have no usable server.
        """
        if self.closed:
            raise InvalidStateError('cannot step a session in state "closed"')
        start = self.position if start_position is None else start_position
        self._check_step(hidden, start)
        if self.verifier is not None and start < self.position:
            self.verifier.rolled_back(start)
        return await self._step(hidden, start, redos=0)

    async def _step(self, hidden: torch.Tensor, start: int, *, redos: int) -> torch.Tensor:
        inputs = hidden
        what = f"the step at positions {start}-{start + hidden.shape[1] - 1} of {self._client.model}"
        index = 0
        attempts = Attempts()
        avoid: frozenset[PeerId] = frozenset()
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                if hop.broken:
                    await self._replace(index, avoid=avoid)
                    continue
                output = await self._client._send_step(hop, hidden, start)
            except NoRouteError as e:
                error = no_second_opinion(attempts, e)
                if error is e:
                    raise
                raise error from e
            except Exception as e:
                peer, cause = (e.peer_id, e.error) if isinstance(e, _ReplayFailed) else (hop.peer_id, e)
                action = next_action(attempts, cause, phase=Phase.STEP, peer=peer, blocks=(hop.start, hop.end),
                                     what=what)
                if isinstance(action, Propagate):
                    if cause is e:
                        raise
                    raise cause from None
                hop.broken = True
                self._client._ban(action.ban, f"step through blocks {hop.start}-{hop.end - 1}", cause)
                if isinstance(action, GiveUp):
                    raise action.error from cause
                attempts, avoid = action.attempts, action.avoid
                continue
            hop.remember(hidden, start)
            self._client.bans.succeeded(hop.peer_id)
            refusers, attempts = accepted(attempts)
            avoid = frozenset()
            for peer in refusers:
                self._client._ban(peer, "refusing a step another server accepted", None)
            hidden = output
            index += 1
        self.position = start + hidden.shape[1]
        self._shape = (hidden.shape[0], hidden.shape[2])
        self.outputs = hidden if self.outputs is None or start == 0 else torch.cat(
            [self.outputs[:, :start], hidden], dim=1)
        if self.verifier is not None and (redos > 0 or self.verifier.schedule.due()):
            self._unverified_steps = 0
            return await self._checked(inputs, start, hidden, redos)
        if self.verifier is not None:
            self._unverified_steps += 1
            stats = self.verifier.stats
            stats.max_unverified_steps = max(stats.max_unverified_steps, self._unverified_steps)
        return hidden

    async def _checked(self, inputs: torch.Tensor, start: int, output: torch.Tensor, redos: int) -> torch.Tensor:
        """Check the route after a step; redo the step if only its own positions were wrong, else roll back."""
        assert self.verifier is not None
        rollback = await self.verifier.check()
        if rollback is None:
            return output
        self._roll_back(rollback)
        if rollback < start or redos >= MAX_VERIFIED_REDOS:
            self.verifier.stats.rollbacks += 1
            raise VerificationRollback(rollback)
        redone = await self._step(inputs[:, rollback - start :], rollback, redos=redos + 1)
        return torch.cat([output[:, : rollback - start], redone], dim=1)

    def _check_step(self, hidden: torch.Tensor, start: int) -> None:
        """Refuse a step the session cannot take, here and with no server involved (so nobody is banned for it)."""
        if hidden.ndim != 3 or not hidden.is_floating_point() or hidden.shape[1] < 1:
            raise BadRequestError(f"hidden states must be a float tensor [batch, n >= 1, hidden], got "
                                  f"{tuple(hidden.shape)} {hidden.dtype}")
        if not 0 <= start <= self.position:
            raise BadRequestError(f"cannot step at position {start}: the session holds {self.position} tokens")
        batch, length, width = hidden.shape
        if start + length > self.max_length:
            raise BadRequestError(f"{start} + {length} tokens exceeds the session's max_length {self.max_length}; "
                                  "open the session with a larger max_length")
        if not 1 <= batch <= self.batch_size:
            raise BadRequestError(f"batch {batch} exceeds the session's batch size {self.batch_size}")
        if batch * length > MAX_PASS_TOKENS:
            raise BadRequestError(f"at most {MAX_PASS_TOKENS} positions per step, got batch {batch} x {length}; "
                                  "split the step")
        if self._shape is not None and self.position > 0 and (batch, width) != self._shape:
            raise BadRequestError(f"a step of batch {batch} and hidden size {width} in a session of batch "
                                  f"{self._shape[0]} and hidden size {self._shape[1]}")

    async def _replace(self, index: int, *, avoid: frozenset[PeerId]) -> None:
        """Swap hop `index` for a fresh route over its blocks and replay its inputs through it.

        Raises:
            _ReplayFailed: a new hop failed during the replay (the caller decides about that server).
            NoRouteError: no route, after waiting for blocks to get a server.
        """
        old = self.hops[index]
        self.reroutes += 1
        with contextlib.suppress(Exception):
            await old.stream.reset("replaced after failure")
        new_hops = await self._client._open_hops(old.start, old.end, self.max_length, self.batch_size,
                                                 adapter=self.adapter, prompts=self.prompts, avoid=avoid)
        replay = old.inputs
        replayed = 0 if replay is None else replay.shape[1]
        hop = None
        try:
            if replay is not None and replay.shape[1] > 0:
                for hop in new_hops:
                    output = await self._client._send_step(hop, replay, 0)
                    hop.remember(replay, 0)
                    replay = output
        except BaseException as e:
            for new in new_hops:
                with contextlib.suppress(Exception):
                    await new.stream.aclose()
            if isinstance(e, Exception) and hop is not None:
                raise _ReplayFailed(hop.peer_id, e) from e
            raise
        self.hops[index : index + 1] = new_hops
        if self.verifier is not None:
            for hop in new_hops:
                self.verifier.hop_started(hop, replayed)

    async def aclose(self) -> None:
        self.closed = True
        if self.verifier is not None:
            with contextlib.suppress(Exception):
                await self.verifier.aclose()
        hops, self.hops = self.hops, []
        for hop in hops:
            with contextlib.suppress(Exception):
                await hop.stream.aclose()


class ClientState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


class SwarmClient:
    """Talks to the servers of one model. Use `async with SwarmClient(...)` or `start()` / `aclose()`."""

    def __init__(
        self,
        model: str,
        num_blocks: int,
        bootstrap: Sequence[str | PeerAddress],
        *,
        dtype: torch.dtype = torch.float32,
        codec: TensorCodec = TensorCodec.RAW,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        step_timeout_s: float | _Unset | None = _UNSET,
        wait_for_blocks_s: float | _Unset | None = _UNSET,
        identity: Identity | None = None,
        seed: int | None = None,
        transport: Transport | None = None,
        endpoint_factory: Callable[..., Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        listen_host: str = "0.0.0.0",
        dht_options: dict[str, Any] | None = None,
        swarm_key: SwarmKey | str | os.PathLike[str] | None = None,
        span_digest: Callable[[int, int], bytes] | None = None,
        verify: VerifyMode | str = VerifyMode.OFF,
        referee: Referee | None = None,
    ) -> None:
        # swarm_key: a private swarm's key or its file: the DHT and the default TCP transport are keyed with it
        # (a given `transport` must be keyed by the caller).
        # span_digest: this client's digest of blocks [a, b) of its copy of the model (ModelInfo.span_digest):
        # routes use only servers announcing the same digest for their span (None: no identity check).
        # verify: re-check servers' outputs on other servers ("off", "sample", "full"; see _verification.py).
        # Off here, the building block; the library and the CLI default to "sample" for a stranger's swarm.
        # referee: decides a dispute between two servers when no third hosts the blocks (see _referee.py).
        if not bootstrap:
            raise ConfigError("a swarm client needs at least one bootstrap address")
        self.model = model
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.codec = TensorCodec(codec)
        # step_timeout_s / wait_for_blocks_s (older keywords, used by the CLI and tests) override `timeouts`.
        changes = {name: value for name, value in (("step", step_timeout_s), ("wait_for_blocks", wait_for_blocks_s))
                   if not isinstance(value, _Unset)}
        self.timeouts = timeouts.replace(**changes) if changes else timeouts
        self.step_timeout_s = self.timeouts.step
        self.wait_for_blocks_s = self.timeouts.wait_for_blocks
        self.bootstrap = [a if isinstance(a, PeerAddress) else PeerAddress.parse(a) for a in bootstrap]
        self.identity = identity or Identity.generate()
        self.swarm_key = load_swarm_key(swarm_key)
        self.span_digest = span_digest
        self.rng = random.Random(seed)
        self.verify = VerifyMode.parse(verify)
        self.referee = referee
        self.pass_verifier = None if self.verify is VerifyMode.OFF else PassVerifier(self, self.verify)
        self.rtt: dict[PeerId, float] = {}
        # Round trips and decode-step latencies measured here, per server: routing trusts them over announcements.
        self.speeds = ObservedSpeeds()
        # What each server says it computes in (from its `info` reply): the verification tolerance depends on it.
        self.server_dtypes: dict[PeerId, torch.dtype | None] = {}
        self.unverifiable_warned: set[tuple[int, int]] = set()  # block ranges verification warned about
        self.no_shadow_until: dict[tuple[int, int], float] = {}  # block range -> loop time to look for a shadow again
        self.bans: BanList = BanList(time.monotonic)
        self._given_transport = transport
        self._endpoint_factory = endpoint_factory
        self._wall_clock = wall_clock
        self._listen_host = listen_host
        self._dht_options = dht_options or {}
        self._transport: Transport | None = None
        self._rpc: RPC | None = None
        self._dht: DHTNode | None = None
        self._view: SwarmView | None = None
        self._view_at = 0.0
        self._state = ClientState.NEW
        self._cleanup = CleanupStack("swarm client")  # filled in start order, closed in reverse
        self._start_task: asyncio.Task[Any] | None = None
        self._closed_during_start = False

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def _closed(self) -> bool:
        return self._state is ClientState.CLOSED

    def _set_state(self, new: ClientState) -> None:
        self._state = set_state(log, "swarm client", self._state, new)

    async def __aenter__(self) -> SwarmClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the transport, RPC and a client-mode DHT node, and join through the bootstrap peers.

        Raises:
            DHTError: no bootstrap peer answered. InvalidStateError: already started.
            ClosedResourceError: closed before or while starting.
        """
        if self._state is ClientState.CLOSED:
            raise ClosedResourceError("the swarm client is closed")
        if self._state is not ClientState.NEW:
            raise InvalidStateError(f'cannot start a swarm client in state "{self._state.value}"')
        self._set_state(ClientState.STARTING)
        task = self._start_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self.bans = BanList(loop.time)
        try:
            self._transport = self._given_transport or TcpTransport(
                self.identity, timeouts=self.timeouts, swarm_key=self.swarm_key)
            self._cleanup.push("transport", self._transport.aclose)
            # Unary calls (forward/backward passes, info) get the step timeout: they are one pass through a span.
            self._rpc = RPC(self._transport, timeouts=self.timeouts, call_timeout_s=self.timeouts.step)
            self._cleanup.push("rpc", self._rpc.aclose)
            self._dht = DHTNode(self.identity, client_mode=True, endpoint_factory=self._endpoint_factory,
                                wall_clock=self._wall_clock, swarm_key=self.swarm_key,
                                **{"timeouts": self.timeouts, **self._dht_options})
            self._cleanup.push("dht", self._dht.aclose)
            await self._dht.start(listen=(self._listen_host, 0),
                                  bootstrap=[(a.host, a.port) for a in self.bootstrap])
        except BaseException as e:
            self._start_task = None
            if self._closed_during_start:
                if isinstance(e, asyncio.CancelledError) and task is not None and task.uncancel() == 0:
                    raise ClosedResourceError("the swarm client was closed while starting") from None
                raise
            await self._aclose(raise_errors=False)  # the start error is the one to see
            if isinstance(e, DHTError):
                names = ", ".join(str(a) for a in self.bootstrap)
                raise DHTError(
                    f"no peers reachable at the bootstrap address ({names}): {e}. Check that `petalnode bootstrap` "
                    "or a server is running there and that the address is right."
                ) from e
            raise
        self._start_task = None
        if self._state is not ClientState.STARTING:
            raise ClosedResourceError("the swarm client was closed while starting")
        self._set_state(ClientState.RUNNING)

    async def aclose(self) -> None:
        """Release the DHT node, RPC and transport (reverse start order). Idempotent.

        Raises:
            CancelledError: the caller was cancelled (after everything was released).
            Exception: the first component that failed to close (the others were still closed).
        """
        await self._aclose(raise_errors=True)

    async def _aclose(self, *, raise_errors: bool) -> None:
        if self._state is ClientState.CLOSED:
            return
        self._set_state(ClientState.CLOSED)
        cancelled = False
        start_task = self._start_task
        if start_task is not None and start_task is not asyncio.current_task() and not start_task.done():
            self._closed_during_start = True  # stop the start first, so it creates nothing after the cleanup
            start_task.cancel()
            cancelled = await wait_uncancellable([start_task])
        try:
            await self._cleanup.aclose(raise_errors=raise_errors)
        finally:
            if cancelled:
                raise asyncio.CancelledError

    # -- public ---------------------------------------------------------------------------------------------
    async def open_session(
        self, max_length: int, *, batch_size: int = 1, adapter: str | None = None,
        prompts: torch.Tensor | None = None, verify: VerifyMode | str | None = None,
    ) -> SwarmSession:
        """An inference session; `adapter` names a LoRA adapter, `prompts` are deep prompts for every block,
        `verify` overrides the client's verification mode for this session."""
        if self._closed:
            raise ClosedResourceError("the swarm client is closed")
        if prompts is not None:
            self._check_prompts(prompts, batch_size, max_length)
        mode = self.verify if verify is None else VerifyMode.parse(verify)
        session = SwarmSession(self, max_length, batch_size, adapter=adapter, prompts=prompts, verify=mode)
        await session.open()
        return session

    async def swarm(self) -> SwarmView:
        if self._dht is None:
            raise InvalidStateError("the swarm client is not started")
        return await fetch_swarm(self._dht, self.model, self.num_blocks)

    async def forward(
        self, hidden: torch.Tensor, *, prompts: torch.Tensor | None = None, adapter: str | None = None,
        trace: list[PassHop] | None = None,
    ) -> torch.Tensor:
        """A stateless pass over whole sequences through every block (no cache kept anywhere).

        Args:
            hidden: [batch, seq, hidden] input of block 0.
            prompts: deep prompts [num_blocks, 1 or batch, prefix, hidden], added to every block's input.
            adapter: a LoRA adapter name; only servers announcing it are used.
            trace: if given, every hop's input is appended to it, for `backward`.
        """
        self._check_pass(hidden, prompts)
        block, current, attempts = 0, hidden, Attempts()
        while block < self.num_blocks:
            route = await self._reroute(attempts, block, self.num_blocks, adapter=adapter)
            for hop in route:
                try:
                    output = await self._call_forward(hop.server, hop.start, hop.end, current, prompts, adapter)
                    output = await self._checked_forward(hop.server, hop.start, hop.end, current, prompts, adapter,
                                                         output)
                except Exception as e:
                    attempts = self._pass_failed(attempts, e, Phase.FORWARD, hop.server, hop.start, hop.end)
                    break  # reroute from this hop's first block
                attempts = self._pass_accepted(attempts, hop.server)
                if trace is not None:
                    trace.append(PassHop(hop.server, hop.start, hop.end, current))
                current, block = output, hop.end
        return current

    async def backward(
        self, trace: Sequence[PassHop], grad_output: torch.Tensor, *, prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the traced forward pass for its input and its deep prompts.

        Each hop goes back to the server that ran its forward; if that server fails, the hop's blocks are routed
        anew (possibly over several servers), which recompute from the traced input. Returns
        (grad of the input hidden states, grad of `prompts` or None).
        """
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        grad = grad_output
        for hop in reversed(trace):
            grad = await self._backward_hop(hop, grad, prompts, adapter, grad_prompts)
        return grad, grad_prompts

    async def _backward_hop(
        self, hop: PassHop, grad: torch.Tensor, prompts: torch.Tensor | None, adapter: str | None,
        grad_prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        attempts = Attempts()
        while True:
            if retry_original_server(attempts, banned=self.bans.is_banned(hop.server.peer_id)):
                route = [RouteHop(hop.server.peer_id, hop.start, hop.end, hop.server)]
            else:
                route = await self._reroute(attempts, hop.start, hop.end, adapter=adapter)
            server, sub = route[0].server, route[0]
            try:
                inputs = [hop.inputs]  # a replacement route over several servers needs each one's input
                for sub in route[:-1]:
                    server = sub.server
                    inputs.append(await self._call_forward(server, sub.start, sub.end, inputs[-1], prompts, adapter))
                partial: list[tuple[int, int, torch.Tensor]] = []
                for sub, sub_input in zip(reversed(route), reversed(inputs), strict=True):
                    server = sub.server
                    grad, sub_grad_prompts = await self._checked_backward(server, sub.start, sub.end, sub_input,
                                                                          grad, prompts, adapter)
                    if sub_grad_prompts is not None:
                        partial.append((sub.start, sub.end, sub_grad_prompts))
            except Exception as e:
                attempts = self._pass_failed(attempts, e, Phase.BACKWARD, server, sub.start, sub.end)
                continue
            self._pass_accepted(attempts, route[-1].server)
            if grad_prompts is not None:
                for start, end, value in partial:
                    grad_prompts[start:end] += value.to(grad_prompts.dtype)
            return grad

    async def _reroute(self, attempts: Attempts, start: int, end: int, *, adapter: str | None) -> list[RouteHop]:
        """A route over [start, end) for a pass, around servers that refused it."""
        try:
            return await self._route(start, end, 0, adapter=adapter, avoid=attempts.refused_by)
        except NoRouteError as e:
            error = no_second_opinion(attempts, e)
            if error is e:
                raise
            raise error from e

    def _pass_failed(
        self, attempts: Attempts, error: Exception, phase: Phase, server: ServerView, start: int, end: int
    ) -> Attempts:
        """Ask the policy about a failed forward/backward call; returns the record to go on with, or raises."""
        action = next_action(attempts, error, phase=phase, peer=server.peer_id, blocks=(start, end),
                             what=f"{phase.value} through blocks {start}-{end - 1} of {self.model}")
        if isinstance(action, Propagate):
            raise error
        self._ban(action.ban, f"{phase.value} through blocks {start}-{end - 1}", error)
        if isinstance(action, GiveUp):
            raise action.error from error
        if action.ban is None:
            log.warning("%s through %s (blocks %d-%d) refused as a bad request: %s; asking another server",
                        phase.value, server.peer_id, start, end - 1, error)
        return action.attempts

    def _pass_accepted(self, attempts: Attempts, server: ServerView) -> Attempts:
        refusers, attempts = accepted(attempts)
        for peer in refusers:
            self._ban(peer, f"refusing a request that {server.peer_id} accepted", None)
        return attempts

    def _ban(self, peer: PeerId | None, what: str, error: BaseException | None) -> None:
        if peer is None:
            return
        duration = self.bans.ban(peer)
        cause = "" if error is None else f": {type(error).__name__}: {error}"
        log.warning("server %s failed (%s)%s; banned for %.0f s, rerouting", peer, what, cause, duration)

    def referee_dtype(self) -> torch.dtype | None:
        return None if self.referee is None else self.referee.dtype

    async def _checked_forward(
        self, server: ServerView, start: int, end: int, hidden: torch.Tensor, prompts: torch.Tensor | None,
        adapter: str | None, output: torch.Tensor,
    ) -> torch.Tensor:
        """`output` (from `server`), or the majority's reply when a spot-check catches `server` lying."""
        if self.pass_verifier is None:
            return output

        async def call(other: ServerView) -> list[torch.Tensor | None]:
            return [await self._call_forward(other, start, end, hidden, prompts, adapter)]

        async def referee() -> list[torch.Tensor | None]:
            assert self.referee is not None
            return [(await self.referee.run(start, end, hidden, prompts)).to(self.dtype)]

        (checked,) = await self.pass_verifier.checked(
            Phase.FORWARD, server, start, end, adapter, [output], call,
            referee if self.referee is not None and adapter is None else None)
        assert checked is not None
        return checked

    async def _checked_backward(
        self, server: ServerView, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor,
        prompts: torch.Tensor | None, adapter: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A backward call through `server`, spot-checked like `_checked_forward`."""
        replies = await self._call_backward(server, start, end, hidden, grad, prompts, adapter)
        if self.pass_verifier is None:
            return replies

        async def call(other: ServerView) -> list[torch.Tensor | None]:
            return list(await self._call_backward(other, start, end, hidden, grad, prompts, adapter))

        async def referee() -> list[torch.Tensor | None]:
            assert self.referee is not None
            grad_hidden, grad_prompts = await self.referee.run_backward(start, end, hidden, grad, prompts)
            return [grad_hidden.to(self.dtype), None if grad_prompts is None else grad_prompts.to(prompts.dtype)]

        grad_hidden, grad_prompts = await self.pass_verifier.checked(
            Phase.BACKWARD, server, start, end, adapter, list(replies), call,
            referee if self.referee is not None and adapter is None else None)
        assert grad_hidden is not None
        return grad_hidden, grad_prompts

    async def _call_forward(
        self, server: ServerView, start: int, end: int, hidden: torch.Tensor, prompts: torch.Tensor | None,
        adapter: str | None,
    ) -> torch.Tensor:
        reply = await self._require_rpc().call(
            _address_of(server), "forward",
            ForwardRequest(model=self.model, start_block=start, end_block=end, hidden=hidden.contiguous(),
                           prompts=None if prompts is None else prompts[start:end].contiguous(), adapter=adapter),
            expected=ForwardResult, tensor_codec=self.codec,
        )
        return _checked(reply.hidden, hidden.shape, server, "hidden states").to(self.dtype)

    async def _call_backward(
        self, server: ServerView, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor,
        prompts: torch.Tensor | None, adapter: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        span_prompts = None if prompts is None else prompts[start:end].contiguous()
        reply = await self._require_rpc().call(
            _address_of(server), "backward",
            BackwardRequest(model=self.model, start_block=start, end_block=end, hidden=hidden.contiguous(),
                            grad_output=grad.contiguous(), prompts=span_prompts, adapter=adapter),
            expected=BackwardResult, tensor_codec=self.codec,
        )
        grad_hidden = _checked(reply.grad_hidden, hidden.shape, server, "input gradients").to(self.dtype)
        if span_prompts is None:
            if reply.grad_prompts is not None:
                raise RemoteProtocolError(f"server {server.peer_id} returned prompt gradients nobody asked for")
            return grad_hidden, None
        if reply.grad_prompts is None:
            raise RemoteProtocolError(f"server {server.peer_id} returned no prompt gradients")
        return grad_hidden, _checked(reply.grad_prompts, span_prompts.shape, server, "prompt gradients")

    def _check_pass(self, hidden: torch.Tensor, prompts: torch.Tensor | None) -> None:
        """Refuse malformed training input here, with a clear error, instead of failing over on it."""
        if hidden.ndim != 3 or not hidden.is_floating_point():
            raise BadRequestError(f"hidden states must be a float tensor [batch, seq, hidden], got "
                                  f"{tuple(hidden.shape)} {hidden.dtype}")
        if hidden.shape[0] * hidden.shape[1] > MAX_PASS_TOKENS:
            raise BadRequestError(f"at most {MAX_PASS_TOKENS} positions per pass, got batch {hidden.shape[0]} x "
                                  f"{hidden.shape[1]}; split the batch")
        if prompts is not None:
            self._check_prompts(prompts, hidden.shape[0], hidden.shape[1])

    def _check_prompts(self, prompts: torch.Tensor, batch: int, max_prefix: int) -> None:
        if (prompts.ndim != 4 or prompts.shape[0] != self.num_blocks or prompts.shape[1] not in (1, batch)
                or not 1 <= prompts.shape[2] <= max_prefix or not prompts.is_floating_point()):
            raise BadRequestError(f"deep prompts must be float [{self.num_blocks}, 1 or {batch}, 1..{max_prefix}, "
                                  f"hidden], got {tuple(prompts.shape)} {prompts.dtype}")

    # -- internals ------------------------------------------------------------------------------------------
    def _require_rpc(self) -> RPC:
        if self._rpc is None or self._closed:
            raise ClosedResourceError("the swarm client is not running")
        return self._rpc

    async def _route(
        self, start: int, end: int, min_cache_tokens: int, *, adapter: str | None = None,
        avoid: frozenset[PeerId] = frozenset(), wait_s: float | _Unset | None = _UNSET,
    ) -> list[RouteHop]:
        """A route over [start, end) around banned servers and `avoid`, waiting up to `wait_s` (default: the wait
        for blocks) for missing blocks to get a server."""
        loop = asyncio.get_running_loop()
        wait = self.wait_for_blocks_s if isinstance(wait_s, _Unset) else wait_s
        deadline = loop.time() + (math.inf if wait is None else wait)
        reported = None
        fresh = False
        while True:
            age_s = None if self._view is None else loop.time() - self._view_at
            if view_needs_refresh(age_s, SWARM_VIEW_MAX_AGE_S, route_failed=fresh):
                self._view, self._view_at = await self.swarm(), loop.time()
                fresh = True
            view = self._view
            await self._probe_rtts(view)
            try:
                return choose_route(
                    view, start=start, end=end, rtt_s=self.rtt, banned=self.bans.banned() | avoid,
                    min_cache_tokens=min_cache_tokens, rng=self.rng, model=self.model, adapter=adapter,
                    span_digest=self.span_digest,
                    observed=self._observed_throughputs(view),
                )
            except NoRouteError as e:
                delay_s = route_retry_delay_s(view_is_fresh=fresh, now=loop.time(), deadline=deadline)
                if delay_s is None:
                    first = e.missing[0] if e.missing else (start, end)
                    raise NoRouteError(
                        f"{e}; waited {wait or 0:.0f} s. Start one with: petalnode join --bootstrap "
                        f"{self.bootstrap[0]} --model {self.model} --blocks {first[0]}:{first[1]}",
                        missing=e.missing,
                    ) from None
                fresh = True
                if not delay_s:
                    continue
                if reported != e.missing:
                    reported = e.missing
                    log.warning("waiting for servers: %s of %s have no available server", describe_runs(e.missing),
                                self.model)
                await asyncio.sleep(delay_s)

    async def _probe_rtts(self, view: SwarmView) -> None:
        """Measure round-trip times to servers not measured lately (an `info` call each, concurrently)."""
        rpc = self._require_rpc()
        now = asyncio.get_running_loop().time()
        unknown = [s for s in view.servers.values() if self.speeds.needs_probe(s.peer_id, now) and s.addresses][:16]

        async def probe(server: ServerView) -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                info = await rpc.call(_address_of(server), "info", InfoRequest(), expected=ServerInfo,
                                      timeout_s=self.timeouts.rtt_probe)
                self.rtt[server.peer_id] = self.speeds.record_rtt(server.peer_id, loop.time() - started, loop.time())
                self.server_dtypes[server.peer_id] = parse_server_dtype(info.dtype)
            except (PetalnodeError, OSError) as e:
                log.debug("rtt probe of %s failed: %s", server.peer_id, e)

        await asyncio.gather(*(probe(s) for s in unknown))

    async def _open_hops(
        self, start: int, end: int, max_length: int, batch_size: int, *, adapter: str | None = None,
        prompts: torch.Tensor | None = None, avoid: frozenset[PeerId] = frozenset(),
        wait_s: float | _Unset | None = _UNSET,
    ) -> list[_Hop]:
        """Open inference streams along a route over [start, end), rerouting around servers that fail.

        `avoid`: servers not to use (a replacement asking for a second opinion avoids the server that refused; a
        verifying shadow avoids the server it checks). `wait_s`: how long to wait for missing blocks.
        """
        attempts = Attempts()
        while True:
            try:
                route = await self._route(start, end, max_length * batch_size, adapter=adapter,
                                          avoid=avoid | attempts.refused_by, wait_s=wait_s)
            except NoRouteError as e:
                error = no_second_opinion(attempts, e)
                if error is e:
                    raise
                raise error from e
            hops: list[_Hop] = []
            try:
                for step in route:
                    hops.append(await self._open_hop(step, max_length, batch_size, adapter, prompts))
            except Exception as e:
                failed = route[len(hops)]
                for hop in hops:
                    with contextlib.suppress(Exception):
                        await hop.stream.aclose()
                action = next_action(attempts, e, phase=Phase.OPEN, peer=failed.peer_id,
                                     blocks=(failed.start, failed.end),
                                     what=f"opening a session through blocks {start}-{end - 1} of {self.model}")
                if isinstance(action, Propagate):
                    raise
                self._ban(action.ban, f"opening a session on blocks {failed.start}-{failed.end - 1}", e)
                if isinstance(action, GiveUp):
                    raise action.error from e
                attempts = action.attempts
                continue
            refusers, _ = accepted(attempts)
            for peer in refusers:
                self._ban(peer, "refusing a session other servers accepted", None)
            return hops

    async def _open_hop(
        self, step: RouteHop, max_length: int, batch_size: int, adapter: str | None, prompts: torch.Tensor | None
    ) -> _Hop:
        rpc = self._require_rpc()
        async with timeout_scope(self.timeouts.open, OpenTimeoutError,
                                 f"opening a session on {step.peer_id} took over {self.timeouts.open} s"):
            stream = await rpc.open_stream(_address_of(step.server), "inference",
                                           expected=(InferenceOpened, InferenceResult))
            try:
                await stream.send(OpenInference(
                    model=self.model, start_block=step.start, end_block=step.end, max_length=max_length,
                    batch_size=batch_size, reply_codec=self.codec.value, adapter=adapter,
                    prompts=None if prompts is None else prompts[step.start : step.end].contiguous(),
                ))
                opened = await stream.receive()
                if not isinstance(opened, InferenceOpened):
                    raise RemoteProtocolError(f"expected InferenceOpened from {step.peer_id}, got {type(opened)}")
            except BaseException:
                with contextlib.suppress(Exception):
                    await stream.reset("open failed")
                raise
        return _Hop(peer_id=step.peer_id, start=step.start, end=step.end, stream=stream)

    def _observed_throughputs(self, view: SwarmView) -> dict[PeerId, float]:
        """What routing costs measured servers by; logs (once per server) claims far above the measurement."""
        now = asyncio.get_running_loop().time()
        claims = {p: s.throughput for p, s in view.servers.items()}
        for found in self.speeds.discount(claims, now):
            log.warning("server %s announces %.4g blocks/s but ran %.4g blocks/s for us; routing by what we measured",
                        found.peer_id, found.claimed, found.observed)
        return self.speeds.throughputs(now)

    async def _send_step(self, hop: _Hop, hidden: torch.Tensor, start: int) -> torch.Tensor:
        started = asyncio.get_running_loop().time()
        try:
            await hop.stream.send(InferenceStep(hidden=hidden.contiguous(), start_position=start),
                                  tensor_codec=self.codec)
        except CodecError as e:  # our step does not fit the wire limits: our fault, not the server's
            raise LocalProtocolError(f"cannot send a step of shape {tuple(hidden.shape)}: {e}") from e
        reply = await hop.stream.receive(timeout_s=self.step_timeout_s, error_cls=StepTimeoutError)
        if not isinstance(reply, InferenceResult):
            raise RemoteProtocolError(f"expected InferenceResult from {hop.peer_id}, got {type(reply).__name__}")
        out = reply.hidden
        if out.shape != hidden.shape or not out.is_floating_point() or reply.position != start + hidden.shape[1]:
            raise RemoteProtocolError(
                f"server {hop.peer_id} replied with shape {tuple(out.shape)} at position {reply.position}; expected "
                f"{tuple(hidden.shape)} at {start + hidden.shape[1]}"
            )
        if not torch.isfinite(out).all():
            raise RemoteProtocolError(f"server {hop.peer_id} replied with non-finite hidden states")
        if hidden.shape[1] == 1:  # decode steps only: what announced throughput describes (prefill costs more)
            now = asyncio.get_running_loop().time()
            self.speeds.record_step(hop.peer_id, hop.end - hop.start, now - started, now)
        return out.to(self.dtype)


@dataclass
class PassHop:
    """One hop of a traced forward pass: the server that ran blocks [start, end) and the input it was given."""

    server: ServerView
    start: int
    end: int
    inputs: torch.Tensor


def _checked(tensor: torch.Tensor, shape: torch.Size, server: ServerView, what: str) -> torch.Tensor:
    """A server's reply tensor, refused unless it has the expected shape and finite float values."""
    if tensor.shape != shape or not tensor.is_floating_point():
        raise RemoteProtocolError(f"server {server.peer_id} replied with {what} of shape {tuple(tensor.shape)} "
                                  f"{tensor.dtype}; expected {tuple(shape)}")
    if not torch.isfinite(tensor).all():
        raise RemoteProtocolError(f"server {server.peer_id} replied with non-finite {what}")
    return tensor


def _address_of(server: ServerView) -> PeerAddress:
    """The server's first announced address, pinned to the peer id it announced under (so nobody can redirect us)."""
    for text in server.addresses:
        with contextlib.suppress(PetalnodeError):
            address = PeerAddress.parse(text)
            return address.with_peer_id(server.peer_id)
    raise RemoteProtocolError(f"server {server.peer_id} announced no usable address")

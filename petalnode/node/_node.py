"""The daemon: one event loop wiring identity, transport + RPC, DHT, and (for servers) a hosted span.

Roles: with `serve=None` the node is a bootstrap (DHT and RPC only); with `ServeOptions` it also picks blocks,
loads them and serves them. A client is a `RemoteBlockChain` (see `_remote_chain.py`), not a `Node`.

Start sequence of a server (each step logged):
  listen (TCP and the DHT's UDP on the same port number, so one address names both) -> join the DHT ->
  choose blocks (pure placement policy over the announced swarm) -> announce JOINING -> wait a random jitter
  and re-check the choice (servers that start together spread out) -> load only those blocks -> measure
  throughput (cached) -> announce ONLINE and refresh every ttl/2 -> serve.
`aclose()` announces OFFLINE (bounded in time), stops serving, and releases everything; it is idempotent.
Release order is the reverse of the start order (one `CleanupStack` filled as components come up): background
tasks -> sessions -> executor -> DHT -> signaling -> RPC (and its listeners) -> transport. A component that fails
to close does not stop the others; a cancelled `aclose()` still releases everything, then re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from petalnode import __version__
from petalnode._lifecycle import CleanupStack, TaskOwner, set_state, wait_uncancellable
from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts, timeout_scope
from petalnode.compute import DEFAULT_CACHE_TOKENS_PER_BLOCK, ServePlan, plan_serving
from petalnode.dht import MAX_ADAPTERS, Announcement, DHTNode, ServerState, block_keys
from petalnode.errors import ClosedResourceError, ConfigError, DHTError, DHTTimeoutError, InvalidStateError
from petalnode.identity import Identity, PeerAddress
from petalnode.node._backend import ComputeBackend, LoraCapableBackend, TorchBackend, split_adapter_spec
from petalnode.node._fair_share import FairShareLedger, FairShareLimits
from petalnode.node._placement import choose_blocks, join_recheck_waits, rebalance_target
from petalnode.node._signaling import NatOptions, Signaling
from petalnode.node._swarm import fetch_swarm
from petalnode.rpc import RPC
from petalnode.swarm_key import SwarmKey, load_swarm_key
from petalnode.transport import TcpTransport, Transport

if TYPE_CHECKING:  # serving only: a bootstrap node never loads torch (tests/cli/test_cli_bootstrap_imports.py)
    import torch

    from petalnode.compute import ModelInfo, SessionManager
    from petalnode.node._block_server import BlockServer, HostedSpan

log = logging.getLogger(__name__)

# Announcements live this long unless refreshed (refresh every ttl/2): a crashed server vanishes within it.
DEFAULT_RECORD_TTL_S = 60.0
IDLE_SWEEP_PERIOD_S = 5.0
_PORT_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class _ServeState:
    """What a server decided at start and reuses for every (re)load: model, device, dtype and memory plan."""

    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    plan: ServePlan


class NodeState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True)
class ServeOptions:
    """What a server hosts and with how much memory.

    Args:
        model: local model directory or id (default model when None).
        vram_bytes: memory budget for weights + KV cache (+ working memory); None: just what the chosen
            blocks need plus the default cache reserve.
        num_blocks: host this many blocks (placement chooses which); None: as many as the budget allows.
        blocks: host exactly [start, end) (no automatic placement).
        join_jitter_s: upper bound of the random wait between announcing JOINING and re-checking placement.
        rebalance_period_s: how often (on average) to re-check placement; None disables moving.
        drain_timeout_s: on leave or move, how long in-flight steps may take to finish before the cut.
        adapters: LoRA adapters to serve, each `PATH_OR_HUB_ID` or `NAME=PATH_OR_HUB_ID` (PEFT format,
            safetensors; hub ids only from the local cache); loaded for the hosted blocks, reloaded on a move,
            and announced by name.
        fair_share: per-peer limits on sessions, cache share and request rate, plus per-peer compute turns
            (node/_fair_share.py); None serves first come, first served.
    """

    model: str | None = None
    vram_bytes: int | None = None
    num_blocks: int | None = None
    blocks: tuple[int, int] | None = None
    public_name: str | None = None
    dtype: str | None = None
    device: str | None = None
    cache_tokens_per_block: int = DEFAULT_CACHE_TOKENS_PER_BLOCK
    idle_timeout_s: float = 300.0
    join_jitter_s: float = 1.0
    rebalance_period_s: float | None = 120.0
    drain_timeout_s: float = 10.0
    seed: int | None = None
    adapters: tuple[str, ...] = ()
    fair_share: FairShareLimits | None = field(default_factory=FairShareLimits)


class Node:
    """A petalnode daemon (bootstrap or server) in the caller's event loop."""

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        announce_host: str | None = None,
        bootstrap: Sequence[str | PeerAddress] = (),
        serve: ServeOptions | None = None,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
        progress: Callable[[str, int, int], None] | None = None,
        transport: Transport | None = None,
        endpoint_factory: Callable[..., Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        compute: ComputeBackend | None = None,
        dht_options: dict[str, Any] | None = None,
        nat: NatOptions | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        swarm_key: SwarmKey | str | os.PathLike[str] | None = None,
    ) -> None:
        """Args (beyond the obvious):
            timeouts: how long each phase may take, handed to the RPC layer, the default TCP transport, the DHT
                and the block server (a given `transport` keeps its own handshake/keepalive settings).
            transport: defaults to TCP; the simulator passes an in-memory transport.
            endpoint_factory: how the DHT opens its datagram socket (default: real UDP).
            wall_clock: absolute time for DHT record expiry (the simulator's virtual clock).
            compute: where served blocks come from (default: real torch blocks).
            nat: serve STUN and WebRTC signaling, and behind NAT be reachable by WebRTC via a bootstrap peer
                (see _signaling.py); None: TCP only.
            swarm_key: a private swarm's key (or the path of its file): only peers holding it can connect, use
                the DHT or open sessions; None: the public swarm. A given `transport` must be keyed by the caller.
        """
        self.identity = identity or Identity.generate()
        self.swarm_key = load_swarm_key(swarm_key)
        self._given_transport = transport
        self._endpoint_factory = endpoint_factory
        self._wall_clock = wall_clock
        self.compute = compute or TorchBackend()
        self._dht_options = dht_options or {}
        self.timeouts = timeouts
        self._signaling = (Signaling(self.identity, nat, swarm_key=self.swarm_key)
                           if nat is not None and transport is None else None)
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.bootstrap_addresses = [a if isinstance(a, PeerAddress) else PeerAddress.parse(a) for a in bootstrap]
        self.serve_options = serve
        self.record_ttl_s = record_ttl_s
        self._announce_host = announce_host
        self._progress = progress
        self._state = NodeState.NEW
        self._transport: Transport | None = None
        self._rpc: RPC | None = None
        self._dht: DHTNode | None = None
        self._executor: Any = None
        self._sessions: SessionManager | None = None
        self._server: BlockServer | None = None
        self._refresh = None
        self._tasks = TaskOwner("node")
        # Filled in start order, closed in reverse by aclose (see the module docstring).
        self._cleanup = CleanupStack(f"node {self.identity.peer_id}")
        self._start_task: asyncio.Task[Any] | None = None
        self._closed_during_start = False
        self._address: PeerAddress | None = None
        self.model_info: ModelInfo | None = None
        self.hosted: HostedSpan | None = None
        # (model, start, end) announced as JOINING while blocks load: withdrawn by aclose if loading fails.
        self._joining: tuple[str, int, int] | None = None
        self.reloads = 0  # how many times this node loaded blocks (1 at start, +1 per rebalancing move)
        self._rng = random.Random()
        self._serve_state: _ServeState | None = None

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def state(self) -> NodeState:
        return self._state

    def _set_state(self, new: NodeState) -> None:
        self._state = set_state(log, f"node {self.identity.peer_id}", self._state, new)

    @property
    def address(self) -> PeerAddress:
        """The full address to give to others: scheme, host, port and peer id."""
        if self._address is None:
            raise InvalidStateError(f'node has no address in state "{self._state.value}"')
        return self._address

    @property
    def dht(self) -> DHTNode:
        if self._dht is None:
            raise InvalidStateError(f'node has no DHT in state "{self._state.value}"')
        return self._dht

    @property
    def rpc(self) -> RPC:
        if self._rpc is None:
            raise InvalidStateError(f'node has no RPC in state "{self._state.value}"')
        return self._rpc

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Listen, join the DHT and (for servers) load and announce blocks.

        Raises:
            DHTError: no bootstrap peer answered. ConfigError / OutOfCacheMemoryError: bad serve options.
            ClosedResourceError: the node is closed, or `aclose()` ran while it was starting.
            InvalidStateError: already started.
        """
        if self._state is NodeState.CLOSED:
            raise ClosedResourceError("node is closed")
        if self._state is not NodeState.NEW:
            raise InvalidStateError(f'cannot start a node in state "{self._state.value}"')
        self._set_state(NodeState.STARTING)
        task = self._start_task = asyncio.current_task()
        try:
            await self._listen()
            if self.serve_options is not None:
                await self._start_serving(self.serve_options)
        except BaseException as e:
            self._start_task = None
            if self._closed_during_start:
                # aclose() cancelled us and releases everything itself; a cancellation from elsewhere still wins.
                if isinstance(e, asyncio.CancelledError) and task is not None and task.uncancel() == 0:
                    raise ClosedResourceError("node was closed while starting") from None
                raise
            # The start error is the one to see: cleanup errors are logged, not raised over it.
            await self._aclose(raise_errors=False)
            raise
        self._start_task = None
        if self._state is not NodeState.STARTING:
            raise ClosedResourceError("node was closed while starting")
        self._set_state(NodeState.RUNNING)

    async def _listen(self) -> None:
        default = (self._signaling.transport() if self._signaling is not None
                   else TcpTransport(self.identity, timeouts=self.timeouts, swarm_key=self.swarm_key))
        self._transport = self._given_transport or default
        self._cleanup.push("transport", self._transport.aclose)
        self._rpc = RPC(self._transport, timeouts=self.timeouts)
        self._cleanup.push("rpc", self._rpc.aclose)
        if self._signaling is not None:
            self._signaling.attach(self._rpc)
            self._cleanup.push("signaling", self._signaling.aclose)
        bootstrap = [(a.host, a.port) for a in self.bootstrap_addresses]
        last_error: Exception | None = None
        for _ in range(_PORT_ATTEMPTS if self.listen_port == 0 else 1):
            listener = await self._rpc.listen(host=self.listen_host, port=self.listen_port)
            port = listener.address.port
            dht = DHTNode(self.identity, record_ttl_s=self.record_ttl_s, endpoint_factory=self._endpoint_factory,
                          wall_clock=self._wall_clock, swarm_key=self.swarm_key,
                          **{"timeouts": self.timeouts, **self._dht_options})
            try:
                await dht.start(listen=(self.listen_host, port))
            except OSError as e:  # UDP port taken by someone else: try another TCP port
                last_error = e
                await listener.aclose()
                continue
            self._dht = dht
            self._cleanup.push("dht", dht.aclose)
            break
        else:
            raise ConfigError(f"could not listen on UDP and TCP port {self.listen_port} of {self.listen_host}: "
                              f"{last_error}")
        host = self._announce_host or _announce_host_for(self.listen_host, self.bootstrap_addresses)
        self._address = PeerAddress(listener.address.scheme, host, port, self.identity.peer_id)
        if bootstrap:
            try:
                await self._dht.bootstrap(bootstrap)
            except DHTError as e:
                names = ", ".join(str(a) for a in self.bootstrap_addresses)
                raise DHTError(
                    f"no peers reachable at the bootstrap address ({names}): {e}. Check that a bootstrap or "
                    "server is running there (petalnode bootstrap) and that the address and port are right."
                ) from e
        if self._signaling is not None:  # behind NAT this becomes webrtc://RELAY/OUR_ID
            self._address = await self._signaling.start(self._address, self.bootstrap_addresses,
                                                        listen_host=self.listen_host)
        log.info("node %s listening at %s", self.identity.peer_id, self._address)

    async def _start_serving(self, options: ServeOptions) -> None:
        rng = random.Random(options.seed)
        compute = self.compute
        info = await compute.offload(lambda: compute.model_info(options.model))
        self.model_info = info
        model = info.source.name
        device, dtype = compute.choose(options.device, options.dtype)
        _check_adapter_specs(options.adapters, compute)
        plan = plan_serving(
            model=model, total_blocks=info.num_blocks, block_weight_bytes=info.block_weight_bytes(0, dtype),
            kv_bytes_per_token_per_block=info.kv_bytes_per_token_per_block(dtype),
            activation_bytes=info.activation_bytes(dtype), vram_bytes=options.vram_bytes,
            num_blocks=options.num_blocks, blocks=options.blocks, cache_tokens_per_block=options.cache_tokens_per_block,
        )
        count = plan.num_blocks
        start, end = await self._choose_window(info, options, count, rng)
        announce = self._announcement_factory(model)
        self._joining = (model, start, end)
        await self.dht.store_many(_keys(model, start, end), announce(ServerState.JOINING, start, end, 0.0, 0))
        for wait_s in join_recheck_waits(jitter_s=options.join_jitter_s, fixed_blocks=options.blocks is not None,
                                         rng=rng):
            await asyncio.sleep(wait_s)
            new_start, new_end = await self._choose_window(info, options, count, rng)
            if (new_start, new_end) != (start, end):
                log.info("placement changed after re-check: %d:%d -> %d:%d", start, end, new_start, new_end)
                old_keys = _keys(model, start, end)
                start, end = new_start, new_end
                self._joining = (model, start, end)
                # The new announcement under every old and new key: readers drop it where it is out of range.
                await self.dht.store_many(sorted(set(old_keys) | set(_keys(model, start, end))),
                                          announce(ServerState.JOINING, start, end, 0.0, 0))
        self._executor = compute.executor()
        self._cleanup.push("executor", self._executor.close)
        self._rng = rng
        self._serve_state = _ServeState(info=info, device=device, dtype=dtype, plan=plan)
        # Sessions are replaced by a move: close whichever manager is current at aclose.
        self._cleanup.push("sessions", lambda: self._sessions.close_all() if self._sessions is not None else None)
        self._cleanup.push("tasks", self._tasks.aclose)
        hosted, sessions = await self._load(start, end)
        self.hosted, self._sessions = hosted, sessions
        from petalnode.node._block_server import BlockServer

        ledger = (FairShareLedger(options.fair_share, clock=asyncio.get_running_loop().time)
                  if options.fair_share is not None else None)
        self._server = BlockServer(hosted, sessions, self._executor,
                                   first_message_timeout_s=self.timeouts.first_message, fair_share=ledger)
        self._server.register(self.rpc)
        await self._announce_online(hosted, sessions)
        self._tasks.spawn(self._sweep_idle_sessions(), name="sweep-idle-sessions")
        if options.rebalance_period_s and options.blocks is None:
            self._tasks.spawn(self._rebalance_loop(options.rebalance_period_s), name="rebalance")
        log.info("serving blocks %d:%d of %s (weights %s) at %s (%.1f steps/s per block, cache for %d tokens)",
                 start, end, model, hosted.span_digest.hex()[:12] if hosted.span_digest else "unhashed", self.address,
                 hosted.throughput, sessions.free_tokens)

    async def _load(self, start: int, end: int) -> tuple[HostedSpan, SessionManager]:
        """Load blocks [start, end), measure them, and give them a session manager with the cache budget."""
        from petalnode.compute import SessionManager
        from petalnode.node._block_server import HostedSpan

        compute = self.compute
        state, options = self._serve_state, self.serve_options
        assert state is not None and options is not None
        info, device, dtype, cache_bytes = state.info, state.device, state.dtype, state.plan.cache_budget_bytes
        log.info("loading blocks %d:%d of %s (%s, %s)", start, end, info.source.name, device, dtype)
        progress = self._progress

        def load() -> torch.nn.Module:
            def tick(block: int) -> None:
                if progress is not None:
                    progress("loading blocks", block - start + 1, end - start)

            return compute.load_span(info, start, end, dtype=dtype, device=device, progress=tick)

        span = await compute.offload(load)
        adapters: frozenset[str] = frozenset()
        if options.adapters:
            # _check_adapter_specs refused a backend without LoRA support before anything was announced.
            assert isinstance(compute, LoraCapableBackend)
            load_adapters = compute.load_adapters
            adapters = await compute.offload(lambda: load_adapters(info, span, options.adapters, start, end,
                                                                   dtype=dtype, device=device))
            log.info("LoRA adapters on blocks %d:%d: %s", start, end, ", ".join(sorted(adapters)))
        self.reloads += 1
        digest = await compute.offload(lambda: _span_digest(info, start, end))
        throughput = await compute.offload(lambda: compute.throughput(info, span, dtype, device))
        sessions = SessionManager(
            span, cache_budget_bytes=cache_bytes, kv_bytes_per_token_per_block=info.kv_bytes_per_token_per_block(dtype),
            hidden_size=info.hidden_size, dtype=dtype, idle_timeout_s=options.idle_timeout_s,
            clock=asyncio.get_running_loop().time,
        )
        hosted = HostedSpan(model=info.source.name, start=start, end=end, span=span, hidden_size=info.hidden_size,
                            dtype=dtype, throughput=throughput, adapters=adapters, span_digest=digest)
        return hosted, sessions

    async def _announce_online(self, hosted: HostedSpan, sessions: SessionManager) -> None:
        # Announce ONLINE before returning, so "started" means "findable"; then refresh every ttl/2.
        announce = self._announcement_factory(hosted.model)
        keys = _keys(hosted.model, hosted.start, hosted.end)

        def current() -> bytes:
            return announce(ServerState.ONLINE, hosted.start, hosted.end, hosted.throughput, sessions.free_tokens,
                            hosted.adapters, hosted.span_digest)

        await self.dht.store_many(keys, current())
        if self._refresh is not None:
            self._refresh.cancel()
        self._refresh = self.dht.start_refreshing(keys, current)

    async def _rebalance_loop(self, period_s: float) -> None:
        """Re-check placement now and then; move only when the swarm clearly gains (hysteresis in should_move)."""
        while True:
            await asyncio.sleep(period_s * self._rng.uniform(0.75, 1.25))
            hosted = self.hosted
            if hosted is None or self.model_info is None:
                continue
            try:
                view = await fetch_swarm(self.dht, hosted.model, self.model_info.num_blocks)
            except DHTError as e:
                log.warning("rebalance check failed: %s", e)
                continue
            decision = rebalance_target(view, self.identity.peer_id, hosted=(hosted.start, hosted.end), rng=self._rng)
            if decision.target is not None:
                await self._move_to(*decision.target)
            elif decision.skipped:
                log.info("rebalance check skipped: %s", decision.reason)

    async def _move_to(self, start: int, end: int) -> None:
        """Load the new blocks while still serving the old ones, switch, then hand old sessions back."""
        old = self.hosted
        assert old is not None and self._server is not None
        announce = self._announcement_factory(old.model)
        log.info("rebalancing: moving from blocks %d:%d to %d:%d", old.start, old.end, start, end)
        new_keys = _keys(old.model, start, end)
        left = [k for k in _keys(old.model, old.start, old.end) if k not in set(new_keys)]
        await self.dht.store_many(new_keys, announce(ServerState.JOINING, start, end, 0.0, 0))
        hosted, sessions = await self._load(start, end)
        old_sessions = self._server.replace_span(hosted, sessions)
        self.hosted, self._sessions = hosted, sessions
        await self._announce_online(hosted, sessions)
        if left:
            # Readers ignore an announcement found under blocks outside its range, so restating the new one
            # under the old keys takes us off those blocks at once (those records then expire unrefreshed).
            await self.dht.store_many(left, announce(ServerState.ONLINE, start, end, hosted.throughput,
                                                     sessions.free_tokens, hosted.adapters, hosted.span_digest))
        # Old sessions are handed back at their next step; any still idle expire with the old manager.
        self._tasks.spawn(self._retire(old_sessions), name="retire-sessions")

    async def _retire(self, sessions: SessionManager) -> None:
        try:
            await asyncio.sleep(sessions.idle_timeout_s)
        finally:  # also when aclose cancels us (the cancellation propagates)
            sessions.close_all()

    async def _choose_window(
        self, info: ModelInfo, options: ServeOptions, count: int, rng: random.Random
    ) -> tuple[int, int]:
        if options.blocks is not None:
            return options.blocks
        view = await fetch_swarm(self.dht, info.source.name, info.num_blocks)
        return choose_blocks(view, count, own_peer_id=self.identity.peer_id, rng=rng)

    def _announcement_factory(self, model: str) -> Callable[..., bytes]:
        options = self.serve_options
        address = str(self.address)

        def announce(state: ServerState, start: int, end: int, throughput: float, cache_tokens: int,
                     adapters: Collection[str] = (), span_digest: bytes | None = None) -> bytes:
            return Announcement(
                state=state, model=model, start_block=start, end_block=end, throughput=float(throughput),
                cache_tokens_left=int(cache_tokens), addresses=(address,), version=__version__,
                public_name=options.public_name if options else None, adapters=tuple(sorted(adapters)),
                span_digest=span_digest,
            ).to_bytes()

        return announce

    async def _sweep_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SWEEP_PERIOD_S)
            if self._sessions is not None:
                for session_id in self._sessions.expire_idle():
                    log.info("closed idle session %s", session_id)

    async def aclose(self) -> None:
        """Announce OFFLINE, stop serving and release everything. Safe to call more than once.

        Every component is closed even if another fails to close or the caller is cancelled meanwhile.

        Raises:
            CancelledError: the caller was cancelled (after everything was released).
            Exception: the first component that failed to close (the others were still closed, their errors
                logged), so a broken component is not silent.
        """
        await self._aclose(raise_errors=True)

    async def _aclose(self, *, raise_errors: bool) -> None:
        if self._state is NodeState.CLOSED:
            return
        self._set_state(NodeState.CLOSED)
        error: BaseException | None = None
        cancelled = False
        try:
            start_task = self._start_task
            if start_task is not None and start_task is not asyncio.current_task() and not start_task.done():
                # Closing during start: stop the start first, so it creates nothing after the cleanup ran.
                self._closed_during_start = True
                start_task.cancel()
                cancelled = await wait_uncancellable([start_task])
            await self._leave()
        except BaseException as e:
            error = e
        try:
            # An error already propagating (leaving failed, or start failed) must not be hidden by cleanup errors.
            await self._cleanup.aclose(raise_errors=raise_errors and error is None)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException as e:
            error = error or e
        if cancelled and not isinstance(error, asyncio.CancelledError):
            if error is not None:
                log.error("node %s: error while closing", self.identity.peer_id, exc_info=error)
            raise asyncio.CancelledError
        if error is not None:
            raise error

    async def _leave(self) -> None:
        """Stop refreshing, announce OFFLINE (bounded in time) and let in-flight steps finish."""
        if self._refresh is not None:
            self._refresh.cancel()
        if self._server is not None:
            self._server.start_draining()
        announced = ((self.hosted.model, self.hosted.start, self.hosted.end, self.hosted.throughput)
                     if self.hosted is not None else
                     (*self._joining, 0.0) if self._joining is not None else None)
        if announced is not None and self._dht is not None:
            # Also when loading failed after JOINING was stored: otherwise that record lingers for a TTL.
            model, start, end, throughput = announced
            offline = self._announcement_factory(model)(ServerState.OFFLINE, start, end, throughput, 0)
            with contextlib.suppress(Exception):
                async with timeout_scope(self.timeouts.offline_announce, DHTTimeoutError,
                                         "announcing OFFLINE timed out"):
                    await self._dht.store_many(_keys(model, start, end), offline)
        if self._server is not None and self.serve_options is not None:
            # Finish the steps being computed (their replies go out); later steps are handed back.
            await self._server.wait_idle(self.serve_options.drain_timeout_s)


def _span_digest(info: Any, start: int, end: int) -> bytes | None:
    """The content digest of blocks [start, end) (hashed once, then cached next to the weights); None for a
    model description without weights (the simulator's stand-in)."""
    digest = getattr(info, "span_digest", None)
    return digest(start, end) if digest is not None else None


def _keys(model: str, start: int, end: int) -> list[str]:
    return block_keys(model, start, end)


def _check_adapter_specs(specs: tuple[str, ...], compute: ComputeBackend) -> None:
    """Fail before announcing anything if the adapter list cannot be served at all (files are checked at load)."""
    if isinstance(specs, str):
        raise ConfigError(f"adapters must be a tuple of PATH_OR_HUB_ID / NAME=PATH_OR_HUB_ID, not the string {specs!r}")
    if not specs:
        return
    if len(specs) > MAX_ADAPTERS:
        raise ConfigError(f"at most {MAX_ADAPTERS} adapters per server (they are announced), got {len(specs)}")
    if not isinstance(compute, LoraCapableBackend):
        raise ConfigError(f"the compute backend {type(compute).__name__} cannot load LoRA adapters")
    for spec in specs:
        split_adapter_spec(spec)


def _announce_host_for(listen_host: str, bootstrap: Sequence[PeerAddress]) -> str:
    """The address others should dial: the listen host, or for a wildcard the source IP towards a bootstrap."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    # Towards a bootstrap if we have one; otherwise towards a benchmarking-range address (RFC 2544), which only
    # asks the routing table for the default interface. A UDP connect sends nothing; it only picks a route.
    targets = [(peer.host, peer.port) for peer in bootstrap] or [("198.18.0.1", 9)]
    for target in targets:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return probe.getsockname()[0]
    return "127.0.0.1"

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from petalnode.codecs import TensorCodec
from petalnode.dht import DHTNode
from petalnode.errors import (
    ClosedResourceError,
    CodecError,
    DHTError,
    InvalidStateError,
    NoRouteError,
    PetalnodeError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
)
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.node._bans import BanList
from petalnode.node._protocol import (
    ForwardRequest,
    ForwardResult,
    InferenceOpened,
    InferenceResult,
    InferenceStep,
    InfoRequest,
    OpenInference,
    ServerInfo,
)
from petalnode.node._routing import RouteHop, choose_route
from petalnode.node._swarm import fetch_swarm
from petalnode.node._swarm_view import ServerView, SwarmView, describe_runs
from petalnode.transport import RPC, RPCStream, TcpTransport, Transport

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 60.0
OPEN_TIMEOUT_S = 15.0
RTT_PROBE_TIMEOUT_S = 2.0
WAIT_FOR_BLOCKS_S = 60.0
SWARM_VIEW_MAX_AGE_S = 10.0
MAX_FAILOVERS_PER_STEP = 8
# Errors after which a server is banned and routed around. Anything else is a bug on our side and propagates.
HOP_FAILURES = (TransportError, RemoteError, RemoteProtocolError, CodecError, TimeoutError)


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

    def remember(self, hidden: torch.Tensor, start_position: int) -> None:
        if self.inputs is None or start_position == 0:
            self.inputs = hidden
        else:
            self.inputs = torch.cat([self.inputs[:, :start_position], hidden], dim=1)


class SwarmSession:
    """An inference session through a route of servers, with failover."""

    def __init__(self, client: SwarmClient, max_length: int, batch_size: int) -> None:
        self._client = client
        self.max_length = max_length
        self.batch_size = batch_size
        self.hops: list[_Hop] = []
        self.position = 0
        self.reroutes = 0
        self.closed = False

    async def open(self) -> None:
        self.hops = await self._client._open_hops(0, self._client.num_blocks, self.max_length, self.batch_size)

    async def step(self, hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
        """[batch, n, hidden] at positions [start, start + n) through every block; returns the last block's output."""
        if self.closed:
            raise InvalidStateError('cannot step a session in state "closed"')
        start = self.position if start_position is None else start_position
        if not 0 <= start <= self.position:
            raise PetalnodeError(f"cannot step at position {start}: the session holds {self.position} tokens")
        index = 0
        failovers = 0
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                output = await self._client._send_step(hop, hidden, start)
            except HOP_FAILURES as e:
                failovers += 1
                if failovers > MAX_FAILOVERS_PER_STEP:
                    raise
                await self._replace(index, e)
                continue
            hop.remember(hidden, start)
            self._client.bans.succeeded(hop.peer_id)
            hidden = output
            index += 1
        self.position = start + hidden.shape[1]
        return hidden

    async def _replace(self, index: int, error: BaseException) -> None:
        """Swap hop `index` for a fresh route over its blocks and replay its inputs through it."""
        old = self.hops[index]
        duration = self._client.bans.ban(old.peer_id)
        self.reroutes += 1
        log.warning(
            "server %s (blocks %d-%d) failed: %s: %s; banned for %.0f s, rerouting and replaying %d positions",
            old.peer_id, old.start, old.end - 1, type(error).__name__, error, duration,
            0 if old.inputs is None else old.inputs.shape[1],
        )
        with contextlib.suppress(Exception):
            await old.stream.reset("replaced after failure")
        new_hops = await self._client._open_hops(old.start, old.end, self.max_length, self.batch_size)
        replay = old.inputs
        try:
            if replay is not None and replay.shape[1] > 0:
                for hop in new_hops:
                    output = await self._client._send_step(hop, replay, 0)
                    hop.remember(replay, 0)
                    replay = output
        except BaseException:
            for hop in new_hops:
                with contextlib.suppress(Exception):
                    await hop.stream.aclose()
            raise
        self.hops[index : index + 1] = new_hops

    async def aclose(self) -> None:
        self.closed = True
        hops, self.hops = self.hops, []
        for hop in hops:
            with contextlib.suppress(Exception):
                await hop.stream.aclose()


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
        step_timeout_s: float = STEP_TIMEOUT_S,
        wait_for_blocks_s: float = WAIT_FOR_BLOCKS_S,
        identity: Identity | None = None,
        seed: int | None = None,
        transport: Transport | None = None,
        endpoint_factory: Callable[..., Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        listen_host: str = "0.0.0.0",
        dht_options: dict[str, Any] | None = None,
    ) -> None:
        if not bootstrap:
            raise PetalnodeError("a swarm client needs at least one bootstrap address")
        self.model = model
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.codec = TensorCodec(codec)
        self.step_timeout_s = step_timeout_s
        self.wait_for_blocks_s = wait_for_blocks_s
        self.bootstrap = [a if isinstance(a, PeerAddress) else PeerAddress.parse(a) for a in bootstrap]
        self.identity = identity or Identity.generate()
        self.rng = random.Random(seed)
        self.rtt: dict[PeerId, float] = {}
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
        self._closed = False

    async def __aenter__(self) -> SwarmClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.bans = BanList(loop.time)
        self._transport = self._given_transport or TcpTransport(self.identity)
        self._rpc = RPC(self._transport, call_timeout_s=self.step_timeout_s)
        self._dht = DHTNode(self.identity, client_mode=True, endpoint_factory=self._endpoint_factory,
                            wall_clock=self._wall_clock, **self._dht_options)
        try:
            await self._dht.start(listen=(self._listen_host, 0),
                                  bootstrap=[(a.host, a.port) for a in self.bootstrap])
        except DHTError as e:
            names = ", ".join(str(a) for a in self.bootstrap)
            await self.aclose()
            raise DHTError(
                f"no peers reachable at the bootstrap address ({names}): {e}. Check that `petalnode bootstrap` "
                "or a server is running there and that the address is right."
            ) from e

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._rpc is not None:
            await self._rpc.aclose()
        if self._transport is not None:
            await self._transport.aclose()
        if self._dht is not None:
            await self._dht.aclose()

    # -- public ---------------------------------------------------------------------------------------------
    async def open_session(self, max_length: int, *, batch_size: int = 1) -> SwarmSession:
        if self._closed:
            raise ClosedResourceError("the swarm client is closed")
        session = SwarmSession(self, max_length, batch_size)
        await session.open()
        return session

    async def swarm(self) -> SwarmView:
        if self._dht is None:
            raise InvalidStateError("the swarm client is not started")
        return await fetch_swarm(self._dht, self.model, self.num_blocks)

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stateless pass over whole sequences through every block (no cache kept anywhere)."""
        rpc = self._require_rpc()
        for _attempt in range(MAX_FAILOVERS_PER_STEP):
            route = await self._route(0, self.num_blocks, 0)
            current = hidden
            hop = route[0]
            try:
                for hop in route:
                    reply = await rpc.call(
                        _address_of(hop.server), "forward",
                        ForwardRequest(model=self.model, start_block=hop.start, end_block=hop.end, hidden=current),
                        expected=ForwardResult, tensor_codec=self.codec,
                    )
                    if reply.hidden.shape != current.shape:
                        raise RemoteProtocolError(f"server {hop.peer_id} replied with the wrong shape")
                    current = reply.hidden.to(self.dtype)
                return current
            except HOP_FAILURES as e:
                log.warning("forward through %s failed (%s); rerouting", hop.peer_id, e)
                self.bans.ban(hop.peer_id)
        raise NoRouteError(f"forward through {self.model} failed {MAX_FAILOVERS_PER_STEP} times", missing=[])

    # -- internals ------------------------------------------------------------------------------------------
    def _require_rpc(self) -> RPC:
        if self._rpc is None or self._closed:
            raise ClosedResourceError("the swarm client is not running")
        return self._rpc

    async def _route(self, start: int, end: int, min_cache_tokens: int) -> list[RouteHop]:
        """A route over [start, end), waiting up to `wait_for_blocks_s` for missing blocks to get a server."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_for_blocks_s
        reported = None
        fresh = False
        while True:
            # A recent view is reused: after a failure, rerouting must not wait on a DHT lookup that may itself
            # be slowed by the very peer that just failed. A view that yields no route is refreshed first.
            if fresh or self._view is None or loop.time() - self._view_at > SWARM_VIEW_MAX_AGE_S:
                self._view, self._view_at = await self.swarm(), loop.time()
                fresh = True
            view = self._view
            await self._probe_rtts(view)
            try:
                return choose_route(
                    view, start=start, end=end, rtt_s=self.rtt, banned=self.bans.banned(),
                    min_cache_tokens=min_cache_tokens, rng=self.rng, model=self.model,
                )
            except NoRouteError as e:
                if not fresh:
                    fresh = True
                    continue
                if loop.time() >= deadline:
                    first = e.missing[0] if e.missing else (start, end)
                    raise NoRouteError(
                        f"{e}; waited {self.wait_for_blocks_s:.0f} s. Start one with: petalnode join --bootstrap "
                        f"{self.bootstrap[0]} --model {self.model} --blocks {first[0]}:{first[1]}",
                        missing=e.missing,
                    ) from None
                if reported != e.missing:
                    reported = e.missing
                    log.warning("waiting for servers: %s of %s have no available server", describe_runs(e.missing),
                                self.model)
                await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    async def _probe_rtts(self, view: SwarmView) -> None:
        """Measure round-trip times to servers not measured yet (an `info` call each, concurrently)."""
        rpc = self._require_rpc()
        unknown = [s for s in view.servers.values() if s.peer_id not in self.rtt and s.addresses][:16]

        async def probe(server: ServerView) -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await rpc.call(_address_of(server), "info", InfoRequest(), expected=ServerInfo,
                               timeout_s=RTT_PROBE_TIMEOUT_S)
                self.rtt[server.peer_id] = loop.time() - started
            except (PetalnodeError, OSError) as e:
                log.debug("rtt probe of %s failed: %s", server.peer_id, e)

        await asyncio.gather(*(probe(s) for s in unknown))

    async def _open_hops(self, start: int, end: int, max_length: int, batch_size: int) -> list[_Hop]:
        """Open inference streams along a route over [start, end), rerouting around servers that refuse."""
        for _attempt in range(MAX_FAILOVERS_PER_STEP):
            route = await self._route(start, end, max_length * batch_size)
            hops: list[_Hop] = []
            try:
                for step in route:
                    hops.append(await self._open_hop(step, max_length, batch_size))
                return hops
            except HOP_FAILURES as e:
                failed = route[len(hops)]
                self.bans.ban(failed.peer_id)
                log.warning("server %s refused a session (%s: %s); rerouting", failed.peer_id, type(e).__name__, e)
                for hop in hops:
                    with contextlib.suppress(Exception):
                        await hop.stream.aclose()
        raise NoRouteError(f"could not open a session through blocks {start}-{end - 1} of {self.model} after "
                           f"{MAX_FAILOVERS_PER_STEP} attempts", missing=[(start, end)])

    async def _open_hop(self, step: RouteHop, max_length: int, batch_size: int) -> _Hop:
        rpc = self._require_rpc()
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            stream = await rpc.open_stream(_address_of(step.server), "inference",
                                           expected=(InferenceOpened, InferenceResult))
            try:
                await stream.send(OpenInference(
                    model=self.model, start_block=step.start, end_block=step.end, max_length=max_length,
                    batch_size=batch_size, reply_codec=self.codec.value,
                ))
                opened = await stream.receive()
                if not isinstance(opened, InferenceOpened):
                    raise RemoteProtocolError(f"expected InferenceOpened from {step.peer_id}, got {type(opened)}")
            except BaseException:
                with contextlib.suppress(Exception):
                    await stream.reset("open failed")
                raise
        return _Hop(peer_id=step.peer_id, start=step.start, end=step.end, stream=stream)

    async def _send_step(self, hop: _Hop, hidden: torch.Tensor, start: int) -> torch.Tensor:
        await hop.stream.send(InferenceStep(hidden=hidden.contiguous(), start_position=start),
                              tensor_codec=self.codec)
        reply = await hop.stream.receive(timeout_s=self.step_timeout_s)
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
        return out.to(self.dtype)


def _address_of(server: ServerView) -> PeerAddress:
    """The server's first announced address, pinned to the peer id it announced under (so nobody can redirect us)."""
    for text in server.addresses:
        with contextlib.suppress(PetalnodeError):
            address = PeerAddress.parse(text)
            return address.with_peer_id(server.peer_id)
    raise RemoteProtocolError(f"server {server.peer_id} announced no usable address")

"""The swarm client: a `BlockChain` whose spans are servers found through the DHT.

transformers' `generate` is synchronous, so the client runs its own event loop in a background thread and the
synchronous methods submit coroutines to it. The loop owns the transport, RPC and a client-mode DHT node.

Fault tolerance (the part Petals gets wrong): every hop of an inference session keeps the hidden states it was
sent for positions [0, position). When a hop fails (connection lost, heartbeat missed, timeout, typed error,
busy, a reply of the wrong shape), the client bans that server with exponential backoff, routes a replacement
for exactly that hop's blocks (possibly several servers), replays the kept inputs through the replacement to
rebuild its caches, and retries the step. Positions are explicit in every step, so a replacement continues at
the exact position, and greedy output is identical to a run without failures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from petalnode.codecs import TensorCodec
from petalnode.compute import ModelInfo
from petalnode.dht import DHTNode
from petalnode.errors import (
    ClosedResourceError,
    CodecError,
    DHTError,
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
from petalnode.node._swarm_view import SwarmView, describe_runs
from petalnode.transport import RPC, RPCStream, TcpTransport

log = logging.getLogger(__name__)
T = TypeVar("T")

STEP_TIMEOUT_S = 60.0
OPEN_TIMEOUT_S = 15.0
RTT_PROBE_TIMEOUT_S = 2.0
WAIT_FOR_BLOCKS_S = 60.0
MAX_FAILOVERS_PER_STEP = 8
# Errors after which a server is banned and routed around. Anything else is a bug on our side and propagates.
HOP_FAILURES = (TransportError, RemoteError, RemoteProtocolError, CodecError, TimeoutError)


class _LoopThread:
    """An event loop in a daemon thread; `run` submits a coroutine and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="petalnode-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"client operation took longer than {timeout_s} s") from None
        except KeyboardInterrupt:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


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


class RemoteChainSession:
    """An inference session through a route of servers, with failover. Synchronous facade."""

    def __init__(self, chain: RemoteBlockChain, max_length: int, batch_size: int) -> None:
        self._chain = chain
        self.max_length = max_length
        self.batch_size = batch_size
        self.hops: list[_Hop] = []
        self._position = 0
        self.reroutes = 0
        self.closed = False

    @property
    def position(self) -> int:
        return self._position

    def step(self, hidden_states: torch.Tensor, *, start_position: int | None = None) -> torch.Tensor:
        start = self._position if start_position is None else start_position
        return self._chain._loop.run(self._step(hidden_states, start))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._chain._loop.run(self._aclose(), timeout_s=10)

    # -- async internals --------------------------------------------------------------------------------------
    async def _open(self) -> None:
        self.hops = await self._chain._open_hops(0, self._chain.num_blocks, self.max_length, self.batch_size)

    async def _step(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        if not 0 <= start <= self._position:
            raise PetalnodeError(f"cannot step at position {start}: the session holds {self._position} tokens")
        index = 0
        failovers = 0
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                output = await self._chain._send_step(hop, hidden, start)
            except HOP_FAILURES as e:
                failovers += 1
                if failovers > MAX_FAILOVERS_PER_STEP:
                    raise
                await self._replace(index, e)
                continue
            hop.remember(hidden, start)
            self._chain._bans.succeeded(hop.peer_id)
            hidden = output
            index += 1
        self._position = start + hidden.shape[1]
        return hidden

    async def _replace(self, index: int, error: BaseException) -> None:
        """Swap hop `index` for a fresh route over its blocks and replay its inputs through it."""
        old = self.hops[index]
        duration = self._chain._bans.ban(old.peer_id)
        self.reroutes += 1
        print(
            f"petalnode: server {old.peer_id} (blocks {old.start}-{old.end - 1}) failed: "
            f"{type(error).__name__}: {error}; banned for {duration:.0f} s, rerouting",
            file=sys.stderr, flush=True,
        )
        with contextlib.suppress(Exception):
            await old.stream.reset("replaced after failure")
        new_hops = await self._chain._open_hops(old.start, old.end, self.max_length, self.batch_size)
        replay = old.inputs
        try:
            if replay is not None and replay.shape[1] > 0:
                for hop in new_hops:
                    output = await self._chain._send_step(hop, replay, 0)
                    hop.remember(replay, 0)
                    replay = output
        except BaseException:
            for hop in new_hops:
                with contextlib.suppress(Exception):
                    await hop.stream.aclose()
            raise
        self.hops[index : index + 1] = new_hops

    async def _aclose(self) -> None:
        for hop in self.hops:
            with contextlib.suppress(Exception):
                await hop.stream.aclose()
        self.hops = []


class RemoteBlockChain:
    """All blocks of a model, served by a swarm. Implements `petalnode.client.BlockChain`."""

    def __init__(
        self,
        info: ModelInfo,
        bootstrap: Sequence[str | PeerAddress],
        *,
        dtype: torch.dtype = torch.float32,
        codec: TensorCodec = TensorCodec.RAW,
        step_timeout_s: float = STEP_TIMEOUT_S,
        wait_for_blocks_s: float = WAIT_FOR_BLOCKS_S,
        identity: Identity | None = None,
        seed: int | None = None,
    ) -> None:
        if not bootstrap:
            raise PetalnodeError("a swarm client needs at least one bootstrap address")
        self.info = info
        self.model = info.source.name
        self.num_blocks = info.num_blocks
        self.dtype = dtype
        self.codec = TensorCodec(codec)
        self.step_timeout_s = step_timeout_s
        self.wait_for_blocks_s = wait_for_blocks_s
        self.bootstrap = [a if isinstance(a, PeerAddress) else PeerAddress.parse(a) for a in bootstrap]
        self.identity = identity or Identity.generate()
        self._rng = random.Random(seed)
        self._loop = _LoopThread()
        self._bans = BanList(self._loop.loop.time)
        self._rtt: dict[PeerId, float] = {}
        self._transport: TcpTransport | None = None
        self._rpc: RPC | None = None
        self._dht: DHTNode | None = None
        self._closed = False

    @classmethod
    def connect(cls, info: ModelInfo, *, bootstrap: Sequence[str | PeerAddress], **options: Any) -> RemoteBlockChain:
        chain = cls(info, bootstrap, **options)
        try:
            chain._loop.run(chain._astart(), timeout_s=60)
        except BaseException:
            chain.close()
            raise
        return chain

    async def _astart(self) -> None:
        self._transport = TcpTransport(self.identity)
        self._rpc = RPC(self._transport, call_timeout_s=self.step_timeout_s)
        self._dht = DHTNode(self.identity, client_mode=True)
        try:
            await self._dht.start(listen=("0.0.0.0", 0), bootstrap=[(a.host, a.port) for a in self.bootstrap])
        except DHTError as e:
            names = ", ".join(str(a) for a in self.bootstrap)
            raise DHTError(
                f"no peers reachable at the bootstrap address ({names}): {e}. Check that `petalnode bootstrap` "
                "or a server is running there and that the address is right."
            ) from e

    # -- BlockChain ---------------------------------------------------------------------------------------------
    def open_session(self, max_length: int, *, batch_size: int = 1) -> RemoteChainSession:
        if self._closed:
            raise ClosedResourceError("the swarm client is closed")
        session = RemoteChainSession(self, max_length, batch_size)
        self._loop.run(session._open())
        return session

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._loop.run(self._forward(hidden_states))

    def swarm(self) -> SwarmView:
        return self._loop.run(self._swarm())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.run(self._aclose(), timeout_s=10)
        self._loop.close()

    # -- async internals ------------------------------------------------------------------------------------
    async def _aclose(self) -> None:
        if self._rpc is not None:
            await self._rpc.aclose()
        if self._transport is not None:
            await self._transport.aclose()
        if self._dht is not None:
            await self._dht.aclose()

    async def _swarm(self) -> SwarmView:
        assert self._dht is not None
        return await fetch_swarm(self._dht, self.model, self.num_blocks)

    async def _route(self, start: int, end: int, min_cache_tokens: int) -> list[RouteHop]:
        """A route over [start, end), waiting up to `wait_for_blocks_s` for missing blocks to get a server."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_for_blocks_s
        reported = None
        while True:
            view = await self._swarm()
            await self._probe_rtts(view)
            try:
                return choose_route(
                    view, start=start, end=end, rtt_s=self._rtt, banned=self._bans.banned(),
                    min_cache_tokens=min_cache_tokens, rng=self._rng, model=self.model,
                )
            except NoRouteError as e:
                if loop.time() >= deadline:
                    raise NoRouteError(
                        f"{e}; waited {self.wait_for_blocks_s:.0f} s. Start one with: petalnode join --bootstrap "
                        f"{self.bootstrap[0]} --model {self.model} --blocks {e.missing[0][0]}:{e.missing[0][1]}",
                        missing=e.missing,
                    ) from None
                if reported != e.missing:
                    reported = e.missing
                    print(f"petalnode: waiting for servers: {describe_runs(e.missing)} of {self.model} have no "
                          f"available server", file=sys.stderr, flush=True)
                await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    async def _probe_rtts(self, view: SwarmView) -> None:
        """Measure round-trip times to servers not measured yet (an `info` call each, concurrently)."""
        assert self._rpc is not None
        rpc = self._rpc
        unknown = [s for s in view.servers.values() if s.peer_id not in self._rtt and s.addresses][:16]

        async def probe(server) -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                address = PeerAddress.parse(server.addresses[0])
                await rpc.call(address, "info", InfoRequest(), expected=ServerInfo, timeout_s=RTT_PROBE_TIMEOUT_S)
                self._rtt[server.peer_id] = loop.time() - started
            except (PetalnodeError, OSError) as e:
                log.debug("rtt probe of %s failed: %s", server.peer_id, e)

        await asyncio.gather(*(probe(s) for s in unknown))

    async def _open_hops(self, start: int, end: int, max_length: int, batch_size: int) -> list[_Hop]:
        """Open inference streams along a route over [start, end), rerouting around servers that refuse."""
        assert self._rpc is not None
        for _attempt in range(MAX_FAILOVERS_PER_STEP):
            route = await self._route(start, end, max_length * batch_size)
            hops: list[_Hop] = []
            try:
                for step in route:
                    hops.append(await self._open_hop(step, max_length, batch_size))
                return hops
            except HOP_FAILURES as e:
                failed = route[len(hops)]
                self._bans.ban(failed.peer_id)
                log.warning("server %s refused a session (%s: %s); rerouting", failed.peer_id, type(e).__name__, e)
                for hop in hops:
                    with contextlib.suppress(Exception):
                        await hop.stream.aclose()
        raise NoRouteError(f"could not open a session through blocks {start}-{end - 1} of {self.model} after "
                           f"{MAX_FAILOVERS_PER_STEP} attempts", missing=[(start, end)])

    async def _open_hop(self, step: RouteHop, max_length: int, batch_size: int) -> _Hop:
        assert self._rpc is not None
        address = PeerAddress.parse(step.server.addresses[0])
        if address.peer_id is None:
            address = address.with_peer_id(step.peer_id)
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            stream = await self._rpc.open_stream(address, "inference", expected=(InferenceOpened, InferenceResult))
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

    async def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self._rpc is not None
        for _attempt in range(MAX_FAILOVERS_PER_STEP):
            route = await self._route(0, self.num_blocks, 0)
            current = hidden
            try:
                for step in route:
                    address = PeerAddress.parse(step.server.addresses[0])
                    reply = await self._rpc.call(
                        address, "forward",
                        ForwardRequest(model=self.model, start_block=step.start, end_block=step.end, hidden=current),
                        expected=ForwardResult, tensor_codec=self.codec,
                    )
                    if reply.hidden.shape != current.shape:
                        raise RemoteProtocolError(f"server {step.peer_id} replied with the wrong shape")
                    current = reply.hidden.to(self.dtype)
                return current
            except HOP_FAILURES as e:
                log.warning("forward through %s failed (%s); rerouting", step.peer_id, e)
                self._bans.ban(step.peer_id)
        raise NoRouteError(f"forward through {self.model} failed {MAX_FAILOVERS_PER_STEP} times", missing=[])

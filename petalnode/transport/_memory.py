# In-process network for tests and the churn simulator: hosts, links, datagrams and stream connections.
#
# Invariants:
# - Only the event loop's clock is used (loop.time(), loop.call_at, asyncio.sleep), never time.time() or
#   time.monotonic(), so the simulator can run everything under a virtual-clock loop.
# - Each direction of a link is one FIFO queue: a frame or datagram of n bytes leaves after the bytes queued
#   before it (n / bandwidth) and arrives `latency_s` later; arrival order equals send order.
# - `loss` applies to datagrams only. Stream frames are reliable (as TCP would be after retransmission), so
#   loss is not modelled for them; use `latency_s`/`bandwidth_bytes_per_s` to make a lossy link slow instead.
# - A partitioned host neither sends nor receives datagrams (dropped); its stream frames are held and
#   delivered on `heal`, like a TCP connection stalled by a cable pull; new dials to or from it time out.
# - `kill(host)` is a crash: every listener, connection and datagram endpoint of the host closes at once and
#   peers see `ConnectionClosedError`. The host may be reused afterwards (a restarted node).

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from petalnode.errors import ConfigError
from petalnode.identity import Identity
from petalnode.transport._base import ConnectionConfig
from petalnode.transport._memory_transport import MemoryTransport

log = logging.getLogger(__name__)

# Ephemeral ports as in IANA's dynamic range (RFC 6335 section 6).
_FIRST_EPHEMERAL_PORT = 49152
_LAST_PORT = 65535
# The largest UDP payload over IPv4.
MAX_DATAGRAM_BYTES = 65507

Address = tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig:
    """One direction of a link between two hosts (the network applies it both ways unless told otherwise).

    Args:
        latency_s: one-way delay added to every frame and datagram.
        bandwidth_bytes_per_s: serialisation rate; None means unlimited.
        loss: probability that a datagram is dropped (streams are reliable and ignore it).
    """

    latency_s: float = 0.0
    bandwidth_bytes_per_s: float | None = None
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ConfigError(f"latency_s must be >= 0, got {self.latency_s}")
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s <= 0:
            raise ConfigError(f"bandwidth_bytes_per_s must be > 0 or None, got {self.bandwidth_bytes_per_s}")
        if not 0.0 <= self.loss <= 1.0:
            raise ConfigError(f"loss must be in [0, 1], got {self.loss}")


class _LinkDirection:
    """The FIFO of one direction of a link; delivers callbacks at their arrival time, in order."""

    def __init__(self, network: MemoryNetwork, src: str, dst: str) -> None:
        self._network = network
        self.src = src
        self.dst = dst
        self._busy_until = 0.0
        self._last_arrival = 0.0
        self._queue: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self, nbytes: int, deliver: Callable[[], None]) -> float:
        """Queue `deliver` to run when `nbytes` sent now would arrive; returns when sending finishes."""
        config = self._network.link(self.src, self.dst)
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._busy_until)
        wire_s = nbytes / config.bandwidth_bytes_per_s if config.bandwidth_bytes_per_s else 0.0
        self._busy_until = start + wire_s
        # max() keeps FIFO order even if the latency of the link is lowered while frames are in flight.
        arrival = max(self._busy_until + config.latency_s, self._last_arrival)
        self._last_arrival = arrival
        self._queue.append((arrival, deliver))
        if self._timer is None:
            self._timer = loop.call_at(arrival, self._drain)
        return self._busy_until

    def _drain(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._queue and self._queue[0][0] <= now:
            _, deliver = self._queue.popleft()
            try:
                deliver()
            except Exception:
                log.exception("memory network: delivery callback failed on %s -> %s", self.src, self.dst)
        if self._queue:
            self._timer = loop.call_at(self._queue[0][0], self._drain)

    def clear(self) -> None:
        """Drop everything in flight (a host died)."""
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class MemoryDatagramTransport(asyncio.DatagramTransport):
    """What `MemoryNetwork.create_datagram_endpoint` returns: the asyncio UDP transport surface, in memory."""

    def __init__(self, network: MemoryNetwork, address: Address, protocol: asyncio.DatagramProtocol) -> None:
        super().__init__()
        self._network = network
        self._address = address
        self._protocol = protocol
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return  # like asyncio: writing to a closed UDP transport is silently ignored
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        valid = isinstance(addr, tuple) and len(addr) >= 2
        if not (valid and isinstance(addr[0], str) and isinstance(addr[1], int)):
            raise ValueError(f"a memory datagram needs a (host, port) address, got {addr!r}")
        payload = bytes(data)
        if len(payload) > MAX_DATAGRAM_BYTES:
            self._protocol.error_received(OSError(errno.EMSGSIZE, "Message too long"))
            return
        self._network._send_datagram(self._address, (addr[0], addr[1]), payload)

    def _deliver(self, data: bytes, src: Address) -> None:
        if not self._closing:
            self._protocol.datagram_received(data, src)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._address
        if name == "peername":
            return None
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._network._unbind_datagram(self._address, self)
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closing" if self._closing else ""
        return f"<MemoryDatagramTransport {self._address[0]}:{self._address[1]}{state}>"


class MemoryNetwork:
    """A simulated network of named hosts. One instance per test or simulation; it holds no tasks."""

    def __init__(self, default_link: LinkConfig | None = None, *, seed: int = 0) -> None:
        self.default_link = default_link or LinkConfig()
        self._links: dict[tuple[str, str], LinkConfig] = {}
        self._directions: dict[tuple[str, str], _LinkDirection] = {}
        # host -> the directions it is an end of, so a kill touches only its own links (not every pair of a swarm)
        self._directions_of: dict[str, list[_LinkDirection]] = {}
        self._random = random.Random(seed)
        self._partitioned: set[str] = set()
        self._datagram_endpoints: dict[Address, MemoryDatagramTransport] = {}
        self._stream_listeners: dict[Address, Any] = {}
        self._next_port: dict[tuple[str, str], int] = {}
        # Everything a host owns that must close when it is killed; filled by the stream transport too.
        self._kill_hooks: dict[str, list[Callable[[], None]]] = collections.defaultdict(list)
        # Stream frames held while a host is partitioned: (direction, nbytes, deliver).
        self._held: list[tuple[_LinkDirection, int, Callable[[], None]]] = []
        self._heal_waiters: list[asyncio.Future[None]] = []
        # Datagrams handed to the network (lost ones included): what a DHT lookup or store costs, for benchmarks.
        self.datagrams_sent = 0
        self.datagram_bytes_sent = 0

    # ---- links and faults -------------------------------------------------------------------------------

    def set_link(self, a: str, b: str, config: LinkConfig, *, both_ways: bool = True) -> None:
        """Configure the link a -> b (and b -> a unless `both_ways` is False)."""
        self._links[(a, b)] = config
        if both_ways:
            self._links[(b, a)] = config

    def link(self, src: str, dst: str) -> LinkConfig:
        return self._links.get((src, dst), self.default_link)

    def partition(self, host: str) -> None:
        """Cut `host` off from every other host until `heal(host)`."""
        self._partitioned.add(host)

    def heal(self, host: str) -> None:
        self._partitioned.discard(host)
        still_held = []
        for direction, nbytes, deliver in self._held:
            if self._reachable(direction.src, direction.dst):
                direction.schedule(nbytes, deliver)
            else:
                still_held.append((direction, nbytes, deliver))
        self._held = still_held
        waiters, self._heal_waiters = self._heal_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def is_partitioned(self, host: str) -> bool:
        return host in self._partitioned

    def kill(self, host: str) -> None:
        """Crash `host`: close all its endpoints, listeners and connections now."""
        hooks = self._kill_hooks.pop(host, [])
        for endpoint in [e for a, e in self._datagram_endpoints.items() if a[0] == host]:
            endpoint.close()
        for hook in hooks:
            hook()
        for direction in self._directions_of.get(host, ()):
            direction.clear()
        self._held = [h for h in self._held if host not in (h[0].src, h[0].dst)]

    async def _wait_reachable(self, src: str, dst: str) -> None:
        while not self._reachable(src, dst):
            waiter = asyncio.get_running_loop().create_future()
            self._heal_waiters.append(waiter)
            await waiter

    def _reachable(self, src: str, dst: str) -> bool:
        return src == dst or (src not in self._partitioned and dst not in self._partitioned)

    def _direction(self, src: str, dst: str) -> _LinkDirection:
        direction = self._directions.get((src, dst))
        if direction is None:
            direction = self._directions[(src, dst)] = _LinkDirection(self, src, dst)
            self._directions_of.setdefault(src, []).append(direction)
            if dst != src:
                self._directions_of.setdefault(dst, []).append(direction)
        return direction

    def _send_reliable(self, src: str, dst: str, nbytes: int, deliver: Callable[[], None]) -> float:
        """Queue a stream frame; returns the loop time at which the sender's bytes are on the wire."""
        direction = self._direction(src, dst)
        if not self._reachable(src, dst):
            self._held.append((direction, nbytes, deliver))
            return asyncio.get_running_loop().time()
        return direction.schedule(nbytes, deliver)

    def _on_kill(self, host: str, hook: Callable[[], None]) -> Callable[[], None]:
        """Register `hook` to run if `host` is killed; returns a function that unregisters it."""
        hooks = self._kill_hooks[host]
        hooks.append(hook)

        def remove() -> None:
            if hook in hooks:
                hooks.remove(hook)

        return remove

    def _allocate_port(self, kind: str, host: str, taken: dict[Address, Any]) -> int:
        key = (kind, host)
        start = self._next_port.get(key, _FIRST_EPHEMERAL_PORT)
        span = _LAST_PORT - _FIRST_EPHEMERAL_PORT + 1
        for i in range(span):
            port = _FIRST_EPHEMERAL_PORT + (start - _FIRST_EPHEMERAL_PORT + i) % span
            if (host, port) not in taken:
                self._next_port[key] = port + 1 if port < _LAST_PORT else _FIRST_EPHEMERAL_PORT
                return port
        raise OSError(errno.EADDRINUSE, f"no free {kind} port on memory host {host!r}")

    # ---- datagrams (the DHT's UDP) -----------------------------------------------------------------------

    async def create_datagram_endpoint(
        self, protocol_factory: Callable[[], asyncio.DatagramProtocol], local_addr: tuple[str, int]
    ) -> tuple[MemoryDatagramTransport, asyncio.DatagramProtocol]:
        """Bind a UDP-like endpoint at `local_addr` (port 0 picks a free port), like
        `loop.create_datagram_endpoint(protocol_factory, local_addr=...)`.

        Raises:
            OSError: EADDRINUSE if the port is taken, as a real socket would.
        """
        host, port = local_addr
        if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 <= port <= _LAST_PORT:
            raise ValueError(f"local_addr must be (host, port), got {local_addr!r}")
        if port == 0:
            port = self._allocate_port("udp", host, self._datagram_endpoints)
        elif (host, port) in self._datagram_endpoints:
            raise OSError(errno.EADDRINUSE, f"address already in use: {host}:{port}")
        protocol = protocol_factory()
        transport = MemoryDatagramTransport(self, (host, port), protocol)
        self._datagram_endpoints[(host, port)] = transport
        protocol.connection_made(transport)
        return transport, protocol

    def _unbind_datagram(self, address: Address, endpoint: MemoryDatagramTransport) -> None:
        if self._datagram_endpoints.get(address) is endpoint:
            del self._datagram_endpoints[address]

    def _send_datagram(self, src: Address, dst: Address, data: bytes) -> None:
        self.datagrams_sent += 1
        self.datagram_bytes_sent += len(data)
        if not self._reachable(src[0], dst[0]):
            return
        config = self.link(src[0], dst[0])
        if config.loss and self._random.random() < config.loss:
            return

        def deliver() -> None:
            # Looked up at arrival: a datagram to a port nobody binds (any more) is silently lost, as in UDP.
            endpoint = self._datagram_endpoints.get(dst)
            if endpoint is not None and self._reachable(src[0], dst[0]):
                endpoint._deliver(data, src)

        self._direction(src[0], dst[0]).schedule(len(data), deliver)

    # ---- stream transports -------------------------------------------------------------------------------

    def transport(
        self, identity: Identity, host: str, *, config: ConnectionConfig | None = None
    ) -> MemoryTransport:
        """A `Transport` (scheme "memory") for `identity` on `host`."""
        return MemoryTransport(self, identity, host, config=config)

# The in-memory stream transport: the same `Transport` interface as TCP, over a `MemoryNetwork`.
#
# Invariants:
# - Frames go through the network's per-link FIFO (latency, bandwidth, partition); the shared multiplexer on top
#   does chunking and flow control exactly as over TCP.
# - There is no cryptographic handshake: both ends live in one process, so the dialled peer's identity is known
#   directly. The peer-id check (`PeerIdMismatchError`) and connect timeout still apply, and dialling costs two
#   round trips of simulated time (TCP connect plus handshake).
# - A killed host's connections close at once on both ends; dials to a partitioned host time out; dials to a
#   port nobody listens on are refused.

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

from petalnode.errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    LocalProtocolError,
    PeerIdMismatchError,
    TransportError,
)
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.transport._base import CONNECT_TIMEOUT_S, ConnectionConfig, ConnectionHandler
from petalnode.transport._frames import HEADER_BYTES
from petalnode.transport._lifecycle_base import TransportLifecycle
from petalnode.transport._mux import MuxConnection

if TYPE_CHECKING:
    from petalnode.transport._memory import MemoryNetwork

log = logging.getLogger(__name__)

SCHEME = "memory"
# Connect (SYN/SYN-ACK) plus the handshake, in round trips.
_DIAL_ROUND_TRIPS = 2


class _MemoryChannelEnd:
    """One end of an in-memory frame pipe (implements `FrameChannel`)."""

    def __init__(self, network: MemoryNetwork, local_host: str, remote_host: str, max_frame_bytes: int) -> None:
        self._network = network
        self._local_host = local_host
        self._remote_host = remote_host
        self.max_frame_bytes = max_frame_bytes
        self.peer: _MemoryChannelEnd | None = None
        self._inbox: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._closed = False  # we closed (or were aborted): no more writes or reads
        self._eof = False  # the peer's close arrived (after all its frames)
        self._wire_free_at = 0.0

    def write_frame(self, frame: bytes) -> None:
        if self._closed or self.peer is None:
            raise ConnectionClosedError("memory connection is closed")
        if len(frame) > self.max_frame_bytes:
            raise LocalProtocolError(f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.max_frame_bytes}")
        peer = self.peer
        self._wire_free_at = self._network._send_reliable(
            self._local_host, self._remote_host, len(frame), lambda: peer._on_frame(frame)
        )

    async def drain(self) -> None:
        # A socket with a small send buffer: the writer waits until its bytes are on the wire.
        delay = self._wire_free_at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._closed:
            raise ConnectionClosedError("memory connection is closed")

    async def receive_frame(self) -> bytes:
        while not self._inbox:
            if self._closed or self._eof:
                raise ConnectionClosedError("memory connection closed by peer" if self._eof else "closed")
            self._readable.clear()
            await self._readable.wait()
        return self._inbox.popleft()

    def _on_frame(self, frame: bytes) -> None:
        if not self._closed:
            self._inbox.append(frame)
            self._readable.set()

    def _on_eof(self) -> None:
        self._eof = True
        self._readable.set()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.clear()
        self._readable.set()
        peer = self.peer
        if peer is not None:
            # The FIN travels behind the frames already in flight.
            self._network._send_reliable(self._local_host, self._remote_host, 0, peer._on_eof)

    def abort(self) -> None:
        """Both ends die now (a crashed host)."""
        for end in (self, self.peer):
            if end is not None:
                end._closed = True
                end._inbox.clear()
                end._readable.set()


def _pipe(
    network: MemoryNetwork, a: str, b: str, max_frame_bytes: int
) -> tuple[_MemoryChannelEnd, _MemoryChannelEnd]:
    end_a = _MemoryChannelEnd(network, a, b, max_frame_bytes)
    end_b = _MemoryChannelEnd(network, b, a, max_frame_bytes)
    end_a.peer, end_b.peer = end_b, end_a
    return end_a, end_b


class MemoryListener:
    """A listening memory port (implements `Listener`)."""

    def __init__(self, transport: MemoryTransport, address: PeerAddress, handler: ConnectionHandler) -> None:
        self._transport = transport
        self._address = address
        self.handler = handler
        self.closed = False

    @property
    def address(self) -> PeerAddress:
        return self._address

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._transport._unlisten(self)

    async def __aenter__(self) -> MemoryListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class MemoryTransport(TransportLifecycle):
    """`Transport` over a `MemoryNetwork` for one identity on one host; an async context manager."""

    scheme = SCHEME

    def __init__(
        self, network: MemoryNetwork, identity: Identity, host: str, *, config: ConnectionConfig | None = None
    ) -> None:
        self._network = network
        self._identity = identity
        self.host = host
        self.config = config or ConnectionConfig()
        self._init_lifecycle(f"memory transport {host}")
        self._connections: dict[MuxConnection, _MemoryChannelEnd] = {}
        self._unregister_kill = network._on_kill(host, self._on_killed)

    @property
    def local_peer_id(self) -> PeerId:
        return self._identity.peer_id

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.host} {self._identity.peer_id}>"

    async def listen(self, handler: ConnectionHandler, *, host: str | None = None, port: int = 0) -> MemoryListener:
        """Listen on this transport's host (`host`, if given, must equal it); port 0 picks a free port."""
        self._check_open()
        if host is not None and host != self.host:
            raise TransportError(f"memory transport on {self.host!r} cannot listen on host {host!r}")
        taken = self._network._stream_listeners
        if port == 0:
            port = self._network._allocate_port("tcp", self.host, taken)
        elif (self.host, port) in taken:
            raise TransportError(f"address already in use: memory://{self.host}:{port}")
        address = PeerAddress(SCHEME, self.host, port, self._identity.peer_id)
        listener = MemoryListener(self, address, handler)
        taken[(self.host, port)] = listener
        self._listeners.append(listener)
        return listener

    def _unlisten(self, listener: MemoryListener) -> None:
        key = (listener.address.host, listener.address.port)
        if self._network._stream_listeners.get(key) is listener:
            del self._network._stream_listeners[key]
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def dial(self, address: PeerAddress, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> MuxConnection:
        self._check_open()
        if address.scheme != SCHEME:
            raise TransportError(f"memory transport cannot dial {address} (scheme {address.scheme!r})")
        network = self._network
        try:
            async with asyncio.timeout(connect_timeout_s):
                # A partitioned path drops SYNs: wait (the timeout ends it) until it heals.
                await network._wait_reachable(self.host, address.host)
                forth, back = network.link(self.host, address.host), network.link(address.host, self.host)
                await asyncio.sleep(_DIAL_ROUND_TRIPS * (forth.latency_s + back.latency_s))
                listener = network._stream_listeners.get((address.host, address.port))
                if listener is None or listener.closed:
                    raise TransportError(f"connection refused by {address}")
                await network._wait_reachable(self.host, address.host)
        except TimeoutError:
            raise ConnectTimeoutError(f"dialling {address} took longer than {connect_timeout_s} s") from None
        self._check_open()
        server = listener._transport
        remote_id = server.local_peer_id
        if address.peer_id is not None and address.peer_id != remote_id:
            raise PeerIdMismatchError(f"{address} is peer {remote_id}, not {address.peer_id}")
        max_frame = self.config.chunk_bytes + HEADER_BYTES
        local_end, remote_end = _pipe(network, self.host, address.host, max_frame)
        client_conn = self._adopt(local_end, initiator=True, remote_id=remote_id, remote_address=address)
        server_conn = server._adopt(remote_end, initiator=False, remote_id=self.local_peer_id, remote_address=None)
        server._run_handler(listener, server_conn)
        return client_conn

    def _adopt(
        self, end: _MemoryChannelEnd, *, initiator: bool, remote_id: PeerId, remote_address: PeerAddress | None
    ) -> MuxConnection:
        connection = MuxConnection(
            end,
            initiator=initiator,
            local_peer_id=self.local_peer_id,
            remote_peer_id=remote_id,
            remote_address=remote_address,
            config=self.config,
            on_closed=self._forget_connection,
        )
        self._connections[connection] = end
        connection.start()
        return connection

    def _forget_connection(self, connection: MuxConnection) -> None:
        self._connections.pop(connection, None)

    def _run_handler(self, listener: MemoryListener, connection: MuxConnection) -> None:
        self._tasks.spawn(self._handle(listener, connection), name=f"accept {connection!r}")

    async def _handle(self, listener: MemoryListener, connection: MuxConnection) -> None:
        try:
            await listener.handler(connection)
        except ConnectionClosedError:
            pass
        except Exception:
            log.exception("connection handler failed for %r", connection)
            await connection.aclose()

    def _on_killed(self) -> None:
        for listener in list(self._listeners):
            listener.closed = True
            self._unlisten(listener)
        for end in list(self._connections.values()):
            end.abort()
        for task in self._tasks:
            task.cancel()
        self._closed = True

    async def aclose(self) -> None:
        """Close listeners, connections and handler tasks (idempotent)."""
        self._unregister_kill()
        await self._close_lifecycle(self._connections)

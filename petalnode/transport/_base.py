# The transport contract every caller codes against; TCP, in-memory and (later) WebRTC implement it.
#
# Invariants:
# - Callers see only `Transport`, `Listener`, `Connection` and `Stream`; which transport carries the bytes is
#   decided by `PeerAddress.scheme` and never leaks into callers.
# - A `Stream` is message-oriented and reliable: `send(m)` on one side is one `receive() == m` on the other,
#   in order. Messages are split into chunks and flow-controlled by the shared multiplexer (`_mux.py`), so a
#   transport only has to move bounded frames (`FrameChannel`) in order; chunking and backpressure never live
#   inside one transport.
# - Every blocking call raises a `TransportError` subclass (or `ClosedResourceError` after our own
#   `aclose()`), never a bare OSError, asyncio error or third-party exception.
# - Only the event loop's clock is used (loop.time(), asyncio.sleep), so the simulator can run it virtually.

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from petalnode.errors import ConfigError, ConnectionClosedError
from petalnode.identity import PeerAddress, PeerId

# A few seconds: a loopback/LAN handshake takes milliseconds, a far peer a few hundred.
CONNECT_TIMEOUT_S = 5.0  # the default of Timeouts.connect (petalnode/_timeouts.py)
# Enough for a 64 MiB tensor plus its envelope; anything bigger is a bug or an attack.
MAX_MESSAGE_BYTES = 96 * 1024 * 1024
# 240 KiB chunks plus a small header fit WebRTC's 256 KiB data-channel message limit.
CHUNK_BYTES = 240 * 1024
# Per-stream receive window: enough to keep loopback busy, small enough that many streams stay cheap.
STREAM_WINDOW_BYTES = 4 * 1024 * 1024
# Streams a peer may have open to us on one connection at once.
MAX_STREAMS = 256
# Connection keepalive: a silent connection is probed this often and dropped after the timeout, so a peer that
# vanished without a FIN (power loss, partition) is noticed even when no RPC is in flight.
KEEPALIVE_INTERVAL_S = 5.0
KEEPALIVE_TIMEOUT_S = 20.0  # the default of Timeouts.keepalive


class EndOfStreamError(ConnectionClosedError):
    """The peer finished sending on this stream (a clean end, unlike a reset or a lost connection)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionConfig:
    """Limits of the shared multiplexing layer (see `_mux.py`).

    `keepalive_interval_s=None` turns keepalive off (a simulator with thousands of idle connections may want it).
    `idle_timeout_s`: the side that dialled closes the connection once it has had no open stream for this long
    (checked on keepalive ticks, so it needs keepalive); None keeps idle connections open. Only the dialler
    closes, so a call it is about to make never races the close (its pool then dials afresh).
    """

    max_message_bytes: int = MAX_MESSAGE_BYTES
    chunk_bytes: int = CHUNK_BYTES
    window_bytes: int = STREAM_WINDOW_BYTES
    max_streams: int = MAX_STREAMS
    keepalive_interval_s: float | None = KEEPALIVE_INTERVAL_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    idle_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not 1024 <= self.chunk_bytes <= 16 * 1024 * 1024:
            raise ConfigError(f"chunk_bytes must be in [1 KiB, 16 MiB], got {self.chunk_bytes}")
        if self.window_bytes < self.chunk_bytes:
            raise ConfigError(
                f"window_bytes ({self.window_bytes}) must be >= chunk_bytes ({self.chunk_bytes})"
            )
        if self.max_message_bytes < 1 or self.max_streams < 1:
            raise ConfigError("max_message_bytes and max_streams must be positive")
        if self.keepalive_interval_s is not None and not 0 < self.keepalive_interval_s < self.keepalive_timeout_s:
            raise ConfigError("need 0 < keepalive_interval_s < keepalive_timeout_s")
        if self.idle_timeout_s is not None and (self.idle_timeout_s <= 0 or self.keepalive_interval_s is None):
            raise ConfigError("idle_timeout_s must be positive and needs keepalive_interval_s")


@runtime_checkable
class Stream(Protocol):
    """One reliable, ordered, message-oriented, flow-controlled channel inside a `Connection`."""

    @property
    def stream_id(self) -> int: ...

    @property
    def last_received_at(self) -> float:
        """Loop time of the last frame received on this stream (progress inside a big message counts)."""
        ...

    async def send(self, message: bytes) -> None:
        """Send one message; waits while the receiver's window is full (backpressure)."""
        ...

    async def receive(self) -> bytes:
        """The next whole message; raises `EndOfStreamError` once the peer has finished sending."""
        ...

    async def send_eof(self) -> None:
        """Say we will send nothing more; receiving still works."""
        ...

    async def reset(self, reason: str = "") -> None:
        """Abort the stream in both directions; the peer's pending calls raise `ConnectionClosedError`."""
        ...

    async def wait_aborted(self) -> None:
        """Return once the stream is reset (by either side) or its connection is lost; not on a clean end."""
        ...

    async def aclose(self) -> None:
        """Finish sending and stop reading (idempotent)."""
        ...


@runtime_checkable
class Connection(Protocol):
    """An authenticated connection to one peer, carrying any number of streams."""

    @property
    def local_peer_id(self) -> PeerId: ...

    @property
    def remote_peer_id(self) -> PeerId: ...

    @property
    def remote_address(self) -> PeerAddress | None:
        """The address we dialled, or None for an accepted connection."""
        ...

    @property
    def closed(self) -> bool: ...

    async def open_stream(self) -> Stream: ...

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened; raises `ConnectionClosedError` when the connection ends."""
        ...

    async def wait_closed(self) -> None: ...

    async def aclose(self) -> None: ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]


@runtime_checkable
class Listener(Protocol):
    @property
    def address(self) -> PeerAddress:
        """Where peers can dial us, including our peer id."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """Listen for and dial authenticated connections of one address scheme."""

    @property
    def scheme(self) -> str: ...

    @property
    def local_peer_id(self) -> PeerId: ...

    async def listen(self, handler: ConnectionHandler, *, host: str | None = None, port: int = 0) -> Listener:
        """Accept connections; `handler` runs once per authenticated incoming connection, in a task the
        transport owns. The connection stays open after the handler returns (callers may keep it)."""
        ...

    async def dial(self, address: PeerAddress, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> Connection:
        """Connect and authenticate.

        Raises:
            ConnectTimeoutError: connecting plus the handshake took longer than `connect_timeout_s`.
            PeerIdMismatchError: the peer proved an identity other than `address.peer_id`.
            HandshakeError: the peer failed to prove any identity.
            TransportError: the address is unreachable (refused, unknown host, wrong scheme).
        """
        ...

    async def aclose(self) -> None: ...


class FrameChannel(Protocol):
    """What a transport gives the multiplexer: an ordered, reliable pipe of bounded frames.

    `write_frame` queues a whole frame without blocking (so concurrent writers never interleave bytes and the
    reader can answer control frames without deadlocking); `drain` waits until the queue is small again.
    """

    max_frame_bytes: int

    def write_frame(self, frame: bytes) -> None:
        """Queue one frame; raises `ConnectionClosedError` if the channel is closed."""
        ...

    async def drain(self) -> None: ...

    async def receive_frame(self) -> bytes:
        """The next frame; raises `ConnectionClosedError` at the end."""
        ...

    async def aclose(self) -> None: ...

# The shared multiplexing layer: many message streams over one `FrameChannel`, with chunking and per-stream
# credit-based flow control. Every transport (TCP, memory, later WebRTC) runs its connections through this.
#
# Invariants:
# - Stream ids: the dialling side opens odd ids, the accepting side even ids, each strictly increasing
#   (as in HTTP/2, RFC 9113 section 5.1.1); a peer reusing or going back on ids is a protocol error.
# - Flow control (as in RFC 9113 section 5.2, per stream only): a receiver starts with `window_bytes` of credit
#   for the sender and grants more (WINDOW) only as the application consumes chunks. Unconsumed data per stream
#   is therefore bounded by `window_bytes`, plus at most one message in assembly (bounded by
#   `max_message_bytes`). A sender that exceeds its credit breaks the protocol and the connection is dropped.
# - No DATA frame is larger than `chunk_bytes` of payload, so a 64 MiB tensor is hundreds of frames, streams
#   interleave fairly, and a transport with small messages (WebRTC: 256 KiB) carries the same frames.
# - The reader task never waits for backpressure: it answers control frames with `write_frame` only, so two
#   peers blocked on full buffers cannot deadlock each other's readers.
# - `receive()` is cancel-safe: a partly assembled message stays in the stream and the next call resumes it.
# - Any protocol violation, oversize or undecryptable frame closes this connection (logged), nothing else.

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from petalnode._lifecycle import TaskOwner
from petalnode.errors import (
    ClosedResourceError,
    ConnectionClosedError,
    InvalidStateError,
    LocalProtocolError,
    PetalnodeError,
    RemoteProtocolError,
    TransportError,
)
from petalnode.identity import PeerAddress, PeerId
from petalnode.transport import _frames as frames
from petalnode.transport._base import ConnectionConfig, EndOfStreamError, FrameChannel
from petalnode.transport._frames import FrameKind

log = logging.getLogger(__name__)


def _fresh(error: TransportError) -> TransportError:
    # A stored error raised again and again would grow one traceback forever; raise a copy each time.
    return type(error)(*error.args)


class MuxStream:
    """One stream of a `MuxConnection` (implements `Stream`)."""

    def __init__(self, connection: MuxConnection, stream_id: int) -> None:
        self._conn = connection
        self._id = stream_id
        config = connection.config
        self._send_credit = config.window_bytes
        self._recv_allowance = config.window_bytes  # bytes the peer may still send before we grant more
        self._consumed_unacked = 0
        self._inbox: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._rx_message_bytes = 0  # size of the message currently arriving
        self._partial: list[bytes] = []
        self._partial_bytes = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._sent_eof = False
        self._got_eof = False
        self._read_closed = False
        self._error: TransportError | None = None
        self._aborted = asyncio.Event()
        self.last_received_at = asyncio.get_running_loop().time()

    @property
    def stream_id(self) -> int:
        return self._id

    def __repr__(self) -> str:
        return f"<MuxStream {self._id} of {self._conn!r}>"

    # ---- sending ------------------------------------------------------------------------------------------

    async def send(self, message: bytes) -> None:
        """Send one message, chunked; waits for credit (backpressure)."""
        config = self._conn.config
        if len(message) > config.max_message_bytes:
            raise LocalProtocolError(
                f"message of {len(message)} bytes exceeds max_message_bytes={config.max_message_bytes}"
            )
        async with self._send_lock:
            self._check_can_send()
            view = memoryview(message)
            offset = 0
            while True:
                while self._send_credit <= 0 and len(view) > offset:
                    self._writable.clear()
                    await self._writable.wait()
                    self._check_can_send()
                size = min(len(view) - offset, config.chunk_bytes, self._send_credit)
                last = offset + size == len(view)
                self._conn._write(frames.encode_data(self._id, view[offset : offset + size], end_of_message=last))
                self._send_credit -= size
                offset += size
                await self._conn._drain()
                if last:
                    return

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise _fresh(self._error)
        if self._sent_eof:
            raise ClosedResourceError(f"stream {self._id}: cannot send in state \"send-closed\"")

    async def send_eof(self) -> None:
        if self._error is not None or self._sent_eof:
            return
        async with self._send_lock:
            if self._error is None and not self._sent_eof:
                self._sent_eof = True
                self._conn._write_quiet(frames.encode_control(FrameKind.CLOSE, self._id))
                self._conn._maybe_forget(self)

    # ---- receiving ----------------------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next whole message.

        Raises:
            EndOfStreamError: the peer finished sending.
            ConnectionClosedError: the stream was reset or the connection lost.
            ClosedResourceError: we closed the stream.
        """
        while True:
            if self._read_closed:
                raise ClosedResourceError(f"stream {self._id}: cannot receive in state \"closed\"")
            if self._inbox:
                chunk, end = self._inbox.popleft()
                self._credit_back(len(chunk))
                self._partial.append(chunk)
                self._partial_bytes += len(chunk)
                if end:
                    message = self._partial[0] if len(self._partial) == 1 else b"".join(self._partial)
                    self._partial = []
                    self._partial_bytes = 0
                    return message
                continue
            if self._error is not None:
                raise _fresh(self._error)
            if self._got_eof:
                if self._partial:
                    raise RemoteProtocolError(f"stream {self._id}: peer ended the stream inside a message")
                raise EndOfStreamError(f"stream {self._id}: the peer finished sending")
            self._readable.clear()
            await self._readable.wait()

    def _credit_back(self, nbytes: int) -> None:
        self._consumed_unacked += nbytes
        # Batch window updates: one WINDOW frame per quarter window consumed.
        if self._consumed_unacked >= self._conn.config.window_bytes // 4 and not self._got_eof:
            increment, self._consumed_unacked = self._consumed_unacked, 0
            self._recv_allowance += increment
            self._conn._write_quiet(frames.encode_window(self._id, increment))

    # ---- closing ------------------------------------------------------------------------------------------

    async def reset(self, reason: str = "") -> None:
        if self._error is None and not (self._sent_eof and self._got_eof):
            self._conn._write_quiet(frames.encode_reset(self._id, reason))
        self._fail(ConnectionClosedError(f"stream {self._id} reset locally: {reason or 'no reason'}"))
        self._conn._forget(self)

    async def aclose(self) -> None:
        """Finish sending and discard whatever else the peer sends (its credit is still returned)."""
        if self._read_closed:
            return
        await self.send_eof()
        self._read_closed = True
        self._inbox.clear()
        self._partial = []
        self._readable.set()
        self._conn._maybe_forget(self)

    async def wait_aborted(self) -> None:
        await self._aborted.wait()

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
        self._aborted.set()
        self._readable.set()
        self._writable.set()

    # ---- fed by the connection's reader -------------------------------------------------------------------

    def _on_data(self, frame: frames.Frame) -> None:
        size = len(frame.payload)
        if size > self._recv_allowance:
            raise RemoteProtocolError(f"stream {self._id}: peer sent {size} bytes beyond its flow-control credit")
        if self._got_eof:
            raise RemoteProtocolError(f"stream {self._id}: DATA after CLOSE")
        if size > self._conn.config.chunk_bytes:
            raise RemoteProtocolError(f"stream {self._id}: chunk of {size} bytes exceeds chunk_bytes")
        self._recv_allowance -= size
        self.last_received_at = asyncio.get_running_loop().time()
        if self._read_closed or self._error is not None:
            # Nobody will read it: hand the credit straight back so the peer is never stuck.
            self._recv_allowance += size
            if size and self._error is None:
                self._conn._write_quiet(frames.encode_window(self._id, size))
            return
        self._rx_message_bytes += size
        if self._rx_message_bytes > self._conn.config.max_message_bytes:
            limit = self._conn.config.max_message_bytes
            self._conn._write_quiet(frames.encode_reset(self._id, f"message exceeds {limit} bytes"))
            self._fail(RemoteProtocolError(f"stream {self._id}: peer sent a message over {limit} bytes"))
            self._conn._forget(self)
            return
        if frame.end_of_message:
            self._rx_message_bytes = 0
        self._inbox.append((frame.payload, frame.end_of_message))
        self._readable.set()

    def _on_eof(self) -> None:
        self._got_eof = True
        self.last_received_at = asyncio.get_running_loop().time()
        self._readable.set()
        self._conn._maybe_forget(self)

    def _on_window(self, increment: int) -> None:
        self._send_credit += increment
        if self._send_credit > frames.MAX_WINDOW_INCREMENT:
            raise RemoteProtocolError(f"stream {self._id}: flow-control window overflow")
        self._writable.set()


class MuxConnection:
    """Streams over one authenticated `FrameChannel` (implements `Connection`).

    The transport creates it after the handshake and calls `start()`; it owns its reader and keepalive tasks.
    """

    def __init__(
        self,
        channel: FrameChannel,
        *,
        initiator: bool,
        local_peer_id: PeerId,
        remote_peer_id: PeerId,
        remote_address: PeerAddress | None,
        config: ConnectionConfig,
        on_closed: Callable[[MuxConnection], None] | None = None,
    ) -> None:
        self._channel = channel
        self.config = config
        self._local_peer_id = local_peer_id
        self._remote_peer_id = remote_peer_id
        self._remote_address = remote_address
        self._on_closed = on_closed
        self._initiator = initiator
        self._next_local_id = 1 if initiator else 2
        self._last_remote_id = 0
        self._streams: dict[int, MuxStream] = {}
        self._accept_queue: collections.deque[MuxStream] = collections.deque()
        self._acceptable = asyncio.Event()
        self._closed = False
        self._close_reason: TransportError | None = None
        self._closed_event = asyncio.Event()
        self._tasks = TaskOwner(f"mux {remote_peer_id}")
        self._started = False
        self._last_rx = asyncio.get_running_loop().time()
        self._last_active = self._last_rx  # when a stream last opened or ended (for idle_timeout_s)
        self.pings_sent = 0  # keepalive probes written (diagnostics and tests)

    def start(self) -> None:
        if self._started:
            raise InvalidStateError("connection already started")
        self._started = True
        self._tasks.spawn(self._read_loop(), name="read")
        if self.config.keepalive_interval_s is not None:
            self._tasks.spawn(self._keepalive(), name="keepalive")

    @property
    def local_peer_id(self) -> PeerId:
        return self._local_peer_id

    @property
    def remote_peer_id(self) -> PeerId:
        return self._remote_peer_id

    @property
    def remote_address(self) -> PeerAddress | None:
        return self._remote_address

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MuxConnection to {self._remote_peer_id} {state}>"

    async def __aenter__(self) -> MuxConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- streams ------------------------------------------------------------------------------------------

    async def open_stream(self) -> MuxStream:
        self._check_open()
        stream_id = self._next_local_id
        if stream_id > frames.MAX_STREAM_ID:
            raise InvalidStateError("connection ran out of stream ids; open a new connection")
        self._next_local_id += 2
        stream = MuxStream(self, stream_id)
        self._streams[stream_id] = stream
        self._last_active = asyncio.get_running_loop().time()
        self._write(frames.encode_control(FrameKind.OPEN, stream_id))
        await self._drain()
        return stream

    async def accept_stream(self) -> MuxStream:
        while not self._accept_queue:
            self._check_open()
            self._acceptable.clear()
            await self._acceptable.wait()
        return self._accept_queue.popleft()

    def _check_open(self) -> None:
        if self._closed:
            if self._close_reason is not None:
                raise _fresh(self._close_reason)
            raise ConnectionClosedError(f"connection to {self._remote_peer_id} is closed")

    def _write(self, frame: bytes) -> None:
        self._check_open()
        self._channel.write_frame(frame)

    def _write_quiet(self, frame: bytes) -> None:
        """Control frames on a possibly dead connection: losing them with the connection is fine."""
        if not self._closed:
            with contextlib.suppress(TransportError):
                self._channel.write_frame(frame)

    async def _drain(self) -> None:
        try:
            await self._channel.drain()
        except TransportError as e:
            self._close(e)
            raise

    def _forget(self, stream: MuxStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._last_active = asyncio.get_running_loop().time()

    def _maybe_forget(self, stream: MuxStream) -> None:
        # Late DATA for a forgotten stream is still credited back by `_dispatch`, so the peer never stalls.
        if stream._sent_eof and (stream._got_eof or stream._read_closed):
            self._forget(stream)

    # ---- the reader -----------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self._channel.receive_frame()
                self._last_rx = loop.time()
                self._dispatch(frames.parse_frame(data))
        except ConnectionClosedError as e:
            self._close(e)
        except PetalnodeError as e:
            log.warning("closing connection to %s: %s", self._remote_peer_id, e)
            self._close(ConnectionClosedError(f"connection to {self._remote_peer_id} dropped: {e}"))
        except Exception as e:  # a bug must not leave the connection half alive
            log.exception("closing connection to %s after an unexpected error", self._remote_peer_id)
            self._close(ConnectionClosedError(f"connection to {self._remote_peer_id} failed: {e!r}"))
        await self._channel.aclose()

    def _dispatch(self, frame: frames.Frame) -> None:
        kind = frame.kind
        if kind is FrameKind.PING:
            self._write_quiet(frames.encode_ping(FrameKind.PONG, int.from_bytes(frame.payload, "big")))
            return
        if kind is FrameKind.PONG:
            return
        if kind is FrameKind.GOAWAY:
            raise ConnectionClosedError(f"peer {self._remote_peer_id} closed the connection: {frame.reason}")
        if kind is FrameKind.OPEN:
            self._on_open(frame.stream_id)
            return
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            # A stream we already forgot (reset, or fully closed): late frames are harmless, but a stream id
            # that was never opened is a protocol error.
            if not self._was_opened(frame.stream_id):
                raise RemoteProtocolError(f"{kind.name} frame for never-opened stream {frame.stream_id}")
            if kind is FrameKind.DATA and frame.payload:
                self._write_quiet(frames.encode_window(frame.stream_id, len(frame.payload)))
            return
        if kind is FrameKind.DATA:
            stream._on_data(frame)
        elif kind is FrameKind.CLOSE:
            stream._on_eof()
        elif kind is FrameKind.WINDOW:
            stream._on_window(frame.window_increment)
        elif kind is FrameKind.RESET:
            stream._fail(ConnectionClosedError(f"stream {frame.stream_id} reset by peer: {frame.reason}"))
            self._forget(stream)

    def _was_opened(self, stream_id: int) -> bool:
        local_parity = self._next_local_id % 2
        if stream_id % 2 == local_parity:
            return stream_id < self._next_local_id
        return stream_id <= self._last_remote_id

    def _on_open(self, stream_id: int) -> None:
        if stream_id % 2 == self._next_local_id % 2 or stream_id <= self._last_remote_id:
            raise RemoteProtocolError(f"peer opened stream {stream_id} out of order or with our parity")
        self._last_remote_id = stream_id
        remote_open = sum(1 for s in self._streams if s % 2 != self._next_local_id % 2)
        if remote_open >= self.config.max_streams:
            self._write_quiet(frames.encode_reset(stream_id, f"too many streams (max {self.config.max_streams})"))
            return
        stream = MuxStream(self, stream_id)
        self._streams[stream_id] = stream
        self._last_active = asyncio.get_running_loop().time()
        self._accept_queue.append(stream)
        self._acceptable.set()

    async def _keepalive(self) -> None:
        interval = self.config.keepalive_interval_s
        assert interval is not None
        loop = asyncio.get_running_loop()
        counter = 0
        idle_timeout = self.config.idle_timeout_s if self._initiator else None
        while not self._closed:
            await asyncio.sleep(interval)
            if idle_timeout is not None and not self._streams and loop.time() - self._last_active >= idle_timeout:
                log.debug("closing connection to %s: no stream for %.0f s", self._remote_peer_id, idle_timeout)
                await self.aclose()
                return
            silent_s = loop.time() - self._last_rx
            if silent_s > self.config.keepalive_timeout_s:
                log.warning("closing connection to %s: silent for %.1f s", self._remote_peer_id, silent_s)
                self._close(ConnectionClosedError(f"peer {self._remote_peer_id} silent for {silent_s:.1f} s"))
                await self._channel.aclose()
                return
            # Anything received within the last interval already shows the peer is alive: probe only a quiet
            # connection. On an idle one the first side to probe refreshes the other, so about one PING/PONG
            # pair per interval crosses it instead of two, and a busy one carries none; the silence bound
            # (keepalive_timeout_s, checked every interval) is unchanged.
            if silent_s >= interval:
                counter += 1
                self.pings_sent += 1
                self._write_quiet(frames.encode_ping(FrameKind.PING, counter))

    # ---- closing --------------------------------------------------------------------------------------------

    def _close(self, reason: TransportError) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        for stream in list(self._streams.values()):
            stream._fail(reason)
        self._streams.clear()
        self._acceptable.set()
        self._closed_event.set()
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback(self)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def aclose(self) -> None:
        """Close the connection (idempotent); open streams fail with `ConnectionClosedError`."""
        if not self._closed:
            with contextlib.suppress(TransportError):
                self._channel.write_frame(frames.encode_goaway("closing"))
            self._close(ConnectionClosedError(f"connection to {self._remote_peer_id} closed locally"))
        try:
            await self._channel.aclose()
        finally:  # the read loop may be the caller: TaskOwner does not await the current task
            await self._tasks.aclose()

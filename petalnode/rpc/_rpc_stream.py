# A long-lived bidirectional RPC stream (an inference session is one), with heartbeats.
#
# Invariants:
# - Each side sends PING when it has sent nothing for `heartbeat_interval_s`, and declares the peer dead when
#   nothing at all (message, chunk of a message, or PING) arrived for `heartbeat_timeout_s` while we were ready to
#   read. Time spent with our own application not reading does not count: a slow consumer is not a dead peer.
# - A dead peer fails every pending and later call with `ConnectionClosedError` and resets the transport stream.
# - An ERROR envelope ends the stream: `receive()` raises the typed error (`error_from_code`), once and after.
# - The stream owns its reader and heartbeat tasks; `aclose()` cancels and awaits them (idempotent).

from __future__ import annotations

import asyncio
import contextlib
import logging

from petalnode._lifecycle import TaskOwner
from petalnode._timeouts import DEFAULT_TIMEOUTS, timeout_scope
from petalnode.codecs import DEFAULT_LIMITS, CodecLimits, Message, decode_message, encode_message
from petalnode.errors import (
    ClosedResourceError,
    ConnectionClosedError,
    PetalnodeError,
    RemoteError,
    RemoteProtocolError,
    RPCTimeoutError,
    TransportError,
    error_from_code,
)
from petalnode.identity import PeerId
from petalnode.rpc import _rpc_wire as wire
from petalnode.transport import EndOfStreamError, Stream

log = logging.getLogger(__name__)

# A dead peer must be noticed within a few seconds (an inference client then fails over to another server): a
# ping a second, dead after five silent seconds.
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = DEFAULT_TIMEOUTS.heartbeat  # Timeouts.heartbeat
# Messages read ahead of the application; beyond this the transport's flow control pushes back on the sender.
_READ_AHEAD = 4


class RPCStream:
    """One side of a bidirectional RPC stream of codec messages."""

    def __init__(
        self,
        stream: Stream,
        *,
        remote_peer_id: PeerId,
        verb: str,
        expected: type[Message] | tuple[type[Message], ...] | None = None,
        limits: CodecLimits = DEFAULT_LIMITS,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self._stream = stream
        self.remote_peer_id = remote_peer_id
        self.verb = verb
        self._expected = expected
        self._limits = limits
        self._interval_s = heartbeat_interval_s
        self._timeout_s = heartbeat_timeout_s
        self._inbox: asyncio.Queue[wire.Envelope | PetalnodeError] = asyncio.Queue(_READ_AHEAD)
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        self._last_tx = self._loop.time()
        self._waiting_on_app = False
        self._ended: PetalnodeError | None = None
        self._failure: TransportError | None = None
        self._closed = False
        self._tasks = TaskOwner(f"rpc-stream {verb}")
        self._reader = self._tasks.spawn(self._read_loop(), name="read")
        self._tasks.spawn(self._heartbeat_loop(), name="heartbeat")

    def __repr__(self) -> str:
        return f"<RPCStream {self.verb} with {self.remote_peer_id}>"

    async def __aenter__(self) -> RPCStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- sending ------------------------------------------------------------------------------------------

    async def send(self, message: Message, **encode_options: object) -> None:
        """Send one codec message (`encode_options` go to `encode_message`, e.g. tensor_codec=...)."""
        self._check_usable()
        await self._send_raw(wire.encode_msg(encode_message(message, **encode_options)))  # type: ignore[arg-type]

    async def send_error(self, error: RemoteError) -> None:
        """Send a typed error to the peer; it ends the stream for them."""
        self._check_usable()
        await self._send_raw(wire.encode_error(error.code, str(error)))

    async def _send_raw(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except TransportError:
            if self._failure is not None:
                raise self._failure_copy() from None
            raise
        self._last_tx = self._loop.time()

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self!r}: cannot use in state \"closed\"")
        if self._failure is not None:
            raise self._failure_copy()

    def _failure_copy(self) -> TransportError:
        assert self._failure is not None
        return type(self._failure)(*self._failure.args)

    # ---- receiving ----------------------------------------------------------------------------------------

    async def receive(
        self, *, timeout_s: float | None = None, error_cls: type[RPCTimeoutError] = RPCTimeoutError
    ) -> Message:
        """The next message from the peer.

        Args:
            timeout_s: how long to wait (None: no limit).
            error_cls: what a timeout raises; the caller names its phase (e.g. `StepTimeoutError`).

        Raises:
            RPCTimeoutError: nothing arrived within `timeout_s` (the stream stays usable); `error_cls` if given.
            EndOfStreamError: the peer finished the stream.
            RemoteError: the peer sent a typed error (a subclass: BusyError, UnknownSessionError, ...).
            ConnectionClosedError: the peer stopped answering heartbeats or the connection was lost.
            CodecError: the peer sent a message that does not decode to the expected type.
        """
        if self._closed:
            raise ClosedResourceError(f"{self!r}: cannot receive in state \"closed\"")
        if self._ended is not None:
            raise type(self._ended)(*self._ended.args)
        async with timeout_scope(timeout_s, error_cls, f"{self!r}: nothing received within {timeout_s} s"):
            item = await self._inbox.get()
        if isinstance(item, PetalnodeError):
            self._ended = item
            raise type(item)(*item.args)
        if item.kind is wire.EnvelopeKind.ERROR:
            self._ended = error_from_code(item.code, item.text)
            raise error_from_code(item.code, item.text)
        return decode_message(item.body, limits=self._limits, expected=self._expected)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive()
                self._last_rx = self._loop.time()
                envelope = wire.parse_envelope(data)
                if envelope.kind is wire.EnvelopeKind.PING:
                    continue
                if envelope.kind not in (wire.EnvelopeKind.MSG, wire.EnvelopeKind.ERROR):
                    raise RemoteProtocolError(f"unexpected {envelope.kind.name} envelope on an open RPC stream")
                await self._put(envelope)
                if envelope.kind is wire.EnvelopeKind.ERROR:
                    return
        except EndOfStreamError as e:
            await self._put(e)
        except TransportError as e:
            await self._put(self._failure_copy() if self._failure is not None else e)
        except RemoteProtocolError as e:
            await self._stream.reset(str(e))
            await self._put(e)

    async def _put(self, item: wire.Envelope | PetalnodeError) -> None:
        self._waiting_on_app = True
        try:
            await self._inbox.put(item)
        finally:
            self._waiting_on_app = False
            self._last_rx = self._loop.time()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            now = self._loop.time()
            # Progress inside a big message counts as life, not only whole messages.
            last_rx = max(self._last_rx, self._stream.last_received_at)
            if not self._waiting_on_app and now - last_rx > self._timeout_s and not self._reader_done():
                self._failure = ConnectionClosedError(
                    f"{self!r}: peer sent no heartbeat for {now - last_rx:.1f} s (limit {self._timeout_s} s)"
                )
                log.warning("%s", self._failure)
                await self._stream.reset("heartbeat timeout")
                return
            if now - self._last_tx >= self._interval_s:
                # Bounded: if our window to the peer is full, the peer is reading slowly, which is not death.
                with contextlib.suppress(TimeoutError, TransportError):
                    async with asyncio.timeout(self._interval_s):
                        await self._stream.send(wire.PING)
                        self._last_tx = self._loop.time()

    def _reader_done(self) -> bool:
        return self._reader.done()

    # ---- closing ------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Finish our side (the peer's `receive()` raises `EndOfStreamError`) and stop the background tasks."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(TransportError):
                await self._stream.aclose()
        finally:
            await self._tasks.aclose()

    async def reset(self, reason: str = "") -> None:
        """Abort the stream (the peer sees `ConnectionClosedError`)."""
        with contextlib.suppress(TransportError):
            await self._stream.reset(reason)
        await self.aclose()

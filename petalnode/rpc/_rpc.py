# Request/response and bidirectional-stream RPC over any `Transport`, with a per-peer connection pool.
#
# Invariants:
# - Every call is its own transport stream: CALL (then end of our side) -> RESULT or ERROR. A stream RPC is
#   OPEN -> any number of MSG both ways -> end or ERROR (see `_rpc_wire.py`).
# - A failure in a handler never costs the connection: typed `RemoteError`s travel back as they are, a request
#   that does not decode becomes `BadRequestError`, anything unexpected becomes `InternalError` (logged here,
#   details not sent), and the server keeps serving.
# - A caller that times out or is cancelled resets its stream, which cancels the server's handler.
# - Handlers are registered explicitly by verb (`add_unary_handler("ping", self.rpc_ping, ...)`); there is no
#   attribute magic. Clients write `call_<verb>` stubs over `call()`.
# - Connections are pooled per peer id (and per address until the id is known), dialled once even under
#   concurrent callers, re-dialled when found closed, and serve the peer's calls in both directions.
# - The RPC object owns every task it starts; `aclose()` cancels and awaits them and closes pooled connections.

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from petalnode._lifecycle import TaskOwner
from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts, timeout_scope
from petalnode.codecs import DEFAULT_LIMITS, CodecLimits, Message, decode_message, encode_message
from petalnode.errors import (
    BadRequestError,
    ClosedResourceError,
    CodecError,
    ConfigError,
    ConnectionClosedError,
    InternalError,
    RemoteError,
    RemoteProtocolError,
    RPCTimeoutError,
    TransportError,
    error_from_code,
)
from petalnode.identity import PeerAddress, PeerId
from petalnode.rpc import _rpc_wire as wire
from petalnode.rpc._rpc_stream import HEARTBEAT_INTERVAL_S, RPCStream
from petalnode.transport import Connection, EndOfStreamError, Listener, Stream, Transport

log = logging.getLogger(__name__)

# Default for one unary call; a forward pass through a few blocks on a CPU can take seconds (Timeouts.rpc).
RPC_TIMEOUT_S = DEFAULT_TIMEOUTS.rpc

MessageTypes = type[Message] | tuple[type[Message], ...]


class _Default(enum.Enum):
    """Marker for 'use the RPC object's default timeout' (None already means 'no limit')."""

    TOKEN = 0


def _dial_timeout(connect_timeout_s: float | None) -> float:
    # Transports take a number; None (no limit) becomes infinity, which asyncio.timeout treats as no deadline.
    return math.inf if connect_timeout_s is None else connect_timeout_s


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling, for handlers."""

    remote_peer_id: PeerId
    connection: Connection
    verb: str


UnaryHandler = Callable[[Message, CallContext], Awaitable[Message]]
StreamHandler = Callable[[RPCStream, CallContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Unary:
    handler: UnaryHandler
    request_type: MessageTypes


@dataclass(frozen=True, slots=True)
class _StreamRoute:
    handler: StreamHandler
    request_type: MessageTypes | None


class RPC:
    """RPC client and server on one transport; an async context manager.

    Args:
        transport: any `Transport` (TCP, memory, ...); the RPC object does not close it.
        limits: codec limits for every decoded request, reply and stream message.
        call_timeout_s: default per-call timeout (None: no limit).
        connect_timeout_s: dial timeout for pooled connections.
        heartbeat_interval_s, heartbeat_timeout_s: for streams (see `RPCStream`).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        limits: CodecLimits = DEFAULT_LIMITS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        call_timeout_s: float | _Default | None = _Default.TOKEN,
        connect_timeout_s: float | _Default | None = _Default.TOKEN,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float | _Default | None = _Default.TOKEN,
    ) -> None:
        """Args (beyond the obvious):
            timeouts: `rpc` (default per-call timeout), `connect` (dialling, opening a stream),
                `heartbeat` (RPC streams) and `first_message` (serving) come from here.
            call_timeout_s / connect_timeout_s / heartbeat_timeout_s: override the matching field.
        """
        if isinstance(call_timeout_s, _Default):
            call_timeout_s = timeouts.rpc
        if isinstance(connect_timeout_s, _Default):
            connect_timeout_s = timeouts.connect
        if isinstance(heartbeat_timeout_s, _Default):
            heartbeat_timeout_s = timeouts.heartbeat
        if not 0 < heartbeat_interval_s < (math.inf if heartbeat_timeout_s is None else heartbeat_timeout_s):
            raise ConfigError("need 0 < heartbeat_interval_s < heartbeat_timeout_s")
        self.transport = transport
        self.limits = limits
        self.timeouts = timeouts
        self.call_timeout_s = call_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = math.inf if heartbeat_timeout_s is None else heartbeat_timeout_s
        self._unary: dict[str, _Unary] = {}
        self._streams: dict[str, _StreamRoute] = {}
        self._pool: dict[PeerId | str, Connection] = {}
        self._dial_locks: dict[PeerId | str, asyncio.Lock] = {}
        self._served: set[Connection] = set()
        self._tasks = TaskOwner("rpc")  # connection and stream handlers
        self._listeners: list[Listener] = []
        self._closed = False

    async def __aenter__(self) -> RPC:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- registration -------------------------------------------------------------------------------------

    def add_unary_handler(self, verb: str, handler: UnaryHandler, *, request_type: MessageTypes) -> None:
        """Serve `verb`: `await handler(request, context)` must return the reply message."""
        self._check_new_verb(verb)
        self._unary[verb] = _Unary(handler, request_type)

    def add_stream_handler(
        self, verb: str, handler: StreamHandler, *, request_type: MessageTypes | None = None
    ) -> None:
        """Serve stream `verb`: `await handler(stream, context)` talks until it returns (then the stream ends).
        `request_type` is what `stream.receive()` decodes."""
        self._check_new_verb(verb)
        self._streams[verb] = _StreamRoute(handler, request_type)

    def _check_new_verb(self, verb: str) -> None:
        wire.check_verb(verb)
        if verb in self._unary or verb in self._streams:
            raise ConfigError(f"RPC verb {verb!r} is already registered")

    # ---- client -------------------------------------------------------------------------------------------

    async def call(
        self,
        peer: PeerAddress | Connection,
        verb: str,
        request: Message,
        *,
        expected: MessageTypes | None = None,
        timeout_s: float | _Default | None = _Default.TOKEN,
        **encode_options: object,
    ) -> Message:
        """Call `verb` on `peer` and return its reply.

        Args:
            peer: an address (pooled connection) or a connection to use directly.
            expected: the reply type(s); anything else is a `CodecError`.
            timeout_s: overrides `call_timeout_s` for this call (None: no limit). Covers dialling too.
            encode_options: passed to `encode_message` (e.g. tensor_codec=...).

        Raises:
            RemoteError: the peer answered with a typed error (BusyError, BadRequestError, InternalError, ...).
            RPCTimeoutError: no reply within the timeout (the server's handler is cancelled).
            TransportError: the peer could not be reached or the connection was lost.
            CodecError: the reply does not decode to `expected`.
        """
        self._check_open()
        timeout = self.call_timeout_s if isinstance(timeout_s, _Default) else timeout_s
        request_bytes = wire.encode_call(verb, encode_message(request, **encode_options))  # type: ignore[arg-type]
        stream: Stream | None = None
        try:
            async with timeout_scope(timeout, RPCTimeoutError, f"{verb} to {_describe(peer)} got no reply within "
                                     f"{timeout} s"):
                stream = await self._open(peer)
                await stream.send(request_bytes)
                await stream.send_eof()
                reply = await stream.receive()
        except RPCTimeoutError:
            await _reset_quietly(stream, "call timed out")
            raise
        except BaseException:
            await _reset_quietly(stream, "call abandoned")
            raise
        await _close_quietly(stream)
        envelope = wire.parse_envelope(reply)
        if envelope.kind is wire.EnvelopeKind.ERROR:
            raise error_from_code(envelope.code, envelope.text)
        if envelope.kind is not wire.EnvelopeKind.RESULT:
            raise RemoteProtocolError(f"{verb}: expected RESULT or ERROR, got {envelope.kind.name}")
        return decode_message(envelope.body, limits=self.limits, expected=expected)

    async def open_stream(
        self, peer: PeerAddress | Connection, verb: str, *, expected: MessageTypes | None = None
    ) -> RPCStream:
        """Open a bidirectional stream to `verb` on `peer`. A refusal (unknown verb, busy) arrives as a
        `RemoteError` from the first `receive()`."""
        self._check_open()
        stream = None
        try:
            async with timeout_scope(self.connect_timeout_s, RPCTimeoutError,
                                     f"opening {verb} to {_describe(peer)} took over {self.connect_timeout_s} s"):
                stream = await self._open(peer)
                await stream.send(wire.encode_open(verb))
        except RPCTimeoutError:
            await _reset_quietly(stream, "open timed out")
            raise
        except BaseException:
            await _reset_quietly(stream, "open abandoned")
            raise
        remote = self._peer_id_of(peer) if isinstance(peer, PeerAddress) else peer.remote_peer_id
        return self._wrap(stream, remote, verb, expected)

    def _wrap(self, stream: Stream, remote: PeerId, verb: str, expected: MessageTypes | None) -> RPCStream:
        return RPCStream(
            stream,
            remote_peer_id=remote,
            verb=verb,
            expected=expected,
            limits=self.limits,
            heartbeat_interval_s=self.heartbeat_interval_s,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
        )

    def _peer_id_of(self, address: PeerAddress) -> PeerId:
        if address.peer_id is not None:
            return address.peer_id
        return self._pool[str(address)].remote_peer_id

    async def _open(self, peer: PeerAddress | Connection) -> Stream:
        if not isinstance(peer, PeerAddress):
            return await peer.open_stream()
        connection = await self.connect(peer)
        try:
            return await connection.open_stream()
        except ConnectionClosedError:
            # The pooled connection died just now; one fresh dial is safe because nothing was sent yet.
            return await (await self.connect(peer)).open_stream()

    async def connect(self, address: PeerAddress) -> Connection:
        """A pooled open connection to `address` (dialled if needed)."""
        self._check_open()
        key: PeerId | str = address.peer_id if address.peer_id is not None else str(address)
        connection = self._pool.get(key)
        if connection is not None and not connection.closed:
            return connection
        lock = self._dial_locks.setdefault(key, asyncio.Lock())
        async with lock:
            connection = self._pool.get(key)
            if connection is not None and not connection.closed:
                return connection
            connection = await self.transport.dial(address, connect_timeout_s=_dial_timeout(self.connect_timeout_s))
            if self._closed:
                await connection.aclose()
                self._check_open()
            self._pool[key] = connection
            if key != connection.remote_peer_id:
                self._pool[str(address)] = connection
            self._start_serving(connection)
            return connection

    # ---- server -------------------------------------------------------------------------------------------

    async def listen(self, *, host: str | None = None, port: int = 0) -> Listener:
        """Accept connections on the transport and serve registered verbs on them."""
        self._check_open()
        kwargs = {"port": port} if host is None else {"host": host, "port": port}
        listener = await self.transport.listen(self.serve_connection, **kwargs)  # type: ignore[arg-type]
        self._listeners.append(listener)
        return listener

    async def serve_connection(self, connection: Connection) -> None:
        """Serve calls arriving on `connection` until it closes; also pools it for calls back to that peer."""
        self._check_open()
        existing = self._pool.get(connection.remote_peer_id)
        if existing is None or existing.closed:
            self._pool[connection.remote_peer_id] = connection
        self._served.add(connection)
        try:
            while True:
                stream = await connection.accept_stream()
                self._spawn(self._serve_stream(connection, stream), f"rpc-serve {connection.remote_peer_id}")
        except TransportError:
            pass
        finally:
            self._served.discard(connection)
            if self._pool.get(connection.remote_peer_id) is connection:
                del self._pool[connection.remote_peer_id]

    def _start_serving(self, connection: Connection) -> None:
        if connection not in self._served:
            self._spawn(self.serve_connection(connection), f"rpc-accept {connection.remote_peer_id}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tasks.closed:  # a connection or stream that arrived while we were closing: not served
            coro.close()
            return
        self._tasks.spawn(coro, name=name)

    async def _serve_stream(self, connection: Connection, stream: Stream) -> None:
        try:
            async with timeout_scope(self.timeouts.first_message, RPCTimeoutError, "no request in time"):
                first = await stream.receive()
            envelope = wire.parse_envelope(first)
        except (RPCTimeoutError, TransportError, RemoteProtocolError) as e:
            log.info("dropping RPC stream from %s: %s", connection.remote_peer_id, e or "no request in time")
            await _reset_quietly(stream, "bad or missing request")
            return
        context = CallContext(connection.remote_peer_id, connection, envelope.verb)
        if envelope.kind is wire.EnvelopeKind.CALL:
            await self._serve_unary(stream, envelope, context)
        elif envelope.kind is wire.EnvelopeKind.OPEN:
            await self._serve_rpc_stream(stream, context)
        else:
            await _send_error(stream, BadRequestError(f"expected CALL or OPEN, got {envelope.kind.name}"))

    async def _serve_unary(self, stream: Stream, envelope: wire.Envelope, context: CallContext) -> None:
        route = self._unary.get(envelope.verb)
        if route is None:
            await _send_error(stream, BadRequestError(f"unknown RPC verb {envelope.verb!r}"))
            return
        try:
            request = decode_message(envelope.body, limits=self.limits, expected=route.request_type)
        except CodecError as e:
            await _send_error(stream, BadRequestError(f"{envelope.verb}: bad request: {e}"))
            return
        handler = asyncio.create_task(route.handler(request, context), name=f"rpc-handler {envelope.verb}")
        watcher = asyncio.create_task(stream.wait_aborted(), name=f"rpc-watch {envelope.verb}")
        try:
            await asyncio.wait([handler, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not handler.done():
                handler.cancel()  # the caller reset the stream (timeout, cancel) or we are shutting down
            await asyncio.wait([handler, watcher])
        if handler.cancelled():
            await _reset_quietly(stream, "abandoned")
            return
        error = handler.exception()
        if error is None:
            reply = handler.result()
            try:
                body = encode_message(reply)
            except (CodecError, TypeError) as e:
                log.error("RPC %s handler returned an unencodable reply %r: %s", envelope.verb, type(reply), e)
                error = InternalError(f"{envelope.verb}: the server produced an invalid reply")
            else:
                await _send_and_close(stream, wire.encode_result(body))
                return
        await _send_error(stream, self._as_remote_error(envelope.verb, error))

    async def _serve_rpc_stream(self, stream: Stream, context: CallContext) -> None:
        route = self._streams.get(context.verb)
        if route is None:
            await _send_error(stream, BadRequestError(f"unknown RPC stream verb {context.verb!r}"))
            return
        rpc_stream = self._wrap(stream, context.remote_peer_id, context.verb, route.request_type)
        try:
            await route.handler(rpc_stream, context)
        except Exception as e:
            if not isinstance(e, ConnectionClosedError | EndOfStreamError):
                with contextlib.suppress(TransportError, ClosedResourceError):
                    await rpc_stream.send_error(self._as_remote_error(context.verb, e))
        finally:
            await rpc_stream.aclose()

    @staticmethod
    def _as_remote_error(verb: str, error: BaseException) -> RemoteError:
        if isinstance(error, RemoteError):
            return error
        if isinstance(error, CodecError):
            return BadRequestError(f"{verb}: bad request: {error}")
        log.error("RPC %s handler failed", verb, exc_info=error)
        return InternalError(f"{verb}: internal error on the server")

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("RPC: cannot use in state \"closed\"")

    async def aclose(self) -> None:
        """Stop listening, cancel handlers and close pooled connections (idempotent); the transport stays."""
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            with contextlib.suppress(TransportError):
                await listener.aclose()
        try:
            await self._tasks.aclose()
        finally:  # also when cancelled: pooled connections must not leak
            for connection in {*self._pool.values(), *self._served}:
                await connection.aclose()
            self._pool.clear()


async def _send_error(stream: Stream, error: RemoteError) -> None:
    await _send_and_close(stream, wire.encode_error(error.code, str(error)))


async def _send_and_close(stream: Stream, data: bytes) -> None:
    try:
        await stream.send(data)
        await stream.aclose()
    except (TransportError, ClosedResourceError) as e:
        log.debug("could not deliver an RPC reply: %s", e)


async def _reset_quietly(stream: Stream | None, reason: str) -> None:
    if stream is not None:
        with contextlib.suppress(TransportError, ClosedResourceError):
            await stream.reset(reason)


async def _close_quietly(stream: Stream | None) -> None:
    if stream is not None:
        with contextlib.suppress(TransportError, ClosedResourceError):
            await stream.aclose()


def _describe(peer: PeerAddress | Connection) -> str:
    return str(peer) if isinstance(peer, PeerAddress) else str(peer.remote_peer_id)

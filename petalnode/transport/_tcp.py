# The TCP transport: asyncio streams, the signed X25519 handshake of `_handshake.py`, encrypted records, and
# the shared multiplexer on top.
#
# Invariants:
# - Nothing but HELLO travels in the clear; every later byte is an authenticated record.
# - The whole dial (TCP connect + handshake) is bounded by `connect_timeout_s`; an accepted connection must
#   finish its handshake within `handshake_timeout_s` or it is dropped (no slow-loris slots).
# - A failed handshake, an oversize or unauthentic record closes that one connection with a logged reason; the
#   listener keeps accepting.
# - OSError and asyncio stream errors never escape: they become `TransportError` subclasses here.

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket

from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts, timeout_scope
from petalnode.errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    HandshakeError,
    HandshakeTimeoutError,
    LocalProtocolError,
    PeerIdMismatchError,
    PetalnodeError,
    RemoteProtocolError,
    TransportError,
)
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.swarm_key import SwarmKey
from petalnode.transport import _handshake as hs
from petalnode.transport._base import CONNECT_TIMEOUT_S, ConnectionConfig, ConnectionHandler
from petalnode.transport._frames import HEADER_BYTES
from petalnode.transport._lifecycle_base import TransportLifecycle
from petalnode.transport._mux import MuxConnection

log = logging.getLogger(__name__)

SCHEME = "tcp"
HANDSHAKE_TIMEOUT_S = DEFAULT_TIMEOUTS.handshake  # Timeouts.handshake


def _no_limit(seconds: float | None) -> float:
    # ConnectionConfig takes a number; a None timeout (no limit) is an infinite one.
    return math.inf if seconds is None else seconds
# asyncio's default 64 KiB reader limit makes many small reads for 240 KiB records.
_READER_LIMIT_BYTES = 1024 * 1024
_CLOSE_TIMEOUT_S = 1.0


class SecureChannel:
    """Encrypted, length-prefixed records over an asyncio stream pair (implements `FrameChannel`)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sealer: hs.RecordSealer,
        opener: hs.RecordOpener,
        max_frame_bytes: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._sealer = sealer
        self._opener = opener
        self.max_frame_bytes = max_frame_bytes
        self._closed = False

    def write_frame(self, frame: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise ConnectionClosedError("TCP connection is closed")
        if len(frame) > self.max_frame_bytes:
            raise LocalProtocolError(f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.max_frame_bytes}")
        self._writer.write(self._sealer.seal(frame))

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as e:
            raise ConnectionClosedError(f"TCP connection lost while sending: {e}") from None

    async def receive_frame(self) -> bytes:
        try:
            prefix = await self._reader.readexactly(hs.LENGTH_PREFIX.size)
            ciphertext = await self._reader.readexactly(self._opener.record_length(prefix))
        except asyncio.IncompleteReadError:
            raise ConnectionClosedError("TCP connection closed by peer") from None
        except (ConnectionError, OSError) as e:
            raise ConnectionClosedError(f"TCP connection lost: {e}") from None
        return self._opener.open(prefix, ciphertext)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await _close_writer(self._writer)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await writer.wait_closed()


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: Identity,
    role: hs.Role,
    max_frame: int,
    swarm_key: SwarmKey | None,
) -> tuple[SecureChannel, PeerId]:
    """Run the handshake on a fresh socket; the caller bounds it in time."""
    handshake = hs.Handshake(identity, role, max_frame=max_frame, swarm_key=swarm_key)
    writer.write(handshake.hello())
    try:
        proof_record = handshake.receive_hello(await reader.readexactly(hs.HELLO_BYTES))
        writer.write(proof_record)
        await writer.drain()
        prefix = await reader.readexactly(hs.LENGTH_PREFIX.size)
        assert handshake.opener is not None and handshake.sealer is not None
        try:
            length = handshake.opener.record_length(prefix)
        except RemoteProtocolError as e:
            raise HandshakeError(f"bad identity proof record: {e}") from None
        remote_id = handshake.receive_proof(prefix, await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        raise HandshakeError("peer closed the connection during the handshake") from None
    except (ConnectionError, OSError) as e:
        raise HandshakeError(f"connection lost during the handshake: {e}") from None
    channel = SecureChannel(reader, writer, handshake.sealer, handshake.opener, max_frame)
    return channel, remote_id


class TcpListener:
    """A listening TCP socket (implements `Listener`)."""

    def __init__(self, transport: TcpTransport, server: asyncio.Server, address: PeerAddress) -> None:
        self._transport = transport
        self._server = server
        self._address = address

    @property
    def address(self) -> PeerAddress:
        return self._address

    async def aclose(self) -> None:
        if self._server.is_serving():
            self._server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._server.wait_closed()

    async def __aenter__(self) -> TcpListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class TcpTransport(TransportLifecycle):
    """`Transport` over TCP with the petalnode handshake; an async context manager owning its connections."""

    scheme = SCHEME

    def __init__(
        self,
        identity: Identity,
        *,
        config: ConnectionConfig | None = None,
        handshake_timeout_s: float | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        swarm_key: SwarmKey | None = None,
    ) -> None:
        """Args (beyond the obvious):
            config: multiplexing limits; None: the defaults with `timeouts.keepalive`.
            handshake_timeout_s: overrides `timeouts.handshake` (accepted connections; a dial is bounded by
                its connect timeout).
            swarm_key: a private swarm's key: only peers holding the same key complete a handshake with us.
        """
        self._identity = identity
        self.swarm_key = swarm_key
        self.config = config or ConnectionConfig(keepalive_timeout_s=_no_limit(timeouts.keepalive))
        self._handshake_timeout_s = handshake_timeout_s if handshake_timeout_s is not None else timeouts.handshake
        self._max_frame = self.config.chunk_bytes + HEADER_BYTES
        self._init_lifecycle("TCP transport")
        self._connections: set[MuxConnection] = set()

    @property
    def local_peer_id(self) -> PeerId:
        return self._identity.peer_id

    def __repr__(self) -> str:
        return f"<TcpTransport {self._identity.peer_id}>"

    async def listen(
        self, handler: ConnectionHandler, *, host: str | None = "127.0.0.1", port: int = 0
    ) -> TcpListener:
        """Listen on `host:port` (port 0 picks a free port); the listener's address carries our peer id."""
        self._check_open()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._own_task(task)
            await self._accept(reader, writer, handler)

        try:
            server = await asyncio.start_server(on_client, host or "127.0.0.1", port, limit=_READER_LIMIT_BYTES)
        except OSError as e:
            raise TransportError(f"cannot listen on {host}:{port}: {e}") from None
        sockname = server.sockets[0].getsockname()
        address = PeerAddress(SCHEME, sockname[0], sockname[1], self._identity.peer_id)
        listener = TcpListener(self, server, address)
        self._listeners.append(listener)
        return listener

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: ConnectionHandler
    ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with timeout_scope(self._handshake_timeout_s, HandshakeTimeoutError, "TCP handshake timed out"):
                channel, remote_id = await _handshake(
                    reader, writer, self._identity, hs.Role.RESPONDER, self._max_frame, self.swarm_key
                )
        except HandshakeTimeoutError:
            log.warning("TCP handshake from %s timed out after %s s", peer, self._handshake_timeout_s)
            await _close_writer(writer)
            return
        except (PetalnodeError, OSError) as e:
            log.warning("TCP handshake from %s failed: %s", peer, e)
            await _close_writer(writer)
            return
        if self._closed:
            await channel.aclose()
            return
        connection = self._adopt(channel, initiator=False, remote_id=remote_id, remote_address=None)
        try:
            await handler(connection)
        except ConnectionClosedError:
            pass
        except Exception:
            log.exception("connection handler failed for %r", connection)
            await connection.aclose()

    async def dial(self, address: PeerAddress, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> MuxConnection:
        self._check_open()
        if address.scheme != SCHEME:
            raise TransportError(f"TCP transport cannot dial {address} (scheme {address.scheme!r})")
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(connect_timeout_s):
                reader, writer = await asyncio.open_connection(address.host, address.port, limit=_READER_LIMIT_BYTES)
                _set_nodelay(writer)
                channel, remote_id = await _handshake(
                    reader, writer, self._identity, hs.Role.INITIATOR, self._max_frame, self.swarm_key
                )
        except TimeoutError:
            if writer is not None:
                await _close_writer(writer)
            raise ConnectTimeoutError(f"dialling {address} took longer than {connect_timeout_s} s") from None
        except OSError as e:
            if writer is not None:
                await _close_writer(writer)
            raise TransportError(f"cannot connect to {address}: {e}") from None
        except BaseException:
            if writer is not None:
                await _close_writer(writer)
            raise
        if address.peer_id is not None and remote_id != address.peer_id:
            await channel.aclose()
            raise PeerIdMismatchError(
                f"{address.host}:{address.port} proved peer id {remote_id}, not {address.peer_id}"
            )
        if self._closed:
            await channel.aclose()
            self._check_open()
        return self._adopt(channel, initiator=True, remote_id=remote_id, remote_address=address)

    def _adopt(
        self, channel: SecureChannel, *, initiator: bool, remote_id: PeerId, remote_address: PeerAddress | None
    ) -> MuxConnection:
        connection = MuxConnection(
            channel,
            initiator=initiator,
            local_peer_id=self.local_peer_id,
            remote_peer_id=remote_id,
            remote_address=remote_address,
            config=self.config,
            on_closed=self._connections.discard,
        )
        self._connections.add(connection)
        connection.start()
        return connection

    async def aclose(self) -> None:
        """Stop listening, close every connection and cancel handler tasks (idempotent)."""
        await self._close_lifecycle(self._connections)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

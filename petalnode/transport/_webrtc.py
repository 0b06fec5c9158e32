# The WebRTC transport: aiortc data channels carrying the shared multiplexer, for peers behind NAT.
#
# A connection is one RTCPeerConnection with one ordered, reliable data channel; every data-channel message is
# one mux frame (chunks of 240 KiB plus a 6-byte header stay under the 256 KiB message limit, see `_base.py`).
# Offer and answer travel through a `Signaler` (in a swarm: a relay peer, see petalnode/node/_signaling.py) and
# are signed with the Ed25519 identities (`_webrtc_signing.py`), which authenticates the DTLS fingerprints.
#
# Invariants (each one guards against an aiortc behaviour we measured, stated in the bullet):
# - We always pass our own ICE server list, possibly empty; aiortc's default is a public Google STUN server.
# - `send()` never blocks in aiortc, so `drain()` waits while `bufferedAmount` is above HIGH_WATER_BYTES, woken
#   by `bufferedamountlow` (threshold LOW_WATER_BYTES) or by the channel closing.
# - The whole dial (ICE gathering, signaling, ICE checks, DTLS, SCTP, channel open) is bounded by
#   `connect_timeout_s`; an incoming offer's connection must open within `handshake_timeout_s`. aioice alone
#   gives up after about 64 s.
# - aiortc notices a dead peer only after about 33 s; the mux keepalive (defaults below: ping every 2 s, drop
#   after 8 s of silence) bounds it, and an ICE/DTLS "failed" or "closed" state closes the channel at once.
# - Relay fallback: when the signaler can relay (`open_relay`) and the direct attempt has not opened within
#   DIRECT_SHARE of the connect timeout (symmetric NATs never do), the rest of the budget goes to an end-to-end
#   encrypted connection piped through the relay (`_relayed.py`). Identity errors never fall back.
# - aiortc/aioice exceptions never escape: they become `TransportError` subclasses in `_map_errors`.

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts
from petalnode.errors import (
    ConfigError,
    ConnectionClosedError,
    ConnectTimeoutError,
    HandshakeError,
    HandshakeTimeoutError,
    InvalidStateError,
    LocalProtocolError,
    PeerIdMismatchError,
    PetalnodeError,
    TransportError,
)
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.swarm_key import SwarmKey
from petalnode.transport import _webrtc_signing as signing
from petalnode.transport._base import CONNECT_TIMEOUT_S, ConnectionConfig, ConnectionHandler
from petalnode.transport._frames import HEADER_BYTES
from petalnode.transport._lifecycle_base import TransportLifecycle
from petalnode.transport._mux import MuxConnection
from petalnode.transport._relayed import RelayChannel, RelayedFrames, secure_relayed
from petalnode.transport._webrtc_signing import SignedDescription

log = logging.getLogger(__name__)

SCHEME = "webrtc"
# aiortc's (and browsers') largest data-channel message; our frames must fit (checked in __init__).
MAX_MESSAGE_BYTES = 256 * 1024
# Backpressure on the channel's send buffer: stop writing above HIGH, resume below LOW. aiortc's pure-Python
# SCTP/DTLS moves 1.5-17 MiB/s here depending on load (raw aiortc measured the same as through this transport),
# so 1 MiB in flight keeps the sender busy while bounding memory per connection.
HIGH_WATER_BYTES = 1024 * 1024
LOW_WATER_BYTES = 256 * 1024
# Our own dead-peer bound (aiortc's is ~33 s): the mux pings every 2 s and drops a peer silent for 8 s.
KEEPALIVE_INTERVAL_S = 2.0
KEEPALIVE_TIMEOUT_S = DEFAULT_TIMEOUTS.webrtc_keepalive  # Timeouts.webrtc_keepalive
# An answered offer must become an open channel this quickly (the dialler's bound is its connect timeout).
HANDSHAKE_TIMEOUT_S = DEFAULT_TIMEOUTS.webrtc_handshake  # Timeouts.webrtc_handshake
# Offers being answered at once; more are refused (an offer costs sockets and a DTLS key).
MAX_PENDING_ACCEPTS = 16
# Share of the connect timeout given to the direct (ICE) attempt before falling back to the relay. Direct
# connections through ordinary NATs opened in about 0.5 s on the NAT bed; ICE failure takes aioice over a minute.
DIRECT_SHARE = 0.6
_CLOSE_TIMEOUT_S = 2.0
_LABEL = "petalnode"


@runtime_checkable
class Signaler(Protocol):
    """Carries a signed offer to the peer a `webrtc://` address names and brings back its answer."""

    async def ice_servers(self, address: PeerAddress) -> list[str]:
        """ICE server URLs to use when dialling `address` (e.g. the STUN server of its relay)."""
        ...

    async def exchange(self, address: PeerAddress, offer: SignedDescription) -> SignedDescription:
        """Deliver `offer` to `address.peer_id` and return its answer; raise `TransportError` if it cannot."""
        ...


@runtime_checkable
class RelaySignaler(Signaler, Protocol):
    """A signaler whose relay can also carry the data when no direct path exists."""

    async def open_relay(self, address: PeerAddress) -> RelayChannel:
        """A stream that the relay of `address` pipes to `address.peer_id` (opaque `RelayData` both ways)."""
        ...


@dataclass(frozen=True, slots=True)
class IceServer:
    """One STUN or TURN server: `stun:HOST:PORT` or `turn:USER:PASSWORD@HOST:PORT[?transport=udp|tcp]`."""

    url: str
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> IceServer:
        scheme, sep, rest = text.partition(":")
        if not sep or scheme not in ("stun", "turn", "turns") or not rest:
            raise ConfigError(f"not an ICE server URL: {text!r} (expected stun:HOST:PORT or turn:USER:PASS@HOST:PORT)")
        if "@" in rest:
            credentials, _, rest = rest.rpartition("@")
            user, _, password = credentials.partition(":")
            return cls(f"{scheme}:{rest}", unquote(user), unquote(password))
        return cls(text)

    def to_aiortc(self) -> RTCIceServer:
        return RTCIceServer(urls=self.url, username=self.username, credential=self.credential)


@contextlib.contextmanager
def _map_errors(what: str) -> Iterator[None]:
    """aiortc/aioice/cryptography raise builtin and their own exceptions; callers only see ours."""
    try:
        yield
    except (PetalnodeError, asyncio.CancelledError, TimeoutError):
        raise
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise HandshakeError(f"{what}: malformed session description: {e!r}") from None
    except (ConnectionError, OSError) as e:
        raise TransportError(f"{what}: {e}") from None
    except Exception as e:  # aiortc's InvalidStateError / InvalidAccessError and friends
        raise TransportError(f"{what}: {type(e).__name__}: {e}") from None


class _DataChannelFrames:
    """Mux frames over one data channel (implements `FrameChannel`). Owns the peer connection."""

    def __init__(self, pc: RTCPeerConnection, channel: Any, max_frame_bytes: int) -> None:
        self._pc = pc
        self._channel = channel
        self.max_frame_bytes = max_frame_bytes
        self._inbox: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._opened = asyncio.Event()
        self._closed = False  # the channel ended (either side) or we closed it
        self._close_reason = "WebRTC data channel closed"
        self._pc_closed = False
        channel.bufferedAmountLowThreshold = LOW_WATER_BYTES
        channel.on("open", self._opened.set)
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._on_closed("WebRTC data channel closed by peer"))
        channel.on("bufferedamountlow", self._writable.set)
        pc.on("connectionstatechange", self._on_state)
        if channel.readyState == "open":
            self._opened.set()

    def _on_message(self, message: bytes | str) -> None:
        if isinstance(message, str):
            # Only binary frames are ours; a text message means the peer is not speaking our protocol.
            self._inbox.append(b"")  # parse_frame rejects it and the mux drops the connection with a reason
        else:
            self._inbox.append(message)
        self._readable.set()

    def _on_state(self) -> None:
        state = self._pc.connectionState
        if state in ("failed", "closed"):
            self._on_closed(f"WebRTC connection {state}")

    def _on_closed(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._close_reason = reason
        self._readable.set()
        self._writable.set()
        self._opened.set()

    async def wait_open(self) -> None:
        await self._opened.wait()
        if self._closed or self._channel.readyState != "open":
            raise ConnectionClosedError(f"{self._close_reason} before it opened")

    def write_frame(self, frame: bytes) -> None:
        if self._closed or self._channel.readyState != "open":
            raise ConnectionClosedError(self._close_reason)
        if len(frame) > self.max_frame_bytes:
            raise LocalProtocolError(f"frame of {len(frame)} bytes exceeds max_frame_bytes={self.max_frame_bytes}")
        with _map_errors("sending on the data channel"):
            self._channel.send(bytes(frame))

    async def drain(self) -> None:
        while self._channel.bufferedAmount > HIGH_WATER_BYTES and not self._closed:
            self._writable.clear()
            await self._writable.wait()
        if self._closed:
            raise ConnectionClosedError(self._close_reason)

    async def receive_frame(self) -> bytes:
        while not self._inbox:
            if self._closed:
                raise ConnectionClosedError(self._close_reason)
            self._readable.clear()
            await self._readable.wait()
        return self._inbox.popleft()

    @property
    def pc(self) -> RTCPeerConnection:
        return self._pc

    async def aclose(self) -> None:
        self._on_closed("WebRTC connection closed locally")
        if self._pc_closed:
            return
        self._pc_closed = True
        await _close_pc(self._pc)


async def _close_pc(pc: RTCPeerConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await pc.close()


class WebRTCListener:
    """Incoming WebRTC connections of one transport (implements `Listener`).

    The address is only known once the node has a relay (`WebRTCTransport.set_relay`)."""

    def __init__(self, transport: WebRTCTransport) -> None:
        self._transport = transport

    @property
    def address(self) -> PeerAddress:
        return self._transport.address

    async def aclose(self) -> None:
        self._transport._handler = None


class WebRTCTransport(TransportLifecycle):
    """`Transport` over aiortc data channels, signalled through a `Signaler`; an async context manager.

    Args:
        identity: signs our offers and answers.
        signaler: carries offers for `dial` (None: this transport only answers).
        ice_servers: STUN/TURN servers we always use (`IceServer` or URL text); the signaler may add the
            dialled peer's relay. Never a public default.
        config: mux limits; by default the WebRTC keepalive bound above.
        handshake_timeout_s: how long an answered offer may take to open.
        relay_fallback: when the signaler can relay, fall back to it if no direct path opens in time.
        direct: False skips ICE and always uses the relay (UDP known to be blocked; tests and benchmarks).
    """

    scheme = SCHEME

    def __init__(
        self,
        identity: Identity,
        *,
        signaler: Signaler | None = None,
        ice_servers: Sequence[IceServer | str] = (),
        config: ConnectionConfig | None = None,
        handshake_timeout_s: float | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        relay_fallback: bool = True,
        direct: bool = True,
        swarm_key: SwarmKey | None = None,
    ) -> None:
        # swarm_key: a private swarm's key; offers, answers and relayed handshakes are bound to it.
        self._identity = identity
        self.swarm_key = swarm_key
        self.relay_fallback = relay_fallback
        self.direct = direct
        self.signaler = signaler
        self.ice_servers: list[IceServer] = [s if isinstance(s, IceServer) else IceServer.parse(s) for s in ice_servers]
        # `timeouts.webrtc_keepalive` / `webrtc_handshake`, not the TCP fields: see `Timeouts`.
        self.config = config or ConnectionConfig(
            keepalive_interval_s=KEEPALIVE_INTERVAL_S,
            keepalive_timeout_s=math.inf if timeouts.webrtc_keepalive is None else timeouts.webrtc_keepalive,
        )
        self._max_frame = self.config.chunk_bytes + HEADER_BYTES
        if self._max_frame > MAX_MESSAGE_BYTES:
            raise ConfigError(f"chunk_bytes={self.config.chunk_bytes} gives frames over WebRTC's 256 KiB limit")
        self._handshake_timeout_s = (
            handshake_timeout_s if handshake_timeout_s is not None else timeouts.webrtc_handshake
        )
        self._handler: ConnectionHandler | None = None
        self._relay: PeerAddress | None = None
        self._init_lifecycle("WebRTC transport")
        self._connections: set[MuxConnection] = set()
        self._pending: set[RTCPeerConnection] = set()

    @property
    def local_peer_id(self) -> PeerId:
        return self._identity.peer_id

    @property
    def address(self) -> PeerAddress:
        """`webrtc://RELAY_HOST:RELAY_PORT/OUR_PEER_ID`: dial our relay's TCP port, which forwards the offer."""
        if self._relay is None:
            raise InvalidStateError('WebRTC transport has no address in state "no relay"')
        return PeerAddress(SCHEME, self._relay.host, self._relay.port, self.local_peer_id)

    def set_relay(self, relay: PeerAddress | None) -> None:
        """Name the peer that forwards offers to us (None: not reachable by WebRTC)."""
        self._relay = relay

    def connection_paths(self) -> dict[PeerId, str]:
        """How each open connection travels: its ICE candidate pair (see `describe_path`) when direct, or
        'relayed via HOST:PORT' through a petalnode relay."""
        return {c.remote_peer_id: _path_of(c._channel) for c in self._connections}  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<WebRTCTransport {self._identity.peer_id}>"

    def _new_pc(self, extra: Sequence[str] = ()) -> RTCPeerConnection:
        servers = [*self.ice_servers, *(IceServer.parse(u) for u in extra)]
        # An explicit (possibly empty) list: None would make aiortc fall back to a public Google STUN server.
        return RTCPeerConnection(RTCConfiguration(iceServers=[s.to_aiortc() for s in servers]))

    # ---- listening (answering) ----------------------------------------------------------------------------

    async def listen(self, handler: ConnectionHandler, *, host: str | None = None, port: int = 0) -> WebRTCListener:
        """Answer offers from now on (`host` and `port` are ignored: offers arrive through signaling)."""
        self._check_open()
        self._handler = handler
        return WebRTCListener(self)

    async def accept_offer(self, offer: SignedDescription) -> SignedDescription:
        """Answer a signed offer; the connection is handed to the listen handler once its channel opens.

        Raises:
            HandshakeError: the offer is not for us or its signature does not verify.
            TransportError: we are not listening, too busy, or aiortc failed.
        """
        self._check_open()
        remote_id = signing.verify_offer(offer, self.local_peer_id, swarm_key=self.swarm_key)
        handler = self._handler
        if handler is None:
            raise TransportError("this node does not accept WebRTC connections")
        if len(self._pending) >= MAX_PENDING_ACCEPTS:
            raise TransportError(f"too many WebRTC handshakes in progress (max {MAX_PENDING_ACCEPTS})")
        pc = self._new_pc()
        self._pending.add(pc)
        channel_future: asyncio.Future[_DataChannelFrames] = asyncio.get_running_loop().create_future()

        def on_datachannel(channel: Any) -> None:
            if not channel_future.done():
                channel_future.set_result(_DataChannelFrames(pc, channel, self._max_frame))

        pc.on("datachannel", on_datachannel)
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                with _map_errors("answering a WebRTC offer"):
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
                    await pc.setLocalDescription(await pc.createAnswer())
                    sdp = pc.localDescription.sdp
        except BaseException as e:
            self._pending.discard(pc)
            await _close_pc(pc)
            if isinstance(e, TimeoutError):
                raise HandshakeTimeoutError(f"answering an offer took over {self._handshake_timeout_s} s") from None
            raise
        self._tasks.spawn(self._finish_accept(pc, channel_future, remote_id, handler), name=f"accept {remote_id}")
        return signing.sign(self._identity, kind=signing.ANSWER, sdp=sdp, receiver=remote_id, nonce=offer.nonce,
                            swarm_key=self.swarm_key)

    async def _finish_accept(
        self, pc: RTCPeerConnection, channel_future: asyncio.Future[_DataChannelFrames], remote_id: PeerId,
        handler: ConnectionHandler,
    ) -> None:
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                frames = await channel_future
                await frames.wait_open()
        except (TimeoutError, TransportError) as e:
            log.warning("WebRTC connection from %s did not open: %s", remote_id, e or "timed out")
            await _close_pc(pc)
            return
        finally:
            self._pending.discard(pc)
        if self._closed:
            await frames.aclose()
            return
        connection = self._adopt(frames, initiator=False, remote_id=remote_id, remote_address=None)
        log.info("WebRTC connection from %s via %s", remote_id, describe_path(pc))
        try:
            await handler(connection)
        except ConnectionClosedError:
            pass
        except Exception:
            log.exception("connection handler failed for %r", connection)
            await connection.aclose()

    # ---- dialling -----------------------------------------------------------------------------------------

    async def dial(self, address: PeerAddress, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> MuxConnection:
        """Connect to `address.peer_id` through the signaler, directly if possible, else through its relay;
        see `Transport.dial` for the errors."""
        self._check_open()
        if address.scheme != SCHEME:
            raise TransportError(f"WebRTC transport cannot dial {address} (scheme {address.scheme!r})")
        if address.peer_id is None:
            raise TransportError(f"cannot dial {address}: a webrtc:// address must name the peer id")
        if self.signaler is None:
            raise TransportError(f"cannot dial {address}: this WebRTC transport has no signaler")
        can_relay = self.relay_fallback and isinstance(self.signaler, RelaySignaler)
        if not self.direct:
            if not can_relay:
                raise TransportError(f"cannot dial {address}: direct WebRTC is off and the signaler cannot relay")
            return await self._dial_relayed(address, connect_timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout_s
        try:
            return await self._dial_direct(address, connect_timeout_s * DIRECT_SHARE if can_relay
                                           else connect_timeout_s)
        except (ConnectTimeoutError, ConnectionClosedError) as e:
            remaining = deadline - loop.time()
            if not can_relay or remaining <= 0:
                raise
            log.info("no direct WebRTC path to %s (%s); trying its relay", address, e)
        return await self._dial_relayed(address, remaining)

    async def _dial_relayed(self, address: PeerAddress, timeout_s: float) -> MuxConnection:
        assert address.peer_id is not None and self.signaler is not None
        stream: RelayChannel | None = None
        try:
            async with asyncio.timeout(timeout_s):
                assert isinstance(self.signaler, RelaySignaler)
                stream = await self.signaler.open_relay(address)
                frames, remote_id = await secure_relayed(stream, self._identity, initiator=True,
                                                         max_frame=self._max_frame, via=_relay_name(address),
                                                         swarm_key=self.swarm_key)
        except TimeoutError:
            if stream is not None:
                await stream.aclose()
            raise ConnectTimeoutError(f"dialling {address} through its relay took longer than the connect "
                                      "timeout") from None
        except BaseException:
            if stream is not None:
                await stream.aclose()
            raise
        if remote_id != address.peer_id:
            await frames.aclose()
            raise PeerIdMismatchError(f"the peer behind relay {_relay_name(address)} proved id {remote_id}, "
                                      f"not {address.peer_id}")
        if self._closed:
            await frames.aclose()
            self._check_open()
        log.info("relayed connection to %s via %s", remote_id, frames.via)
        return self._adopt(frames, initiator=True, remote_id=remote_id, remote_address=address)

    async def accept_relayed(self, stream: RelayChannel, *, via: str) -> None:
        """Serve one relayed connection arriving on `stream` until it closes (the relay's stream handler runs this).

        Raises:
            HandshakeError / ConnectTimeoutError: the dialler failed to prove an identity in time.
            TransportError: we are not listening.
        """
        self._check_open()
        handler = self._handler
        if handler is None:
            raise TransportError("this node does not accept connections")
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                frames, remote_id = await secure_relayed(stream, self._identity, initiator=False,
                                                         max_frame=self._max_frame, via=via,
                                                         swarm_key=self.swarm_key)
        except TimeoutError:
            raise HandshakeTimeoutError(f"relayed handshake took over {self._handshake_timeout_s} s") from None
        connection = self._adopt(frames, initiator=False, remote_id=remote_id, remote_address=None)
        log.info("relayed connection from %s via %s", remote_id, via)
        try:
            await handler(connection)
            await connection.wait_closed()
        except ConnectionClosedError:
            pass
        finally:
            await connection.aclose()

    async def _dial_direct(self, address: PeerAddress, connect_timeout_s: float) -> MuxConnection:
        assert address.peer_id is not None and self.signaler is not None
        pc: RTCPeerConnection | None = None
        try:
            async with asyncio.timeout(connect_timeout_s):
                extra = await self.signaler.ice_servers(address)
                pc = self._new_pc(extra)
                with _map_errors(f"dialling {address}"):
                    frames = _DataChannelFrames(pc, pc.createDataChannel(_LABEL, ordered=True), self._max_frame)
                    await pc.setLocalDescription(await pc.createOffer())
                    offer = signing.sign(self._identity, kind=signing.OFFER, sdp=pc.localDescription.sdp,
                                         receiver=address.peer_id, swarm_key=self.swarm_key)
                answer = await self.signaler.exchange(address, offer)
                remote_id = signing.verify_answer(answer, offer, self.local_peer_id, address.peer_id,
                                                     swarm_key=self.swarm_key)
                with _map_errors(f"dialling {address}"):
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
                await frames.wait_open()
        except TimeoutError:
            if pc is not None:
                await _close_pc(pc)
            raise ConnectTimeoutError(f"dialling {address} took longer than {connect_timeout_s} s") from None
        except BaseException:
            if pc is not None:
                await _close_pc(pc)
            raise
        if self._closed:
            await frames.aclose()
            self._check_open()
        log.info("WebRTC connection to %s via %s", remote_id, describe_path(pc))
        return self._adopt(frames, initiator=True, remote_id=remote_id, remote_address=address)

    def _adopt(
        self, frames: _DataChannelFrames | RelayedFrames, *, initiator: bool, remote_id: PeerId,
        remote_address: PeerAddress | None,
    ) -> MuxConnection:
        connection = MuxConnection(
            frames, initiator=initiator, local_peer_id=self.local_peer_id, remote_peer_id=remote_id,
            remote_address=remote_address, config=self.config, on_closed=self._connections.discard,
        )
        self._connections.add(connection)
        connection.start()
        return connection

    async def aclose(self) -> None:
        """Close every connection and pending handshake (idempotent)."""
        self._handler = None
        try:
            await self._close_lifecycle(self._connections)
        finally:
            for pc in list(self._pending):
                await _close_pc(pc)
            self._pending.clear()


def _relay_name(address: PeerAddress) -> str:
    return f"{address.host}:{address.port}"


def _path_of(channel: _DataChannelFrames | RelayedFrames) -> str:
    if isinstance(channel, RelayedFrames):
        return f"relayed via {channel.via}"
    return describe_path(channel.pc)


def describe_path(pc: RTCPeerConnection) -> str:
    """The nominated ICE pair, e.g. 'host 10.1.0.2:40000 -> srflx 198.18.0.3:61000', or 'unknown'.

    Candidate types: host, srflx (a NAT's public mapping, learnt via STUN), prflx (learnt from a check), relay
    (TURN). A 'relay' on either side means the data goes through a relay; otherwise the path is direct."""
    with contextlib.suppress(Exception):
        sctp = pc.sctp
        assert sctp is not None
        ice = sctp.transport.transport._connection  # aioice.Connection
        pair = ice._nominated.get(1)
        if pair is not None:
            local, remote = pair.local_candidate, pair.remote_candidate
            return f"{local.type} {local.host}:{local.port} -> {remote.type} {remote.host}:{remote.port}"
    return "unknown"

"""WebRTC signaling and STUN through the swarm itself: no outside service.

A node behind NAT keeps an RPC connection to a public peer (its bootstrap) and registers with it; it is then
reachable as `webrtc://RELAY_HOST:RELAY_PORT/NODE_PEER_ID`. A dialler sends its signed offer over RPC to the relay
(verb "webrtc_relay"), the relay forwards it over the standing connection (verb "webrtc_offer"), and the answer
comes back the same way. Public nodes also answer STUN binding requests (port given by "webrtc_info"), so both
sides learn their server-reflexive addresses from the relay. When no direct path exists (symmetric NAT), the
dialler opens stream "relay_open" to the relay, which opens "relay_accept" to the target over the standing
connection and pipes opaque, end-to-end encrypted `RelayData` both ways under a bandwidth cap.

Why the address names the relay's host and port but not its peer id: offer and answer are signed end to end
(`petalnode.transport._webrtc_signing`), so the relay is not trusted with anything but delivery; PeerAddress
then stays the same 4-field value for every scheme.

Modules: the messages are in `_signaling_messages.py`, what a relay serves (registration, forwarding, the data
relay and its token buckets) in `_relay_server.py`; this module is the dialling signaler and registration.

Invariants:
- A relay forwards only to peers registered on a live connection, keyed by the peer id that connection proved
  in its TCP handshake (a peer cannot register in another's name).
- Registration includes a dial-back: the relay tries the node's own TCP address (bounded by
  DIAL_BACK_TIMEOUT_S); a node that is reachable directly announces tcp://, otherwise webrtc:// via the relay.
- Relayed bytes (both directions, all sessions) never exceed `NatOptions.relay_bytes_per_s` on average (a token
  bucket with one second of burst), and at most MAX_RELAYED sessions run at once.
- A lost relay connection is re-registered in the background with exponential backoff (bounded) until aclose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from petalnode._lifecycle import TaskOwner
from petalnode.codecs import Message
from petalnode.errors import BadRequestError, ConfigError, PetalnodeError, TransportError
from petalnode.identity import Identity, PeerAddress
from petalnode.node._relay_server import DIAL_BACK_TIMEOUT_S, FORWARD_TIMEOUT_S, RelayServer
from petalnode.node._signaling_messages import (
    RelayAccept,
    RelayOffer,
    RelayOpen,
    RelayRegister,
    RelayRegistered,
    WebRTCInfo,
    WebRTCInfoRequest,
)
from petalnode.rpc import RPC, CallContext, RPCStream
from petalnode.swarm_key import SwarmKey
from petalnode.transport import (
    IceServer,
    MultiTransport,
    RelayData,
    SignedDescription,
    StunServer,
    TcpTransport,
    WebRTCTransport,
)

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True)
class NatOptions:
    """How a node deals with NAT.

    Args:
        mode: "auto" (dial-back check decides), "public" (announce TCP only) or "nat" (announce WebRTC via the
            first bootstrap that accepts us, even when a dial-back would succeed).
        stun: run a STUN server (public nodes; harmless elsewhere).
        turn: TURN server URLs (`turn:USER:PASS@HOST:PORT`) tried by ICE besides direct paths.
        relay_bytes_per_s: this node's cap on data it relays for others when direct connection fails (0: relay
            nothing). The default 4 MiB/s is a home uplink's worth; tokens of a small model need far less.
    """

    mode: str = "auto"
    stun: bool = True
    turn: tuple[str, ...] = ()
    relay_bytes_per_s: float = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "public", "nat"):
            raise ConfigError(f"NAT mode must be auto, public or nat, got {self.mode!r}")


class Signaling:
    """The dialler side of relaying (a `Signaler`), registration with a relay, and (in `relay_server`) the relay
    verbs this node serves for others.

    One object per node or client. `transport()` builds the TCP + WebRTC transport it signals for; `attach(rpc)`
    serves the verbs on the node's RPC (a client without one gets a private RPC for its outgoing calls).
    """

    def __init__(self, identity: Identity, options: NatOptions | None = None, *,
                 swarm_key: SwarmKey | None = None) -> None:
        # swarm_key: a private swarm's key, given to both transports and to the relay's dial-back probe.
        self.identity = identity
        self.options = options or NatOptions()
        self._turn = [IceServer.parse(url) for url in self.options.turn]
        self.webrtc = WebRTCTransport(identity, signaler=self, ice_servers=self._turn, swarm_key=swarm_key)
        self.tcp = TcpTransport(identity, swarm_key=swarm_key)
        self._rpc: RPC | None = None
        self._own_rpc: RPC | None = None
        self._stun: StunServer | None = None
        self._stun_ports: dict[str, int] = {}
        self._tasks = TaskOwner("signaling")  # re-registration with the relay
        self.relay_server = RelayServer(identity, self.webrtc, rpc=lambda: self.rpc, stun_port=lambda: self.stun_port,
                                        relay_bytes_per_s=self.options.relay_bytes_per_s, swarm_key=swarm_key)
        self.relay: PeerAddress | None = None
        self.reachable: bool | None = None

    def transport(self) -> MultiTransport:
        """TCP first (the node's listen address), WebRTC second; closing it closes this object too."""
        return _SignalingTransport(self)

    def attach(self, rpc: RPC) -> None:
        """Serve the relay verbs on `rpc` and use it for our own signaling calls."""
        self._rpc = rpc
        self.relay_server.attach(rpc)
        rpc.add_unary_handler("webrtc_offer", self.rpc_webrtc_offer, request_type=SignedDescription)
        rpc.add_stream_handler("relay_accept", self.rpc_relay_accept, request_type=(RelayAccept, RelayData))

    @property
    def rpc(self) -> RPC:
        if self._rpc is None:
            if self._own_rpc is None:
                self._own_rpc = RPC(self.tcp)
            return self._own_rpc
        return self._rpc

    @property
    def stun_port(self) -> int:
        return self._stun.port if self._stun is not None else 0

    async def start(self, address: PeerAddress, bootstrap: Sequence[PeerAddress], *, listen_host: str = "0.0.0.0"
                    ) -> PeerAddress:
        """Start STUN and, unless public, find a relay among `bootstrap`. Returns the address to announce.

        Args:
            address: our own tcp:// address (host as others would dial it).
            bootstrap: public peers to ask for a dial-back and, if we are not reachable, to relay for us.
            listen_host: where the STUN server binds (the node's listen host).
        """
        if self.options.stun:
            self._stun = await StunServer(listen_host).start()
        if self.options.mode == "public" or not bootstrap:
            self.reachable = True if self.options.mode == "public" else None
            return address
        for relay in bootstrap:
            try:
                reachable = await self._register(relay, address)
            except (PetalnodeError, TimeoutError) as e:
                log.warning("relay %s refused to register us: %s", relay, e)
                continue
            self.reachable = reachable
            if reachable and self.options.mode == "auto":
                log.info("reachable directly at %s (dial-back from %s succeeded)", address, relay)
                await self._unregister_quietly(relay)
                return address
            self.relay = relay
            self.webrtc.set_relay(relay)
            self._tasks.spawn(self._keep_registered(relay, address), name="webrtc-relay")
            log.info("not reachable directly; reachable by WebRTC at %s", self.webrtc.address)
            return self.webrtc.address
        log.warning("no bootstrap peer would relay for us; announcing %s (may be unreachable)", address)
        return address

    async def _register(self, relay: PeerAddress, address: PeerAddress) -> bool:
        reply = await self.rpc.call(_tcp(relay), "webrtc_register", RelayRegister(tcp_address=str(address)),
                                    expected=RelayRegistered, timeout_s=DIAL_BACK_TIMEOUT_S + FORWARD_TIMEOUT_S)
        assert isinstance(reply, RelayRegistered)
        if reply.stun_port:
            self._stun_ports[_relay_key(relay)] = reply.stun_port
            self.webrtc.ice_servers = [*self._turn, IceServer.parse(_stun_server(relay.host, reply.stun_port))]
        return reply.reachable

    async def _unregister_quietly(self, relay: PeerAddress) -> None:
        # The standing connection is what keeps us registered; a public node does not need it.
        with contextlib.suppress(PetalnodeError):
            connection = await self.rpc.connect(_tcp(relay))
            await connection.aclose()

    async def _keep_registered(self, relay: PeerAddress, address: PeerAddress) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                connection = await self.rpc.connect(_tcp(relay))
                await connection.wait_closed()
                log.warning("lost the connection to relay %s; registering again", relay)
                await self._register(relay, address)
                delay = RECONNECT_MIN_S
            except (PetalnodeError, TimeoutError) as e:
                log.warning("re-registering with relay %s failed: %s (retry in %.0f s)", relay, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    # ---- Signaler (dialler side) ----------------------------------------------------------------------------

    async def ice_servers(self, address: PeerAddress) -> list[str]:
        """The STUN server of the relay in `address` (asked once per relay)."""
        key = _relay_key(address)
        port = self._stun_ports.get(key)
        if port is None:
            reply = await self.rpc.call(_tcp(address), "webrtc_info", WebRTCInfoRequest(), expected=WebRTCInfo,
                                        timeout_s=FORWARD_TIMEOUT_S)
            assert isinstance(reply, WebRTCInfo)
            port = self._stun_ports[key] = reply.stun_port
        return [_stun_server(address.host, port)] if port else []

    async def exchange(self, address: PeerAddress, offer: SignedDescription) -> SignedDescription:
        assert address.peer_id is not None
        reply = await self.rpc.call(_tcp(address), "webrtc_relay", RelayOffer(target=address.peer_id.raw, offer=offer),
                                    expected=SignedDescription, timeout_s=FORWARD_TIMEOUT_S)
        assert isinstance(reply, SignedDescription)
        return reply

    async def open_relay(self, address: PeerAddress) -> RPCStream:
        assert address.peer_id is not None
        stream = await self.rpc.open_stream(_tcp(address), "relay_open", expected=RelayData)
        try:
            await stream.send(RelayOpen(target=address.peer_id.raw))
        except BaseException:
            await stream.aclose()
            raise
        return stream

    # ---- RPC handlers (the target side; the relay side is `RelayServer`) --------------------------------------

    async def rpc_webrtc_offer(self, request: Message, context: CallContext) -> SignedDescription:
        assert isinstance(request, SignedDescription)
        try:
            return await self.webrtc.accept_offer(request)
        except TransportError as e:
            raise BadRequestError(f"offer refused: {e}") from None

    async def rpc_relay_accept(self, stream: RPCStream, context: CallContext) -> None:
        """A relayed connection arriving through our relay (`context` is the relay)."""
        first = await stream.receive(timeout_s=FORWARD_TIMEOUT_S)
        if not isinstance(first, RelayAccept):
            raise BadRequestError("a relay_accept stream starts with RelayAccept")
        await self.webrtc.accept_relayed(stream, via=f"relay {context.remote_peer_id}")

    # ---- lifecycle ------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop relaying, STUN and re-registration (idempotent). The transports close with `transport()`."""
        await self._tasks.aclose()
        if self._stun is not None:
            await self._stun.aclose()
        if self._own_rpc is not None:
            await self._own_rpc.aclose()
        self.relay_server.clear()


class _SignalingTransport(MultiTransport):
    """TCP + WebRTC whose `aclose` also stops the signaling object (so a client that closes its transport
    releases everything)."""

    def __init__(self, signaling: Signaling) -> None:
        super().__init__(signaling.tcp, signaling.webrtc)
        self.signaling = signaling

    async def aclose(self) -> None:
        await self.signaling.aclose()
        await super().aclose()


def _tcp(address: PeerAddress) -> PeerAddress:
    """The relay's TCP address inside a webrtc:// (or tcp://) address; its peer id is not pinned (see above)."""
    if address.scheme == "tcp" and address.peer_id is not None:
        return address
    return PeerAddress("tcp", address.host, address.port)


def _relay_key(address: PeerAddress) -> str:
    return f"{address.host}:{address.port}"


def _stun_server(host: str, port: int) -> str:
    return f"stun:{host}:{port}"

# The relay side of signaling: what a public node does for nodes behind NAT (see node/_signaling.py for the
# protocol as a whole and node/_signaling_messages.py for the messages).
#
# Invariants:
# - A relay forwards only to peers registered on a live connection, keyed by the peer id that connection proved
#   in its TCP handshake (a peer cannot register in another's name).
# - Registration includes a dial-back: the relay tries the node's own TCP address (bounded by
#   DIAL_BACK_TIMEOUT_S), at most DIAL_BACKS_PER_S on average across all peers.
# - Relayed bytes (both directions, all sessions) never exceed `relay_bytes_per_s` on average (a token bucket
#   with one second of burst), and at most MAX_RELAYED sessions run at once.
# - Both token buckets read the injected `clock` (default: the running loop's time).

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from petalnode.codecs import Message
from petalnode.errors import BadRequestError, BusyError, PetalnodeError, TransportError, UnknownSessionError
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.node._signaling_messages import (
    RelayAccept,
    RelayOffer,
    RelayOpen,
    RelayRegister,
    RelayRegistered,
    WebRTCInfo,
    WebRTCInfoRequest,
)
from petalnode.node._token_bucket import TokenBucket
from petalnode.rpc import RPC, CallContext, RPCStream
from petalnode.swarm_key import SwarmKey
from petalnode.transport import Connection, RelayData, SignedDescription, TcpTransport, WebRTCTransport

log = logging.getLogger(__name__)

# A relay's dial-back to a registering node: a LAN/Internet TCP handshake takes well under a second.
DIAL_BACK_TIMEOUT_S = 2.0
# Forwarding an offer includes the target's ICE gathering (STUN: one round trip, 5 s if unreachable).
FORWARD_TIMEOUT_S = 10.0
MAX_REGISTERED = 1024
MAX_RELAYED = 64
# Dial-backs go to an address the registering peer names, so a relay could be used to probe other hosts; a low
# global rate keeps it useless for that (honest nodes register once per relay connection).
DIAL_BACKS_PER_S = 2.0
DIAL_BACK_BURST = 10.0


class RelayServer:
    """The relay verbs a node serves for others: STUN port, registration, offer forwarding, the data relay.

    Args:
        identity: this node's identity (dial-backs prove it).
        webrtc: this node's WebRTC transport (an offer addressed to the relay itself is answered there).
        rpc: returns the RPC to forward on (the node's, once attached).
        stun_port: returns this node's STUN port (0: none).
        relay_bytes_per_s: cap on relayed data (0: relay nothing).
        clock: a monotonic clock for the token buckets (None: the running loop's time).
        swarm_key: a private swarm's key (the dial-back probe must be keyed to reach a member).
    """

    def __init__(self, identity: Identity, webrtc: WebRTCTransport, *, rpc: Callable[[], RPC],
                 stun_port: Callable[[], int], relay_bytes_per_s: float,
                 clock: Callable[[], float] | None = None, swarm_key: SwarmKey | None = None) -> None:
        self.identity = identity
        self.swarm_key = swarm_key
        self.webrtc = webrtc
        self.relay_bytes_per_s = relay_bytes_per_s
        self._rpc = rpc
        self._stun_port = stun_port
        self._registered: dict[PeerId, Connection] = {}
        # A zero cap relays nothing (refused in rpc_relay_open), so the bucket's rate is only ever used when > 0.
        self._bucket = TokenBucket(relay_bytes_per_s or 1.0, relay_bytes_per_s or 1.0, clock=clock)
        self._dial_backs = TokenBucket(DIAL_BACKS_PER_S, DIAL_BACK_BURST, clock=clock)
        self._relayed = 0
        self.relayed_bytes = 0

    def attach(self, rpc: RPC) -> None:
        """Serve the relay verbs on `rpc`."""
        rpc.add_unary_handler("webrtc_info", self.rpc_webrtc_info, request_type=WebRTCInfoRequest)
        rpc.add_unary_handler("webrtc_register", self.rpc_webrtc_register, request_type=RelayRegister)
        rpc.add_unary_handler("webrtc_relay", self.rpc_webrtc_relay, request_type=RelayOffer)
        rpc.add_stream_handler("relay_open", self.rpc_relay_open, request_type=(RelayOpen, RelayData))

    def clear(self) -> None:
        """Forget every registration (on close)."""
        self._registered.clear()

    async def rpc_webrtc_info(self, request: Message, context: CallContext) -> WebRTCInfo:
        return WebRTCInfo(stun_port=self._stun_port())

    async def rpc_webrtc_register(self, request: Message, context: CallContext) -> RelayRegistered:
        assert isinstance(request, RelayRegister)
        peer = context.remote_peer_id
        if peer not in self._registered and len(self._registered) >= MAX_REGISTERED:
            raise BadRequestError(f"this relay already serves {MAX_REGISTERED} peers")
        reachable = await self._dial_back(request.tcp_address, peer)
        self._registered[peer] = context.connection
        log.info("relaying WebRTC offers for %s (reachable directly: %s)", peer, reachable)
        return RelayRegistered(stun_port=self._stun_port(), reachable=reachable)

    async def _dial_back(self, text: str, peer: PeerId) -> bool:
        try:
            address = PeerAddress.parse(text).with_peer_id(peer)
        except PetalnodeError as e:
            raise BadRequestError(f"bad tcp_address: {e}") from None
        if address.scheme != "tcp":
            raise BadRequestError(f"tcp_address must be tcp://, got {address.scheme}://")
        await self._dial_backs.take(1)
        # A fresh TCP transport: the pooled connection to this peer is the one it dialled us on, which proves
        # nothing about whether we can reach it.
        async with TcpTransport(self.identity, swarm_key=self.swarm_key) as probe:
            try:
                connection = await probe.dial(address, connect_timeout_s=DIAL_BACK_TIMEOUT_S)
            except TransportError:
                return False
            await connection.aclose()
        return True

    async def rpc_webrtc_relay(self, request: Message, context: CallContext) -> SignedDescription:
        assert isinstance(request, RelayOffer)
        try:
            target = PeerId(request.target)
        except ValueError:
            raise BadRequestError("target is not a peer id") from None
        if target == self.identity.peer_id:
            return await self.webrtc.accept_offer(request.offer)
        connection = self._registered.get(target)
        if connection is None or connection.closed:
            self._registered.pop(target, None)
            raise UnknownSessionError(f"peer {target} is not registered with this relay")
        reply = await self._rpc().call(connection, "webrtc_offer", request.offer, expected=SignedDescription,
                                    timeout_s=FORWARD_TIMEOUT_S)
        assert isinstance(reply, SignedDescription)
        return reply

    async def rpc_relay_open(self, upstream: RPCStream, context: CallContext) -> None:
        """Pipe the caller to a registered peer (the relay path for symmetric NATs), under the bandwidth cap."""
        request = await upstream.receive(timeout_s=FORWARD_TIMEOUT_S)
        if not isinstance(request, RelayOpen):
            raise BadRequestError("a relay_open stream starts with RelayOpen")
        if self.relay_bytes_per_s <= 0 or self._relayed >= MAX_RELAYED:
            raise BusyError("this node relays no more connections now")
        try:
            target = PeerId(request.target)
        except ValueError:
            raise BadRequestError("target is not a peer id") from None
        connection = self._registered.get(target)
        if connection is None or connection.closed:
            raise UnknownSessionError(f"peer {target} is not registered with this relay")
        self._relayed += 1
        try:
            downstream = await self._rpc().open_stream(connection, "relay_accept", expected=RelayData)
            try:
                await downstream.send(RelayAccept(source=context.remote_peer_id.raw))
                log.info("relaying %s -> %s", context.remote_peer_id, target)
                await self._pipe(upstream, downstream)
            finally:
                await downstream.aclose()
        finally:
            self._relayed -= 1

    async def _pipe(self, a: RPCStream, b: RPCStream) -> None:
        async def copy(source: RPCStream, sink: RPCStream) -> None:
            while True:
                message = await source.receive()
                if not isinstance(message, RelayData):
                    raise BadRequestError("only RelayData travels through a relay")
                await self._bucket.take(len(message.data))
                self.relayed_bytes += len(message.data)
                await sink.send(message)

        tasks = [asyncio.create_task(copy(a, b)), asyncio.create_task(copy(b, a))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

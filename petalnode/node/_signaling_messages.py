# The signaling messages: what a node behind NAT, its relay and a dialler say to each other over RPC.
#
# The verbs that carry them (node/_signaling.py, node/_relay_server.py):
# - "webrtc_info": WebRTCInfoRequest -> WebRTCInfo (the relay's STUN port).
# - "webrtc_register": RelayRegister -> RelayRegistered (after a dial-back to `tcp_address`).
# - "webrtc_relay": RelayOffer -> SignedDescription (the relay forwards the offer as "webrtc_offer").
# - streams "relay_open" (first message RelayOpen) and "relay_accept" (first message RelayAccept), then only
#   `RelayData` both ways.
#
# Invariant: every field is bounded on the wire (`wire_field`), so a peer cannot make us buffer more.

from __future__ import annotations

from typing import ClassVar

from petalnode.codecs import Message, register_message, wire_field
from petalnode.identity import PEER_ID_BYTES
from petalnode.transport import SignedDescription

MAX_ADDRESS_CHARS = 300


@register_message
class WebRTCInfoRequest(Message):
    KIND: ClassVar[str] = "node.webrtc.info"
    VERSION: ClassVar[int] = 1


@register_message
class WebRTCInfo(Message):
    KIND: ClassVar[str] = "node.webrtc.info.result"
    VERSION: ClassVar[int] = 1
    stun_port: int = wire_field(min_value=0, max_value=65535)  # 0: this node runs no STUN server


@register_message
class RelayRegister(Message):
    KIND: ClassVar[str] = "node.webrtc.register"
    VERSION: ClassVar[int] = 1
    tcp_address: str = wire_field(max_len=MAX_ADDRESS_CHARS)  # where the relay tries to dial back


@register_message
class RelayRegistered(Message):
    KIND: ClassVar[str] = "node.webrtc.registered"
    VERSION: ClassVar[int] = 1
    stun_port: int = wire_field(min_value=0, max_value=65535)
    reachable: bool = False  # the dial-back to tcp_address succeeded


@register_message
class RelayOffer(Message):
    KIND: ClassVar[str] = "node.webrtc.relay"
    VERSION: ClassVar[int] = 1
    target: bytes = wire_field(max_len=PEER_ID_BYTES)
    offer: SignedDescription


@register_message
class RelayOpen(Message):
    """First message of a "relay_open" stream: pipe me to `target`."""

    KIND: ClassVar[str] = "node.webrtc.relay_open"
    VERSION: ClassVar[int] = 1
    target: bytes = wire_field(max_len=PEER_ID_BYTES)


@register_message
class RelayAccept(Message):
    """First message of a "relay_accept" stream: a relayed connection from `source` (unproven until its
    handshake)."""

    KIND: ClassVar[str] = "node.webrtc.relay_accept"
    VERSION: ClassVar[int] = 1
    source: bytes = wire_field(max_len=PEER_ID_BYTES)

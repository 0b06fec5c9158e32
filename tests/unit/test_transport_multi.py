"""MultiTransport: one transport per scheme, one identity (no sockets)."""

from __future__ import annotations

import pytest

from petalnode.errors import ConfigError, TransportError
from petalnode.identity import Identity, PeerAddress
from petalnode.transport import MultiTransport, TcpTransport, WebRTCTransport


async def test_dispatch_by_scheme_and_checks() -> None:
    me = Identity.generate()
    tcp, webrtc = TcpTransport(me), WebRTCTransport(me)
    multi = MultiTransport(tcp, webrtc)
    assert multi.scheme == "tcp" and multi.local_peer_id == me.peer_id
    assert multi.member("webrtc") is webrtc and multi.member("memory") is None
    with pytest.raises(TransportError, match="no transport for scheme 'memory'"):
        await multi.dial(PeerAddress.parse("memory://h:1"))
    with pytest.raises(TransportError, match="no signaler"):  # reached the WebRTC member
        await multi.dial(PeerAddress("webrtc", "h", 1, Identity.generate().peer_id))
    with pytest.raises(ConfigError):
        MultiTransport(tcp, TcpTransport(me))
    with pytest.raises(ConfigError):
        MultiTransport(tcp, WebRTCTransport(Identity.generate()))
    await multi.aclose()

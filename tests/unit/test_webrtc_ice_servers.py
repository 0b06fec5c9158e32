"""A WebRTC peer connection only ever uses the ICE servers we name: none by default, never aiortc's public STUN
(aiortc falls back to stun.l.google.com when the configuration's iceServers is None)."""

from __future__ import annotations

import pytest

from petalnode.identity import Identity
from petalnode.transport import WebRTCTransport, _webrtc


@pytest.fixture
def configurations(monkeypatch: pytest.MonkeyPatch) -> list:
    seen: list = []
    monkeypatch.setattr(_webrtc, "RTCPeerConnection", lambda configuration: seen.append(configuration) or object())
    return seen


def test_no_ice_servers_means_none_not_a_public_default(configurations: list) -> None:
    WebRTCTransport(Identity.generate())._new_pc()
    assert configurations[0].iceServers == []  # an explicit empty list, not None


def test_only_the_named_servers_are_used(configurations: list) -> None:
    WebRTCTransport(Identity.generate(), ice_servers=["stun:198.18.0.1:3478"])._new_pc(["stun:198.18.0.2:3478"])
    assert [server.urls for server in configurations[0].iceServers] == ["stun:198.18.0.1:3478",
                                                                         "stun:198.18.0.2:3478"]

"""Signed WebRTC session descriptions: who signed, for whom, for which offer (no sockets)."""

from __future__ import annotations

import dataclasses

import pytest

from petalnode.codecs import decode_message, encode_message
from petalnode.errors import ConfigError, HandshakeError, PeerIdMismatchError
from petalnode.identity import Identity
from petalnode.transport import IceServer, SignedDescription
from petalnode.transport import _webrtc_signing as signing

A, B, C = (Identity.from_seed(bytes([i]) * 32) for i in range(3))
SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\na=fingerprint:sha-256 AB:CD\r\n"


def test_offer_and_answer_round_trip_and_verify() -> None:
    offer = signing.sign(A, kind=signing.OFFER, sdp=SDP, receiver=B.peer_id)
    offer = decode_message(encode_message(offer), expected=SignedDescription)
    assert signing.verify_offer(offer, B.peer_id) == A.peer_id
    answer = signing.sign(B, kind=signing.ANSWER, sdp=SDP + "x", receiver=A.peer_id, nonce=offer.nonce)
    assert signing.verify_answer(answer, offer, A.peer_id, expected=B.peer_id) == B.peer_id


def test_answer_from_another_peer_is_a_peer_id_mismatch() -> None:
    offer = signing.sign(A, kind=signing.OFFER, sdp=SDP, receiver=B.peer_id)
    answer = signing.sign(C, kind=signing.ANSWER, sdp=SDP, receiver=A.peer_id, nonce=offer.nonce)
    with pytest.raises(PeerIdMismatchError):
        signing.verify_answer(answer, offer, A.peer_id, expected=B.peer_id)


@pytest.mark.parametrize("field,value", [
    ("sdp", SDP.replace("AB:CD", "EE:FF")),  # a relay swapping the DTLS fingerprint
    ("receiver", C.peer_id.raw),
    ("public_key", C.public_key),
    ("kind", signing.ANSWER),
])
def test_tampered_offer_is_refused(field: str, value: object) -> None:
    offer = signing.sign(A, kind=signing.OFFER, sdp=SDP, receiver=B.peer_id)
    with pytest.raises(HandshakeError):
        signing.verify_offer(dataclasses.replace(offer, **{field: value}), B.peer_id)


def test_offer_for_someone_else_and_replayed_answer_are_refused() -> None:
    offer = signing.sign(A, kind=signing.OFFER, sdp=SDP, receiver=B.peer_id)
    with pytest.raises(HandshakeError, match="addressed to another peer"):
        signing.verify_offer(offer, C.peer_id)
    old_offer = signing.sign(A, kind=signing.OFFER, sdp=SDP, receiver=B.peer_id)
    old_answer = signing.sign(B, kind=signing.ANSWER, sdp=SDP, receiver=A.peer_id, nonce=old_offer.nonce)
    with pytest.raises(HandshakeError, match="nonce"):
        signing.verify_answer(old_answer, offer, A.peer_id, expected=B.peer_id)


def test_ice_server_urls() -> None:
    assert IceServer.parse("stun:198.18.0.1:3478") == IceServer("stun:198.18.0.1:3478")
    turn = IceServer.parse("turn:user:p%40ss@198.18.0.1:3478?transport=udp")
    assert turn == IceServer("turn:198.18.0.1:3478?transport=udp", "user", "p@ss")
    for bad in ("198.18.0.1:3478", "http://x", "stun:"):
        with pytest.raises(ConfigError):
            IceServer.parse(bad)

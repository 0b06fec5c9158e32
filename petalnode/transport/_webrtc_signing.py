# Signed WebRTC session descriptions: how a WebRTC connection is bound to petalnode identities. Sans-IO.
#
# Why this is enough: DTLS in WebRTC authenticates each side's certificate only against the fingerprint in the
# SDP the other side received (RFC 8842 section 5); aiortc refuses a DTLS peer whose certificate does not match.
# So whoever controls the SDP controls the connection. We sign each SDP with the sender's Ed25519 identity key and
# name the intended receiver inside the signature; the relay that carries offer and answer can then drop or delay
# them but cannot substitute its own fingerprint (that would need the target's private key).
#
# Signed bytes: SIG_LABEL | kind | 0x00 | nonce (16) | receiver peer id (20) | sender public key (32) | SHA-256(sdp).
# Invariants:
# - An offer carries a fresh random nonce; the answer repeats it, so an answer belongs to exactly one offer and
#   cannot be replayed into another dial.
# - `verify_offer` / `verify_answer` either return the sender's proven `PeerId` or raise `HandshakeError`
#   (`PeerIdMismatchError` when the signature is good but from someone other than the dialled peer).

from __future__ import annotations

import hashlib
import os
from typing import ClassVar

from petalnode.codecs import Message, register_message, wire_field
from petalnode.errors import HandshakeError, PeerIdMismatchError
from petalnode.identity import PEER_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId, verify_signature

SIG_LABEL = b"petalnode/webrtc/v1 session description"
NONCE_BYTES = 16
# aiortc's SDP for one data channel is about 1 KiB plus ~100 bytes per candidate; 64 KiB is generous.
MAX_SDP_CHARS = 64 * 1024
OFFER = "offer"
ANSWER = "answer"


@register_message
class SignedDescription(Message):
    """An SDP offer or answer signed by its sender for one receiver."""

    KIND: ClassVar[str] = "transport.webrtc.description"
    VERSION: ClassVar[int] = 1
    kind: str = wire_field(max_len=8)
    sdp: str = wire_field(max_len=MAX_SDP_CHARS)
    nonce: bytes = wire_field(max_len=NONCE_BYTES)
    receiver: bytes = wire_field(max_len=PEER_ID_BYTES)
    public_key: bytes = wire_field(max_len=PUBLIC_KEY_BYTES)
    signature: bytes = wire_field(max_len=SIGNATURE_BYTES)

    @property
    def sender(self) -> PeerId:
        """The sender's claimed id (only proven once a `verify_*` function accepted the description)."""
        return PeerId.from_public_key(self.public_key)


def _signed_bytes(kind: str, nonce: bytes, receiver: bytes, public_key: bytes, sdp: str) -> bytes:
    return (
        SIG_LABEL + kind.encode("ascii") + b"\x00" + nonce + receiver + public_key
        + hashlib.sha256(sdp.encode("utf-8")).digest()
    )


def sign(identity: Identity, *, kind: str, sdp: str, receiver: PeerId, nonce: bytes | None = None) -> SignedDescription:
    """Sign `sdp` for `receiver`; an offer gets a fresh nonce, an answer must pass the offer's."""
    if kind not in (OFFER, ANSWER):
        raise ValueError(f"kind must be {OFFER!r} or {ANSWER!r}, got {kind!r}")
    if nonce is None:
        if kind == ANSWER:
            raise ValueError("an answer must repeat its offer's nonce")
        nonce = os.urandom(NONCE_BYTES)
    signature = identity.sign(_signed_bytes(kind, nonce, receiver.raw, identity.public_key, sdp))
    return SignedDescription(kind=kind, sdp=sdp, nonce=nonce, receiver=receiver.raw,
                             public_key=identity.public_key, signature=signature)


def _verify(description: SignedDescription, kind: str, own_id: PeerId) -> PeerId:
    if description.kind != kind:
        raise HandshakeError(f"expected a signed {kind}, got {description.kind!r}")
    if len(description.nonce) != NONCE_BYTES or len(description.public_key) != PUBLIC_KEY_BYTES:
        raise HandshakeError(f"malformed signed {kind}")
    if description.receiver != own_id.raw:
        raise HandshakeError(f"the {kind} is addressed to another peer, not to us ({own_id})")
    signed = _signed_bytes(kind, description.nonce, description.receiver, description.public_key, description.sdp)
    if not verify_signature(description.public_key, description.signature, signed):
        raise HandshakeError(f"the {kind}'s signature does not verify")
    return description.sender


def verify_offer(offer: SignedDescription, own_id: PeerId) -> PeerId:
    """The offerer's proven id.

    Raises:
        HandshakeError: not an offer, not for us, or a bad signature.
    """
    return _verify(offer, OFFER, own_id)


def verify_answer(answer: SignedDescription, offer: SignedDescription, own_id: PeerId, expected: PeerId) -> PeerId:
    """Check the answer to our `offer` comes from `expected`.

    Raises:
        PeerIdMismatchError: a valid answer, but signed by a peer other than `expected`.
        HandshakeError: not an answer to this offer, not for us, or a bad signature.
    """
    sender = _verify(answer, ANSWER, own_id)
    if answer.nonce != offer.nonce:
        raise HandshakeError("the answer does not belong to our offer (nonce differs)")
    if sender != expected:
        raise PeerIdMismatchError(f"the WebRTC answer was signed by peer {sender}, not {expected}")
    return sender

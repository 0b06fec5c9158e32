# Signed WebRTC session descriptions: how a WebRTC connection is bound to petalnode identities. Sans-IO.
#
# Why this is enough: DTLS in WebRTC authenticates each side's certificate only against the fingerprint in the
# SDP the other side received (RFC 8842 section 5); aiortc refuses a DTLS peer whose certificate does not match.
# So whoever controls the SDP controls the connection. We sign each SDP with the sender's Ed25519 identity key and
# name the intended receiver inside the signature; the relay that carries offer and answer can then drop or delay
# them but cannot substitute its own fingerprint (that would need the target's private key).
#
# Signed bytes: SIG_LABEL | kind | 0x00 | nonce (16) | receiver peer id (20) | sender public key (32) | SHA-256(sdp).
# Private swarms: the signed bytes get HMAC-SHA256(SwarmKey.derive("webrtc signaling"), those bytes) appended
#   (32 bytes). The MAC never travels: the verifier recomputes it, so a signature only verifies for a holder of the
#   same key, and an outsider can neither have its offer answered nor answer ours (so it never learns a DTLS
#   fingerprint to connect to). The message on the wire is unchanged; without a key nothing is appended.
# Invariants:
# - An offer carries a fresh random nonce; the answer repeats it, so an answer belongs to exactly one offer and
#   cannot be replayed into another dial.
# - `verify_offer` / `verify_answer` either return the sender's proven `PeerId` or raise `HandshakeError`
#   (`PeerIdMismatchError` when the signature is good but from someone other than the dialled peer).

from __future__ import annotations

import hashlib
import hmac
import os
from typing import ClassVar

from petalnode.codecs import Message, register_message, wire_field
from petalnode.errors import HandshakeError, PeerIdMismatchError, SwarmKeyMismatchError
from petalnode.identity import PEER_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId, verify_signature
from petalnode.swarm_key import SwarmKey

SIG_LABEL = b"petalnode/webrtc/v1 session description"
MAC_PURPOSE = b"webrtc signaling"
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


def _signed_bytes(
    kind: str, nonce: bytes, receiver: bytes, public_key: bytes, sdp: str, swarm_key: SwarmKey | None = None
) -> bytes:
    signed = (
        SIG_LABEL + kind.encode("ascii") + b"\x00" + nonce + receiver + public_key
        + hashlib.sha256(sdp.encode("utf-8")).digest()
    )
    if swarm_key is None:
        return signed
    return signed + hmac.digest(swarm_key.derive(MAC_PURPOSE), signed, "sha256")


def sign(
    identity: Identity, *, kind: str, sdp: str, receiver: PeerId, nonce: bytes | None = None,
    swarm_key: SwarmKey | None = None,
) -> SignedDescription:
    """Sign `sdp` for `receiver`; an offer gets a fresh nonce, an answer must pass the offer's.

    `swarm_key` (a private swarm) binds the key into the signature: only holders of it can verify.
    """
    if kind not in (OFFER, ANSWER):
        raise ValueError(f"kind must be {OFFER!r} or {ANSWER!r}, got {kind!r}")
    if nonce is None:
        if kind == ANSWER:
            raise ValueError("an answer must repeat its offer's nonce")
        nonce = os.urandom(NONCE_BYTES)
    signature = identity.sign(_signed_bytes(kind, nonce, receiver.raw, identity.public_key, sdp, swarm_key))
    return SignedDescription(kind=kind, sdp=sdp, nonce=nonce, receiver=receiver.raw,
                             public_key=identity.public_key, signature=signature)


def _verify(description: SignedDescription, kind: str, own_id: PeerId, swarm_key: SwarmKey | None) -> PeerId:
    if description.kind != kind:
        raise HandshakeError(f"expected a signed {kind}, got {description.kind!r}")
    if len(description.nonce) != NONCE_BYTES or len(description.public_key) != PUBLIC_KEY_BYTES:
        raise HandshakeError(f"malformed signed {kind}")
    if description.receiver != own_id.raw:
        raise HandshakeError(f"the {kind} is addressed to another peer, not to us ({own_id})")
    fields = (kind, description.nonce, description.receiver, description.public_key, description.sdp)
    if not verify_signature(description.public_key, description.signature, _signed_bytes(*fields, swarm_key)):
        if swarm_key is not None and verify_signature(description.public_key, description.signature,
                                                      _signed_bytes(*fields)):
            raise SwarmKeyMismatchError(f"the {kind} comes from a peer without a swarm key (a public node)")
        if swarm_key is not None:
            raise SwarmKeyMismatchError(f"the {kind}'s signature does not verify under our swarm key (the sender "
                                        "holds another key, or forged it)")
        raise HandshakeError(f"the {kind}'s signature does not verify (or the sender is in a private swarm)")
    return description.sender


def verify_offer(offer: SignedDescription, own_id: PeerId, *, swarm_key: SwarmKey | None = None) -> PeerId:
    """The offerer's proven id.

    Raises:
        SwarmKeyMismatchError: we hold a swarm key and the offer was not signed under it.
        HandshakeError: not an offer, not for us, or a bad signature.
    """
    return _verify(offer, OFFER, own_id, swarm_key)


def verify_answer(
    answer: SignedDescription, offer: SignedDescription, own_id: PeerId, expected: PeerId, *,
    swarm_key: SwarmKey | None = None,
) -> PeerId:
    """Check the answer to our `offer` comes from `expected`.

    Raises:
        PeerIdMismatchError: a valid answer, but signed by a peer other than `expected`.
        SwarmKeyMismatchError: we hold a swarm key and the answer was not signed under it.
        HandshakeError: not an answer to this offer, not for us, or a bad signature.
    """
    sender = _verify(answer, ANSWER, own_id, swarm_key)
    if answer.nonce != offer.nonce:
        raise HandshakeError("the answer does not belong to our offer (nonce differs)")
    if sender != expected:
        raise PeerIdMismatchError(f"the WebRTC answer was signed by peer {sender}, not {expected}")
    return sender

# The authenticated key exchange and record protection of the TCP transport. Sans-IO: keys and bytes in,
# keys, bytes and peer ids out; the asyncio driver lives in `_tcp.py`.
#
# Protocol (version 1), a signed ephemeral Diffie-Hellman in the SIGMA style (Krawczyk, CRYPTO 2003):
#   1. both sides send HELLO = MAGIC (8 bytes) | X25519 ephemeral public key (32 bytes), in the clear;
#   2. transcript hash TH = SHA-256(LABEL | initiator ephemeral | responder ephemeral);
#      keys = HKDF-SHA256(X25519 shared secret, salt=TH, info=KEY_INFO) -> 32 bytes initiator->responder,
#      32 bytes responder->initiator (RFC 5869);
#   3. each side sends, as its first encrypted record, PROOF = Ed25519 public key (32) | signature (64) over
#      SIG_LABEL | role | TH | own Ed25519 public key. The role byte stops a proof being reflected back, TH binds
#      the proof to this session's ephemeral keys, and sending it encrypted hides identities from onlookers.
#      A proof that decrypts is also key confirmation: the peer derived the same record keys.
# Private swarms (`--swarm-key`): PSK = SwarmKey.derive("tcp handshake") is mixed into the key schedule with the
#   DH secret, as TLS 1.3 PSK-DHE (RFC 8446 section 7.1) and Noise's psk modifier do: keys = HKDF-SHA256(X25519
#   shared secret | PSK, salt=TH, info=KEY_INFO_PSK). Without the PSK the first record (the proof) neither
#   decrypts nor can be forged, so an outsider learns no identity and gets no connection (SwarmKeyMismatchError
#   on both sides). The wire is unchanged (same HELLO, same record format); without a key nothing differs at all.
#
# Which standard pattern this is, and what it promises (tests/unit/test_handshake.py checks each): SIGMA
#   ("SIGn-and-MAc", Krawczyk, CRYPTO 2003; the pattern of IKEv2 and of TLS 1.3's CertificateVerify + Finished,
#   RFC 8446 section 4.4), with SIGMA's MAC carried by the AEAD tag of the encrypted proof: key confirmation (a
#   proof only opens under the right keys), identity binding and no unknown-key-share (the signature covers TH and
#   the signer's own key; the peer id is the hash of that key; the AEAD binds both to the session key), no replay
#   into another session (fresh ephemerals change TH), no reflection (role byte; keys are also per direction), and
#   resistance to key-compromise impersonation (a stolen key of A signs only as A; posing as B to A needs B's key).
#   One difference from SIGMA-I: both proofs are sent at once, so identities are hidden from onlookers but not from
#   an active attacker who answers a dial (peer ids are public in the DHT anyway); with a swarm key the proof keys
#   need the PSK, so an outsider learns no identity even then.
# Records: u32 big-endian ciphertext length | ChaCha20-Poly1305(key of the direction, nonce = 4 zero bytes |
#   u64 big-endian counter, aad = the length prefix) (RFC 8439). Counters start at 0 per direction and never
#   repeat; a record that fails authentication, arrives out of order or is over the size limit is fatal.

from __future__ import annotations

import enum
import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from petalnode.errors import HandshakeError, LocalProtocolError, RemoteProtocolError, SwarmKeyMismatchError
from petalnode.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId, verify_signature
from petalnode.swarm_key import SwarmKey

PROTOCOL_VERSION = 1
MAGIC = b"PETALN\x00" + bytes([PROTOCOL_VERSION])
LABEL = b"petalnode/tcp/v1 handshake"
SIG_LABEL = b"petalnode/tcp/v1 identity proof"
KEY_INFO = b"petalnode/tcp/v1 record keys"
KEY_INFO_PSK = b"petalnode/tcp/v1 record keys with swarm key"
PSK_PURPOSE = b"tcp handshake"
HELLO_BYTES = len(MAGIC) + 32
PROOF_BYTES = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
LENGTH_PREFIX = struct.Struct(">I")
TAG_BYTES = 16
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_MAX_COUNTER = 2**64 - 1


class Role(enum.Enum):
    INITIATOR = b"I"
    RESPONDER = b"R"

    @property
    def other(self) -> Role:
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR


class EphemeralKey:
    """One side's X25519 key for one handshake; never reused."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        raw = serialization.Encoding.Raw
        self.public = self._private.public_key().public_bytes(raw, serialization.PublicFormat.Raw)

    def hello(self) -> bytes:
        return MAGIC + self.public

    def exchange(self, peer_public: bytes) -> bytes:
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:  # e.g. a low-order point giving an all-zero secret
            raise HandshakeError(f"bad ephemeral key from peer: {e}") from None


def parse_hello(data: bytes) -> bytes:
    """The peer's ephemeral public key from its HELLO.

    Raises:
        HandshakeError: wrong length, not a petalnode peer, or another protocol version.
    """
    if len(data) != HELLO_BYTES:
        raise HandshakeError(f"HELLO of {len(data)} bytes (must be {HELLO_BYTES})")
    if data[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise HandshakeError("peer is not speaking the petalnode TCP protocol")
    if data[len(MAGIC) - 1] != PROTOCOL_VERSION:
        raise HandshakeError(f"peer speaks TCP protocol version {data[len(MAGIC) - 1]}, we speak {PROTOCOL_VERSION}")
    return bytes(data[len(MAGIC) :])


def transcript_hash(initiator_ephemeral: bytes, responder_ephemeral: bytes) -> bytes:
    return hashlib.sha256(LABEL + initiator_ephemeral + responder_ephemeral).digest()


def derive_keys(shared_secret: bytes, th: bytes, role: Role, psk: bytes | None = None) -> tuple[bytes, bytes]:
    """(send key, receive key) for `role`; with `psk` (a private swarm) both secrets feed the key schedule."""
    if psk is None:
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=th, info=KEY_INFO).derive(shared_secret)
    else:
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=th, info=KEY_INFO_PSK).derive(shared_secret + psk)
    i2r, r2i = okm[:32], okm[32:]
    return (i2r, r2i) if role is Role.INITIATOR else (r2i, i2r)


def _signed_bytes(role: Role, th: bytes, public_key: bytes) -> bytes:
    return SIG_LABEL + role.value + th + public_key


def make_proof(identity: Identity, role: Role, th: bytes) -> bytes:
    return identity.public_key + identity.sign(_signed_bytes(role, th, identity.public_key))


def verify_proof(proof: bytes, peer_role: Role, th: bytes) -> PeerId:
    """The peer id proven by `proof`.

    Raises:
        HandshakeError: malformed proof or a signature that does not verify.
    """
    if len(proof) != PROOF_BYTES:
        raise HandshakeError(f"identity proof of {len(proof)} bytes (must be {PROOF_BYTES})")
    public_key, signature = bytes(proof[:PUBLIC_KEY_BYTES]), bytes(proof[PUBLIC_KEY_BYTES:])
    if not verify_signature(public_key, signature, _signed_bytes(peer_role, th, public_key)):
        raise HandshakeError("peer's identity signature does not verify")
    return PeerId.from_public_key(public_key)


class RecordSealer:
    """Encrypts outgoing records of one direction."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        if self._counter > _MAX_COUNTER:
            raise LocalProtocolError("record counter exhausted; reconnect")
        prefix = LENGTH_PREFIX.pack(len(plaintext) + TAG_BYTES)
        nonce = _NONCE_PREFIX + self._counter.to_bytes(8, "big")
        self._counter += 1
        return prefix + self._aead.encrypt(nonce, plaintext, prefix)


class RecordOpener:
    """Checks and decrypts incoming records of one direction."""

    def __init__(self, key: bytes, max_plaintext_bytes: int) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0
        self.max_record_bytes = max_plaintext_bytes + TAG_BYTES

    def record_length(self, prefix: bytes) -> int:
        """The ciphertext length announced by a 4-byte prefix, checked against the limit before reading it."""
        (length,) = LENGTH_PREFIX.unpack(prefix)
        if length > self.max_record_bytes:
            raise RemoteProtocolError(f"record of {length} bytes exceeds the limit of {self.max_record_bytes}")
        if length < TAG_BYTES:
            raise RemoteProtocolError(f"record of {length} bytes is shorter than its authentication tag")
        return int(length)

    def open(self, prefix: bytes, ciphertext: bytes) -> bytes:
        if self._counter > _MAX_COUNTER:
            raise RemoteProtocolError("record counter exhausted")
        nonce = _NONCE_PREFIX + self._counter.to_bytes(8, "big")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, prefix)
        except InvalidTag:
            raise RemoteProtocolError("record failed authentication (tampered, replayed or out of order)") from None
        self._counter += 1
        return plaintext


class Handshake:
    """One side of one handshake, sans-IO; the drivers (`_tcp.py`, `_relayed.py`) only move its bytes.

    `hello()` -> send; `receive_hello(peer hello)` -> the sealed proof record to send; `receive_proof(prefix,
    ciphertext)` -> the peer's proven id. Afterwards `sealer` / `opener` protect the records of the connection.
    """

    def __init__(self, identity: Identity, role: Role, *, max_frame: int, swarm_key: SwarmKey | None = None) -> None:
        self._identity = identity
        self.role = role
        self._max_frame = max_frame
        self._psk = None if swarm_key is None else swarm_key.derive(PSK_PURPOSE)
        self._ephemeral = EphemeralKey()
        self._th: bytes | None = None
        self.sealer: RecordSealer | None = None
        self.opener: RecordOpener | None = None

    def hello(self) -> bytes:
        return self._ephemeral.hello()

    def receive_hello(self, data: bytes) -> bytes:
        """Derive the record keys from the peer's HELLO; returns our sealed identity proof (the first record)."""
        if self._th is not None:
            raise LocalProtocolError("HELLO already received")
        peer = parse_hello(data)
        own = self._ephemeral.public
        th = transcript_hash(own, peer) if self.role is Role.INITIATOR else transcript_hash(peer, own)
        send_key, receive_key = derive_keys(self._ephemeral.exchange(peer), th, self.role, self._psk)
        self._th = th
        self.sealer, self.opener = RecordSealer(send_key), RecordOpener(receive_key, self._max_frame)
        return self.sealer.seal(make_proof(self._identity, self.role, th))

    def receive_proof(self, prefix: bytes, ciphertext: bytes) -> PeerId:
        """The peer id the first record proves.

        Raises:
            SwarmKeyMismatchError: the record does not open under our keys (the swarm keys differ).
            HandshakeError: a malformed proof or a bad signature.
        """
        if self._th is None or self.opener is None:
            raise LocalProtocolError("identity proof before HELLO")
        try:
            if self.opener.record_length(prefix) != len(ciphertext):
                raise HandshakeError("identity proof record shorter or longer than its length prefix")
            proof = self.opener.open(prefix, ciphertext)
        except RemoteProtocolError as e:
            if "authentication" not in str(e):
                raise HandshakeError(f"bad identity proof record: {e}") from None
            if self._psk is not None:
                raise SwarmKeyMismatchError("the peer does not hold our swarm key (its first record does not "
                                            "authenticate under it)") from None
            raise SwarmKeyMismatchError("the peer's first record does not authenticate: it is in a private swarm "
                                        "(--swarm-key) or the connection was tampered with") from None
        return verify_proof(proof, self.role.other, self._th)

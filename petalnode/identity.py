"""Node identity: an Ed25519 key pair and the peer id derived from its public key.

Invariants:
- A peer id is the first 20 bytes of SHA-256(raw public key): 160 bits, the size of a Kademlia node id, so the
  DHT node id *is* the peer id and nobody can choose where in the keyspace they sit.
- Its text form is lowercase RFC 4648 base32 without padding (32 characters), safe in addresses and file names.
- The private key file is written atomically with mode 0600 and refused if others can read it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from petalnode.errors import ConfigError

PEER_ID_BYTES = 20
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True, order=True)
class PeerId:
    """A 160-bit peer id; compare and hash by bytes, print as base32 text."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != PEER_ID_BYTES:
            raise ValueError(f"a peer id is {PEER_ID_BYTES} bytes, got {self.raw!r}")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
        return cls(hashlib.sha256(public_key).digest()[:PEER_ID_BYTES])

    @classmethod
    def from_text(cls, text: str) -> PeerId:
        try:
            raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8), casefold=False)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"not a peer id: {text!r}") from e
        if len(raw) != PEER_ID_BYTES:
            raise ConfigError(f"not a peer id (wrong length): {text!r}")
        return cls(raw)

    def to_text(self) -> str:
        return base64.b32encode(self.raw).decode("ascii").rstrip("=").lower()

    def matches_public_key(self, public_key: bytes) -> bool:
        return len(public_key) == PUBLIC_KEY_BYTES and PeerId.from_public_key(public_key) == self

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"PeerId({self.to_text()})"


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True only if `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A private key and everything derived from it."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: bytes
    peer_id: PeerId

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> Identity:
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private_key=key, public_key=public, peer_id=PeerId.from_public_key(public))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from 32 seed bytes (tests and simulations only)."""
        return cls.from_private_key(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, creating it (mode 0600, atomically) on first start."""
        path = Path(path).expanduser()
        if path.exists():
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"identity key {path} is readable by other users (mode {oct(mode & 0o777)}); "
                    f"run: chmod 600 {path}"
                )
            data = path.read_bytes()
            if len(data) != 32:
                raise ConfigError(f"identity key {path} is corrupt (expected 32 raw bytes, got {len(data)})")
            return cls.from_private_key(Ed25519PrivateKey.from_private_bytes(data))
        identity = cls.generate()
        raw = identity.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".identity-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails if another process created the key first; then we use theirs.
            os.link(tmp, path)
        except FileExistsError:
            os.unlink(tmp)
            return cls.load_or_create(path)
        os.unlink(tmp)
        return identity


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where to reach a peer, and optionally who it must be.

    Text form: `tcp://HOST:PORT` or `tcp://HOST:PORT/PEER_ID`; IPv6 hosts in brackets. Later transports add
    their own schemes (e.g. `webrtc://...`) with the same trailing `/PEER_ID`.
    """

    scheme: str
    host: str
    port: int
    peer_id: PeerId | None = None

    @classmethod
    def parse(cls, text: str, default_scheme: str = "tcp") -> PeerAddress:
        original = text
        text = text.strip()
        scheme = default_scheme
        if "://" in text:
            scheme, text = text.split("://", 1)
        peer_id = None
        if "/" in text:
            text, id_text = text.split("/", 1)
            id_text = id_text.strip("/")
            if id_text:
                peer_id = PeerId.from_text(id_text)
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = text.rpartition(":")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(
                f"not a peer address: {original!r} (expected e.g. tcp://203.0.113.5:31337/<peer id>)"
            )
        if not scheme.isalnum():
            raise ConfigError(f"not a peer address scheme: {scheme!r} in {original!r}")
        return cls(scheme=scheme.lower(), host=host, port=int(port_text), peer_id=peer_id)

    def with_peer_id(self, peer_id: PeerId) -> PeerAddress:
        return PeerAddress(self.scheme, self.host, self.port, peer_id)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        tail = f"/{self.peer_id.to_text()}" if self.peer_id else ""
        return f"{self.scheme}://{host}:{self.port}{tail}"

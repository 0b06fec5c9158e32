"""Private swarms: a 32-byte pre-shared key that every member holds and no outsider can guess.

Where the key acts (each use gets its own subkey, `SwarmKey.derive(purpose)`, HKDF-SHA256 of RFC 5869):
- TCP and relayed handshakes mix it into the key schedule next to the X25519 secret (`transport/_handshake.py`),
  so a peer without it cannot decrypt or produce the encrypted identity proof: no connection, no session.
- Every DHT datagram is sealed with ChaCha20-Poly1305 under it (`dht/_sealing.py`): outsiders can neither read
  records nor answer, ask, store or announce; their datagrams are dropped and counted.
- WebRTC offers and answers carry an HMAC under it (`transport/_webrtc_signing.py`), so only key holders get an
  answer (and with it a DTLS fingerprint to connect to).

File format (text, so it survives copy-paste; like libp2p's `swarm.key` but with one fixed encoding):
    # petalnode swarm key v1 (secret: give it only to members of the swarm)
    <64 lowercase hex characters>
Invariants:
- The file is created with mode 0600, atomically, never over an existing file, and refused when group or others
  can read it (like an SSH private key).
- The raw key never appears in `repr`, logs or errors; `fingerprint` (a hash of a derived subkey) is safe to
  show and tells two swarms apart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from petalnode.errors import ConfigError

SWARM_KEY_BYTES = 32
HEADER = "# petalnode swarm key v1 (secret: give it only to members of the swarm)"
_INFO_PREFIX = b"petalnode/swarm-key/v1 "


class SwarmKey:
    """A swarm's pre-shared key; compare with `==` (constant time), never print."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != SWARM_KEY_BYTES:
            raise ConfigError(f"a swarm key is {SWARM_KEY_BYTES} bytes")
        self._raw = raw

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(secrets.token_bytes(SWARM_KEY_BYTES))

    def derive(self, purpose: bytes) -> bytes:
        """A 32-byte subkey for one use, so no two mechanisms ever share a key."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO_PREFIX + purpose).derive(self._raw)

    @property
    def fingerprint(self) -> str:
        """16 hex characters naming this key; safe to log and display (it reveals nothing usable)."""
        return hashlib.sha256(self.derive(b"fingerprint")).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwarmKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint})"

    # -- files ----------------------------------------------------------------------------------------------------
    def to_text(self) -> str:
        return f"{HEADER}\n{self._raw.hex()}\n"

    @classmethod
    def from_text(cls, text: str, *, source: str = "swarm key") -> SwarmKey:
        """Parse the file format above (comment lines and blank lines are ignored).

        Raises:
            ConfigError: not exactly one line of 64 hex characters.
        """
        lines = [line.strip() for line in text.splitlines()]
        body = [line for line in lines if line and not line.startswith("#")]
        if len(body) != 1 or len(body[0]) != 2 * SWARM_KEY_BYTES:
            raise ConfigError(
                f"{source} is not a petalnode swarm key (expected one line of "
                f"{2 * SWARM_KEY_BYTES} hex characters; create one with: petalnode swarm-key FILE)"
            )
        try:
            return cls(bytes.fromhex(body[0]))
        except ValueError:
            raise ConfigError(f"{source} is not a petalnode swarm key (not hex)") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SwarmKey:
        """Read a swarm key file.

        Raises:
            ConfigError: missing, readable by group or others, or malformed.
        """
        path = Path(path).expanduser()
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(
                f"cannot read swarm key {path}: {e.strerror} (create one with: petalnode swarm-key {path})"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"swarm key {path} is readable by other users (mode {oct(mode & 0o777)}); run: chmod 600 {path}"
            )
        try:
            # 4 KiB is far more than the format needs; a huge file is not a key.
            with path.open("r", encoding="ascii", errors="replace") as f:
                text = f.read(4096)
        except OSError as e:
            raise ConfigError(f"cannot read swarm key {path}: {e.strerror}") from None
        return cls.from_text(text, source=f"swarm key {path}")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to a new file with mode 0600.

        Raises:
            ConfigError: the file exists (a key is never overwritten) or cannot be written.
        """
        path = Path(path).expanduser()
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a swarm key")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".swarm-key-")
        except OSError as e:
            raise ConfigError(f"cannot write swarm key {path}: {e.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.to_text().encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never overwrite
        except FileExistsError:
            raise ConfigError(f"{path} exists; refusing to overwrite a swarm key") from None
        finally:
            os.unlink(tmp)


def load_swarm_key(key: SwarmKey | str | os.PathLike[str] | None) -> SwarmKey | None:
    """Accept what library callers pass as `swarm_key=`: a `SwarmKey`, a path to a key file, or None (public)."""
    if key is None or isinstance(key, SwarmKey):
        return key
    return SwarmKey.load(key)

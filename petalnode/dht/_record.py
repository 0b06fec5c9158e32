# Signed DHT records: one value per (key, writer), verified by whoever stores or reads it.
#
# Invariants:
# - A record's subkey is the writer's peer id, *derived* from the public key it carries (sha256(pubkey)[:20]);
#   it is never sent separately, so a record cannot name a subkey other than its signer's.
# - The signature covers a domain tag, the 160-bit DHT key, the public key, the absolute expiry, the sequence
#   number and the value, so a record cannot be moved to another key, extended, or replayed as newer.
# - Expiry is absolute wall-clock time (it crosses machines). A record is accepted only if it is unexpired and
#   expires no later than now + MAX_RECORD_TTL_S + MAX_CLOCK_SKEW_S by the verifier's own clock.
# - A wire record is at most MAX_RECORD_WIRE_BYTES packed, so one fits a datagram with room to spare.
# - A signature is checked once per process: a valid (public key, signature, signed payload) triple is remembered
#   by its sha256, so the same record read again (every lookup re-reads the same records until they are
#   refreshed) costs a hash instead of an Ed25519 verification. Only successes are remembered, and the expiry
#   checks run every time.
from __future__ import annotations

import collections
import functools
import hashlib
import math
import struct
import threading
from dataclasses import dataclass

from petalnode.errors import InvalidRecordError
from petalnode.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId, verify_signature

DHT_KEY_BYTES = 20
# An announcement is ~110-400 bytes (146 typical); 1 KiB leaves room for several addresses and a public name, while
# a record (value + ~140 bytes of key, public key, signature, expiry, seq) stays far below rpcudp's 8192-byte
# request cap.
MAX_VALUE_BYTES = 1024
MAX_RECORD_WIRE_BYTES = MAX_VALUE_BYTES + 160
# Petals keeps announcements for about 2x the update period; we refresh every ttl/2, so 1 hour is generous.
MAX_RECORD_TTL_S = 3600.0
# Clocks of honest peers agree within a minute or so (NTP); allow that much future-dating of the expiry.
MAX_CLOCK_SKEW_S = 60.0

_SIGNING_DOMAIN = b"petalnode/dht-record/v1\x00"
# Live records a busy node sees: a few per server of each model it reads; 64 Ki digests take about 8 MiB.
VERIFIED_CACHE_SIZE = 1 << 16
_FIXED = struct.Struct(">dQ")  # expires_at (float64 seconds since the epoch), seq (uint64)
_MAX_SEQ = 2**63 - 1


@functools.lru_cache(maxsize=1 << 16)
def _peer_id_of(public_key: bytes) -> PeerId:
    # Records are read far more often than written (the churn simulator spent ~4% of its CPU re-hashing keys).
    return PeerId.from_public_key(public_key)


class _VerifiedSignatures:
    """A bounded, thread-safe LRU set of sha256(public key + signature + payload) of valid signatures."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._digests: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.verifications = 0  # Ed25519 verifications actually run (for benchmarks and tests)

    def reset(self, size: int) -> None:
        """Forget every remembered signature and keep at most `size` from now on (benchmarks: 0 = off)."""
        with self._lock:
            self._size = size
            self._digests.clear()

    def check(self, public_key: bytes, signature: bytes, payload: bytes) -> bool:
        # Fixed-length key and signature in front: the concatenation is unambiguous.
        digest = hashlib.sha256(public_key + signature + payload).digest()
        with self._lock:
            if digest in self._digests:
                self._digests.move_to_end(digest)
                return True
            self.verifications += 1
        if not verify_signature(public_key, signature, payload):
            return False
        with self._lock:
            self._digests[digest] = None
            if len(self._digests) > self._size:
                self._digests.popitem(last=False)
        return True


_verified = _VerifiedSignatures(VERIFIED_CACHE_SIZE)


def dht_key(key: str) -> bytes:
    """The 160-bit DHT key of a text key such as `{model}.{block}` (same hash family as peer ids)."""
    return hashlib.sha256(key.encode("utf-8")).digest()[:DHT_KEY_BYTES]


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One writer's signed value under one DHT key.

    Build with `Record.create` (signs) or `Record.from_wire` (checks types and sizes, not the signature);
    call `verify` before trusting either.
    """

    key: bytes
    public_key: bytes
    value: bytes
    expires_at: float
    seq: int
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != DHT_KEY_BYTES:
            raise InvalidRecordError(f"record key must be {DHT_KEY_BYTES} bytes")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_BYTES:
            raise InvalidRecordError(f"record public key must be {PUBLIC_KEY_BYTES} bytes")
        if not isinstance(self.value, bytes) or len(self.value) > MAX_VALUE_BYTES:
            raise InvalidRecordError(f"record value must be bytes of at most {MAX_VALUE_BYTES}")
        if not isinstance(self.expires_at, float) or not math.isfinite(self.expires_at):
            raise InvalidRecordError("record expiry must be a finite float")
        if type(self.seq) is not int or not 0 <= self.seq <= _MAX_SEQ:
            raise InvalidRecordError("record seq must be a non-negative 63-bit int")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise InvalidRecordError(f"record signature must be {SIGNATURE_BYTES} bytes")

    @classmethod
    def create(cls, identity: Identity, *, key: bytes, value: bytes, expires_at: float, seq: int) -> Record:
        """Sign `value` under `key` as `identity` (the subkey is `identity.peer_id`)."""
        unsigned = cls(
            key=key, public_key=identity.public_key, value=value, expires_at=float(expires_at), seq=seq,
            signature=bytes(SIGNATURE_BYTES),
        )
        return cls(
            key=key, public_key=identity.public_key, value=value, expires_at=float(expires_at), seq=seq,
            signature=identity.sign(unsigned.signed_payload()),
        )

    @property
    def peer_id(self) -> PeerId:
        """The writer, which is also the subkey."""
        return _peer_id_of(self.public_key)

    def signed_payload(self) -> bytes:
        return _SIGNING_DOMAIN + self.key + self.public_key + _FIXED.pack(self.expires_at, self.seq) + self.value

    def verify(self, now: float, *, max_ttl_s: float = MAX_RECORD_TTL_S, skew_s: float = MAX_CLOCK_SKEW_S) -> None:
        """Raise `InvalidRecordError` unless the record is authentic and live at wall-clock time `now`."""
        if self.expires_at <= now:
            raise InvalidRecordError(f"record from {self.peer_id} expired {now - self.expires_at:.1f} s ago")
        if self.expires_at > now + max_ttl_s + skew_s:
            raise InvalidRecordError(
                f"record from {self.peer_id} expires {self.expires_at - now:.0f} s from now, "
                f"beyond the {max_ttl_s:.0f} s limit"
            )
        if not _verified.check(self.public_key, self.signature, self.signed_payload()):
            raise InvalidRecordError(f"record claiming writer {self.peer_id} has a bad signature")

    def supersedes(self, other: Record) -> bool:
        """Whether this record should replace `other` (same key and writer): strictly newer seq wins."""
        return self.seq > other.seq

    def to_wire(self) -> list[object]:
        return [self.key, self.public_key, self.value, self.expires_at, self.seq, self.signature]

    @classmethod
    def from_wire(cls, obj: object) -> Record:
        """Parse the msgpack form; raises `InvalidRecordError` on any structural problem."""
        if not isinstance(obj, list | tuple) or len(obj) != 6:
            raise InvalidRecordError("a record is a 6-element array")
        key, public_key, value, expires_at, seq, signature = obj
        if isinstance(expires_at, int) and not isinstance(expires_at, bool):
            expires_at = float(expires_at)
        return cls(key=key, public_key=public_key, value=value, expires_at=expires_at, seq=seq,
                   signature=signature)

    def wire_size(self) -> int:
        """Upper bound of the packed size (exact up to msgpack header variations of a few bytes)."""
        return len(self.value) + DHT_KEY_BYTES + PUBLIC_KEY_BYTES + SIGNATURE_BYTES + 9 + 9 + 16

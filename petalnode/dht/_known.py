# "Records I already have": a salted Bloom filter a reader sends with FIND_VALUE so a holder skips them (sans-IO).
#
# A lookup reads a key from all of its k closest nodes, and each would send every record it holds: k copies of
# each record, which for a key with hundreds of writers is most of the cost of a swarm view. With the filter a
# holder sends only the (writer, seq) pairs the reader does not have yet.
#
# Invariants:
# - Members are (writer peer id, seq): a newer record of a known writer is never skipped (its seq differs), only
#   a false positive can hide it, from this one holder. The salt is random per request, so false positives
#   (about 1% at the sizing below) are independent across holders, and every record still reaches the reader
#   unless all the holders asked with a filter drop it (about 0.01**5 for k = 8).
# - Readers send a filter only once they hold MIN_RECORDS records: below a page's worth it saves no request.
# - The filter is advisory: a holder that ignores it only sends more; nothing in it is trusted beyond its size.
# - Wire form: [salt (8 bytes), bits (1..MAX_FILTER_BYTES bytes)]; anything else is a protocol error.
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from petalnode.errors import RemoteProtocolError

SALT_BYTES = 8
# 4 KiB of bits keeps a FIND_VALUE request (with its ids and cursor) well inside one 8 KiB datagram, and holds
# about 2,700 records (more than a key's 2,048 writers) at 12 bits each; a reader that knows more sends none.
MAX_FILTER_BYTES = 4096
BITS_PER_RECORD = 12
HASHES = 4  # with 12 bits per member: about 0.8% false positives, and few hash evaluations (this is pure Python)
# A FIND_VALUE page holds about 18 announcements: a reader holding fewer would not save a single request.
MIN_RECORDS = 16
_MASK64 = (1 << 64) - 1


class KnownRecords:
    """A Bloom filter of (writer id, seq) pairs."""

    __slots__ = ("_bits", "_nbits", "_salt")

    def __init__(self, salt: bytes, bits: bytes) -> None:
        self._salt = salt
        self._bits = bytearray(bits)
        self._nbits = len(bits) * 8

    @classmethod
    def of(cls, members: Iterable[tuple[bytes, int]], *, salt: bytes | None = None) -> KnownRecords | None:
        """A filter holding `members`, or None for fewer than MIN_RECORDS or too many for MAX_FILTER_BYTES."""
        items = list(members)
        size = (len(items) * BITS_PER_RECORD + 7) // 8
        if len(items) < MIN_RECORDS or size > MAX_FILTER_BYTES:
            return None
        known = cls(salt if salt is not None else os.urandom(SALT_BYTES), bytes(size))
        bits = known._bits
        for writer, seq in items:
            for index in known._indices(writer, seq):
                bits[index >> 3] |= 1 << (index & 7)
        return known

    def __contains__(self, member: tuple[bytes, int]) -> bool:
        bits = self._bits
        return all(bits[i >> 3] >> (i & 7) & 1 for i in self._indices(*member))

    def _indices(self, writer: bytes, seq: int) -> tuple[int, ...]:
        # One keyed hash, then double hashing (Kirsch and Mitzenmacher 2006) for the HASHES positions.
        digest = hashlib.blake2b(writer + seq.to_bytes(8, "big"), digest_size=16, key=self._salt).digest()
        value = int.from_bytes(digest, "little")
        h1, h2, nbits = value & _MASK64, (value >> 64) | 1, self._nbits
        return tuple((h1 + i * h2) % nbits for i in range(HASHES))

    def to_wire(self) -> list[bytes]:
        return [self._salt, bytes(self._bits)]

    @classmethod
    def from_wire(cls, obj: object) -> KnownRecords | None:
        """Parse an optional filter (None = the reader knows nothing). Raises `RemoteProtocolError`."""
        if obj is None:
            return None
        if not isinstance(obj, list | tuple) or len(obj) != 2:
            raise RemoteProtocolError("a known-records filter is [salt, bits]")
        salt, bits = obj
        if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
            raise RemoteProtocolError(f"a known-records salt is {SALT_BYTES} bytes")
        if not isinstance(bits, bytes) or not 0 < len(bits) <= MAX_FILTER_BYTES:
            raise RemoteProtocolError(f"a known-records filter is 1..{MAX_FILTER_BYTES} bytes")
        return cls(salt, bits)

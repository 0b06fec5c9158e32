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
# - The filter is advisory: a holder that ignores it only sends more; nothing in it is trusted beyond its size.
# - Wire form: [salt (8 bytes), bits (1..MAX_FILTER_BYTES bytes)]; anything else is a protocol error.
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from petalnode.errors import RemoteProtocolError

SALT_BYTES = 8
# 4 KiB of bits keeps a FIND_VALUE request (with its ids and cursor) well inside one 8 KiB datagram, and holds
# about 3,300 records at 10 bits each; a reader that knows more sends no filter (the holder sends everything).
MAX_FILTER_BYTES = 4096
BITS_PER_RECORD = 10
HASHES = 7  # optimal for 10 bits per member: about 0.8% false positives


class KnownRecords:
    """A Bloom filter of (writer id, seq) pairs."""

    __slots__ = ("_bits", "_nbits", "_salt")

    def __init__(self, salt: bytes, bits: bytes) -> None:
        self._salt = salt
        self._bits = bytearray(bits)
        self._nbits = len(bits) * 8

    @classmethod
    def of(cls, members: Iterable[tuple[bytes, int]], *, salt: bytes | None = None) -> KnownRecords | None:
        """A filter holding `members`, or None when there are none or too many to fit MAX_FILTER_BYTES."""
        items = list(members)
        size = (len(items) * BITS_PER_RECORD + 7) // 8
        if not items or size > MAX_FILTER_BYTES:
            return None
        known = cls(salt if salt is not None else os.urandom(SALT_BYTES), bytes(max(8, size)))
        for writer, seq in items:
            for index in known._indices(writer, seq):
                known._bits[index >> 3] |= 1 << (index & 7)
        return known

    def __contains__(self, member: tuple[bytes, int]) -> bool:
        writer, seq = member
        return all(self._bits[i >> 3] & (1 << (i & 7)) for i in self._indices(writer, seq))

    def _indices(self, writer: bytes, seq: int) -> list[int]:
        digest = hashlib.blake2b(writer + seq.to_bytes(8, "big"), digest_size=32, key=self._salt).digest()
        return [int.from_bytes(digest[4 * i : 4 * i + 4], "big") % self._nbits for i in range(HASHES)]

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

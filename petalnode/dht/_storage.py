# What one DHT node holds: verified records, one per (key, writer), bounded in count (sans-IO).
#
# Invariants:
# - Every stored record passed `Record.verify` against this node's wall clock when it arrived.
# - Per (key, writer) only the record with the highest seq is kept; an equal-or-older one never replaces it.
# - Expired records are never returned and are dropped by `cull` (run on every access to a key, and in full by
#   the node's maintenance loop).
# - `iter_older_than` is always empty: kademlia's Server re-publishes whatever it returns every hour, which would
#   keep other peers' records alive forever. Writers refresh their own records instead.
# - At most `max_records_per_key` writers per key, `max_keys` keys and `max_records` records in all; a full key
#   evicts the record that would expire first if the newcomer outlives it, a full node refuses new records.
from __future__ import annotations

import bisect
from collections.abc import Callable, Container, Iterator

from kademlia.storage import IStorage

from petalnode.dht._record import MAX_CLOCK_SKEW_S, MAX_RECORD_TTL_S, Record
from petalnode.errors import DHTError, InvalidRecordError

MAX_KEYS = 50_000
# Petals swarms have at most a few hundred servers per block, and a key covers BLOCKS_PER_KEY (8) blocks whose
# servers mostly overlap (spans are long); 2048 writers leaves room while bounding memory per key (~2 MiB).
MAX_RECORDS_PER_KEY = 2048
# All keys together: at most MAX_VALUE_BYTES + ~160 bytes each, so about 250 MiB in the worst case.
MAX_RECORDS = 200_000


class RecordStorage(IStorage):
    """Verified per-writer records by 160-bit key; plugs into `kademlia.network.Server(storage=...)`."""

    def __init__(
        self,
        wall_clock: Callable[[], float],
        *,
        max_ttl_s: float = MAX_RECORD_TTL_S,
        skew_s: float = MAX_CLOCK_SKEW_S,
        max_keys: int = MAX_KEYS,
        max_records_per_key: int = MAX_RECORDS_PER_KEY,
        max_records: int = MAX_RECORDS,
    ) -> None:
        self._wall_clock = wall_clock
        self._max_ttl_s = max_ttl_s
        self._skew_s = skew_s
        self._max_keys = max_keys
        self._max_records_per_key = max_records_per_key
        self._max_records = max_records
        self._count = 0  # records held in all keys (expired ones included until they are dropped)
        self._data: dict[bytes, dict[bytes, Record]] = {}
        # Per key, caches that keep reads from touching every record (a key of a big swarm holds hundreds):
        # the earliest expiry (no scan for expired records before it) and the writer ids in page order.
        self._first_expiry: dict[bytes, float] = {}
        self._sorted: dict[bytes, list[bytes]] = {}

    # -- our interface ------------------------------------------------------------------------------------------
    def put(self, record: Record) -> bool:
        """Store `record` if it is valid and newer than what we hold for its writer.

        Returns:
            True if the record is now held (stored, or an identical copy already was), False if it is stale.
        Raises:
            InvalidRecordError: forged, tampered, expired or too far in the future.
            DHTError: storage is full of records that outlive this one.
        """
        now = self._wall_clock()
        subkey = record.peer_id.raw
        held = self._live(record.key, now)
        if held is not None and held.get(subkey) == record:
            return True  # verified when it was first stored; re-stores and handoffs are common
        record.verify(now, max_ttl_s=self._max_ttl_s, skew_s=self._skew_s)
        old = held.get(subkey) if held is not None else None
        if old is not None:
            if not record.supersedes(old):
                return False
        elif held is not None and len(held) >= self._max_records_per_key:
            victim = min(held.values(), key=lambda r: r.expires_at)
            if victim.expires_at >= record.expires_at:
                raise DHTError(f"DHT key holds the maximum of {self._max_records_per_key} writers")
            del held[victim.peer_id.raw]
            self._sorted.pop(record.key, None)
            self._count -= 1
        elif self._count >= self._max_records:
            self.cull()
            if self._count >= self._max_records:
                raise DHTError(f"DHT storage holds the maximum of {self._max_records} records")
            held = self._data.get(record.key)  # the cull may have emptied (and dropped) this key
        if held is None:
            if len(self._data) >= self._max_keys:
                self.cull()
                if len(self._data) >= self._max_keys:
                    raise DHTError(f"DHT storage holds the maximum of {self._max_keys} keys")
            held = self._data[record.key] = {}
        if old is None:
            self._count += 1
            self._sorted.pop(record.key, None)
        held[subkey] = record
        first = self._first_expiry.get(record.key)
        if first is None or record.expires_at < first or (old is not None and old.expires_at <= first):
            self._first_expiry[record.key] = min(r.expires_at for r in held.values())
        return True

    def records(self, key: bytes) -> list[Record]:
        """Live records under `key`, ordered by writer id (the order pages use)."""
        held = self._live(key, self._wall_clock())
        return [held[s] for s in self._writers(key, held)] if held else []

    def _writers(self, key: bytes, held: dict[bytes, Record]) -> list[bytes]:
        writers = self._sorted.get(key)
        if writers is None:
            writers = self._sorted[key] = sorted(held)
        return writers

    def page(
        self, key: bytes, after: bytes | None, budget_bytes: int, max_records: int,
        skip: Container[tuple[bytes, int]] = (),
    ) -> tuple[list[Record], bytes | None]:
        """At most `max_records` records with writer id > `after`, wire sizes summing to <= `budget_bytes`.

        Records whose (writer id, seq) is in `skip` (what the reader already has) are left out.

        Returns:
            The page and the cursor for the next one (the last writer id), or None when this was the last page.
        """
        out: list[Record] = []
        used = 0
        held = self._live(key, self._wall_clock())
        if not held:
            return out, None
        writers = self._writers(key, held)
        first = 0 if after is None else bisect.bisect_right(writers, after)
        for subkey in writers[first:]:
            record = held[subkey]
            if skip and (subkey, record.seq) in skip:
                continue
            size = record.wire_size()
            if out and (used + size > budget_bytes or len(out) >= max_records):
                return out, out[-1].peer_id.raw
            out.append(record)
            used += size
        return out, None

    def keys(self) -> list[bytes]:
        return list(self._data)

    def cull(self) -> int:
        """Drop every expired record; returns how many were dropped."""
        now = self._wall_clock()
        dropped = 0
        for key in list(self._data):
            before = len(self._data[key])
            held = self._live(key, now)
            dropped += before - (len(held) if held else 0)
        return dropped

    def __len__(self) -> int:
        return self._count

    def _live(self, key: bytes, now: float) -> dict[bytes, Record] | None:
        held = self._data.get(key)
        if held is None:
            return None
        if now < self._first_expiry.get(key, float("-inf")):
            return held
        expired = [s for s, r in held.items() if r.expires_at <= now]
        for subkey in expired:
            del held[subkey]
            self._count -= 1
        if not held:
            del self._data[key]
            self._first_expiry.pop(key, None)
            self._sorted.pop(key, None)
            return None
        if expired:
            self._sorted.pop(key, None)
        self._first_expiry[key] = min(r.expires_at for r in held.values())
        return held

    # -- kademlia.storage.IStorage ------------------------------------------------------------------------------
    def __setitem__(self, key: bytes, value: Record) -> None:
        if not isinstance(value, Record) or value.key != key:
            raise InvalidRecordError("RecordStorage holds only Records stored under their own key")
        self.put(value)

    def __getitem__(self, key: bytes) -> list[Record]:
        found = self.records(key)
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: object = None) -> object:
        return self.records(key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[Record]]]:
        return []

    def __iter__(self) -> Iterator[tuple[bytes, list[Record]]]:
        for key in list(self._data):
            found = self.records(key)
            if found:
                yield key, found

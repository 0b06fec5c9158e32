"""Signed records, per-writer storage and the public surface of petalnode.dht (announcements: see
test_dht_announcement.py)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import petalnode.dht
from petalnode.dht import MAX_VALUE_BYTES, Record, dht_key
from petalnode.dht._protocol import PAGE_BUDGET_BYTES, batch_records
from petalnode.dht._record import _verified
from petalnode.dht._storage import RecordStorage
from petalnode.dht._wire import MAX_BODY_BYTES, pack_body
from petalnode.errors import DHTError, InvalidRecordError
from petalnode.identity import Identity

NOW = 1_700_000_000.0
ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")
KEY = dht_key("model.3")


def make(identity: Identity = ALICE, value: bytes = b"v", *, seq: int = 1, ttl: float = 100.0) -> Record:
    return Record.create(identity, key=KEY, value=value, expires_at=NOW + ttl, seq=seq)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_public_names_are_exported_sorted() -> None:
    public = {n for n in dir(petalnode.dht) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if isinstance(getattr(petalnode.dht, n), type(petalnode))}
    assert set(petalnode.dht.__all__) == public - modules


def test_dht_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import petalnode.dht, petalnode.dht._process, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_valid_record_verifies_and_round_trips() -> None:
    record = make()
    record.verify(NOW)
    again = Record.from_wire(msgpack.unpackb(msgpack.packb(record.to_wire())))
    assert again == record
    assert again.peer_id == ALICE.peer_id
    assert len(pack_body(record.to_wire())) <= record.wire_size()


@pytest.mark.parametrize(
    "change",
    [
        {"value": b"w"},
        {"seq": 2},
        {"expires_at": NOW + 200.0},
        {"key": dht_key("model.4")},
        {"public_key": MALLORY.public_key},  # claims Mallory's subkey with Alice's signature
    ],
)
def test_tampered_record_is_rejected(change: dict[str, object]) -> None:
    with pytest.raises(InvalidRecordError, match="signature"):
        dataclasses.replace(make(), **change).verify(NOW)


def test_forged_record_for_another_writer_is_rejected() -> None:
    forged = Record.create(MALLORY, key=KEY, value=b"evil", expires_at=NOW + 100, seq=99)
    forged = dataclasses.replace(forged, public_key=ALICE.public_key)
    with pytest.raises(InvalidRecordError):
        forged.verify(NOW)


def test_expired_and_far_future_records_are_rejected() -> None:
    with pytest.raises(InvalidRecordError, match="expired"):
        make(ttl=-1).verify(NOW)
    with pytest.raises(InvalidRecordError, match="beyond"):
        make(ttl=10_000).verify(NOW)
    make(ttl=3600 + 30).verify(NOW)  # within max ttl + allowed clock skew


@pytest.mark.parametrize(
    "wire",
    [
        None, [], [b"x"] * 6, [KEY, b"k" * 32, b"v", "soon", 1, b"s" * 64],
        [KEY, b"k" * 32, b"v" * 5000, 1.0, 1, b"s" * 64], [KEY, b"k" * 32, b"v", float("nan"), 1, b"s" * 64],
        [KEY, b"k" * 32, b"v", 1.0, -1, b"s" * 64],
    ],
)
def test_malformed_wire_records_raise_invalid_record(wire: object) -> None:
    with pytest.raises(InvalidRecordError):
        Record.from_wire(wire)


def test_storage_keeps_newest_per_writer_and_refuses_replays() -> None:
    storage = RecordStorage(Clock())
    assert storage.put(make(seq=5, value=b"new"))
    assert not storage.put(make(seq=4, value=b"old"))  # replayed older record
    assert not storage.put(make(seq=5, value=b"same seq, other value"))
    assert storage.put(make(seq=5, value=b"new"))  # identical re-store is fine
    assert storage.put(Record.create(MALLORY, key=KEY, value=b"m", expires_at=NOW + 50, seq=1))
    assert [r.value for r in storage.records(KEY)] == sorted([b"new", b"m"], key=lambda v: (
        ALICE.peer_id.raw if v == b"new" else MALLORY.peer_id.raw))
    with pytest.raises(InvalidRecordError):
        storage.put(dataclasses.replace(make(seq=9), value=b"tampered"))
    assert {r.seq for r in storage.records(KEY)} == {5, 1}


def test_storage_drops_expired_and_never_republishes() -> None:
    clock = Clock()
    storage = RecordStorage(clock)
    storage.put(make(ttl=10))
    storage.put(Record.create(MALLORY, key=KEY, value=b"m", expires_at=NOW + 100, seq=1))
    assert storage.iter_older_than(0) == []
    clock.now += 11
    assert [r.peer_id for r in storage.records(KEY)] == [MALLORY.peer_id]
    clock.now += 100
    assert storage.cull() == 1 and len(storage) == 0 and storage.get(KEY) is None


def test_storage_bounds_writers_per_key() -> None:
    clock = Clock()
    storage = RecordStorage(clock, max_records_per_key=3)
    writers = [Identity.from_seed(b"w%d" % i) for i in range(4)]
    for i, w in enumerate(writers[:3]):
        storage.put(Record.create(w, key=KEY, value=b"", expires_at=NOW + 10 + i, seq=1))
    with pytest.raises(DHTError):  # outlives nobody: refused
        storage.put(Record.create(writers[3], key=KEY, value=b"", expires_at=NOW + 5, seq=1))
    storage.put(Record.create(writers[3], key=KEY, value=b"", expires_at=NOW + 50, seq=1))
    assert {r.peer_id for r in storage.records(KEY)} == {w.peer_id for w in writers[1:]}


def test_storage_bounds_records_in_all_keys_and_counts_them() -> None:
    clock = Clock()
    storage = RecordStorage(clock, max_records=3)
    writers = [Identity.from_seed(b"t%d" % i) for i in range(3)]
    for i, w in enumerate(writers):
        storage.put(Record.create(w, key=dht_key(f"k{i}"), value=b"", expires_at=NOW + 10 + i, seq=1))
    assert len(storage) == 3
    with pytest.raises(DHTError, match="maximum of 3 records"):
        storage.put(Record.create(ALICE, key=dht_key("k9"), value=b"", expires_at=NOW + 50, seq=1))
    assert storage.put(Record.create(writers[0], key=dht_key("k0"), value=b"", expires_at=NOW + 60, seq=2))  # newer
    assert len(storage) == 3 and storage.get(dht_key("k9")) is None and len(storage.keys()) == 3
    clock.now += 11.5  # writers[1]'s record (k1, expiring at NOW + 11) is gone: room for one more
    assert storage.put(Record.create(ALICE, key=dht_key("k9"), value=b"", expires_at=NOW + 50, seq=1))
    assert len(storage) == 3 and storage.get(dht_key("k1")) is None


def test_a_signature_is_verified_once_and_a_changed_record_again() -> None:
    record = Record.create(ALICE, key=dht_key("cache-test"), value=b"fresh", expires_at=NOW + 10, seq=1)
    before = _verified.verifications
    for _ in range(3):
        Record.from_wire(record.to_wire()).verify(NOW)
    assert _verified.verifications == before + 1
    with pytest.raises(InvalidRecordError, match="bad signature"):  # same signature, other value: checked, refused
        dataclasses.replace(record, value=b"forged").verify(NOW)
    with pytest.raises(InvalidRecordError, match="bad signature"):  # a refusal is not remembered as a success
        dataclasses.replace(record, value=b"forged").verify(NOW)
    with pytest.raises(InvalidRecordError, match="expired"):  # expiry is checked even for a remembered signature
        record.verify(NOW + 11)
    assert _verified.verifications == before + 3


def test_pages_cover_all_writers_and_fit_datagrams() -> None:
    storage = RecordStorage(Clock())
    writers = [Identity.from_seed(b"p%d" % i) for i in range(40)]
    for w in writers:
        storage.put(Record.create(w, key=KEY, value=b"x" * MAX_VALUE_BYTES, expires_at=NOW + 10, seq=1))
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = storage.page(KEY, cursor, PAGE_BUDGET_BYTES, 64)
        nodes = [[b"i" * 20, "203.0.113.255", 65535]] * 40
        body = pack_body({"records": [r.to_wire() for r in page], "next": cursor, "nodes": nodes})
        assert len(body) <= MAX_BODY_BYTES
        seen += page
        pages += 1
        if cursor is None:
            break
    assert pages > 1 and {r.peer_id for r in seen} == {w.peer_id for w in writers}
    assert sum(len(b) for b in batch_records(seen)) == 40


_WRITERS = [Identity.from_seed(b"m%d" % i) for i in range(6)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4), st.integers(1, 30), st.integers(0, 12)),
                max_size=40))
def test_storage_reads_agree_with_a_plain_model_through_puts_expiry_and_pages(
    steps: list[tuple[int, int, int, int]],
) -> None:
    """Cached expiry and writer order (the storage's read shortcuts) never change what a read returns."""
    clock = Clock()
    storage = RecordStorage(clock, max_records_per_key=4)
    model: dict[bytes, Record] = {}
    for writer, seq, ttl, advance in steps:
        record = Record.create(_WRITERS[writer], key=KEY, value=b"v%d" % seq, expires_at=clock.now + ttl, seq=seq)
        model = {w: r for w, r in model.items() if r.expires_at > clock.now}
        old = model.get(record.peer_id.raw)
        try:
            stored = storage.put(record)
        except DHTError:  # full key, newcomer outlives nobody
            assert old is None and len(model) == 4 and min(r.expires_at for r in model.values()) >= record.expires_at
        else:
            assert stored == (old is None or old == record or record.supersedes(old))
            if old is None and len(model) == 4:
                victim = min(model.values(), key=lambda r: r.expires_at)
                del model[victim.peer_id.raw]
            if stored:
                model[record.peer_id.raw] = record
        clock.now += advance
        live = [model[w] for w in sorted(model) if model[w].expires_at > clock.now]
        assert storage.records(KEY) == live
        paged, cursor = [], None
        while True:
            page, cursor = storage.page(KEY, cursor, 10_000, 2)
            paged += page
            if cursor is None:
                break
        assert paged == live

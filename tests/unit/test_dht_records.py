"""Signed records, per-writer storage, the announcement schema and the public surface of petalnode.dht."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import petalnode.dht
from petalnode.dht import (
    BLOCKS_PER_KEY,
    MAX_VALUE_BYTES,
    Announcement,
    Record,
    ServerState,
    block_key,
    block_keys,
    dht_key,
    model_keys,
)
from petalnode.dht._protocol import PAGE_BUDGET_BYTES, batch_records
from petalnode.dht._record import _verified
from petalnode.dht._storage import RecordStorage
from petalnode.dht._wire import MAX_BODY_BYTES, pack_body
from petalnode.errors import CodecError, DHTError, InvalidRecordError
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


def announcement(**overrides: object) -> Announcement:
    fields: dict[str, object] = dict(
        state=ServerState.ONLINE, model="smollm2-135m", start_block=4, end_block=12, throughput=123.5,
        cache_tokens_left=8192, addresses=("tcp://203.0.113.5:31337",), version="0.1.0", public_name="alice",
    )
    fields.update(overrides)
    return Announcement(**fields)  # type: ignore[arg-type]


# Golden bytes: the wire form is a contract between versions.
GOLDEN = bytes.fromhex(
    "89a17302a16dac736d6f6c6c6d322d3133356da16104a1620ca174cb405ee00000000000a163cd2000a17891b7"
    "7463703a2f2f3230332e302e3131332e353a3331333337a176a5302e312e30a16ea5616c696365"
)


def test_announcement_golden_bytes_and_round_trip() -> None:
    ann = announcement()
    assert ann.to_bytes() == GOLDEN
    assert Announcement.from_bytes(GOLDEN) == ann
    assert ann.block_keys() == ["smollm2-135m.0:8", "smollm2-135m.8:16"]  # blocks 4-11 overlap two groups of 8
    assert Announcement.from_bytes(announcement(public_name=None).to_bytes()).public_name is None


@pytest.mark.parametrize(
    ("start", "end", "keys"),
    [(0, 1, ["m.0:8"]), (0, 8, ["m.0:8"]), (7, 9, ["m.0:8", "m.8:16"]), (8, 30, ["m.8:16", "m.16:24", "m.24:32"])],
)
def test_a_server_announces_under_one_key_per_group_of_blocks(start: int, end: int, keys: list[str]) -> None:
    assert BLOCKS_PER_KEY == 8
    assert block_keys("m", start, end) == keys
    assert all(block_key("m", b) in keys for b in range(start, end))


def test_a_reader_looks_up_every_group_of_the_model_once() -> None:
    assert model_keys("m", 30) == {"m.0:8": (0, 8), "m.8:16": (8, 16), "m.16:24": (16, 24), "m.24:32": (24, 30)}
    assert model_keys("m", 8) == {"m.0:8": (0, 8)}
    # Every block of the model is covered by exactly one key, and that key is where its servers announce.
    for num_blocks in (1, 7, 8, 9, 80):
        groups = model_keys("m", num_blocks)
        for block in range(num_blocks):
            assert [k for k, (a, b) in groups.items() if a <= block < b] == [block_key("m", block)]
    with pytest.raises(ValueError):
        block_key("m", -1)


def test_announcement_adapters_round_trip_and_are_omitted_when_empty() -> None:
    ann = announcement(adapters=("sql-lora", "chat"))
    assert Announcement.from_bytes(ann.to_bytes()) == ann
    assert "l" not in msgpack.unpackb(announcement().to_bytes())


def test_announcement_ignores_unknown_fields_from_newer_versions() -> None:
    wire = msgpack.unpackb(GOLDEN)
    wire["zz"] = {"future": [1, 2, 3]}
    assert Announcement.from_bytes(msgpack.packb(wire)) == announcement()


@pytest.mark.parametrize(
    "mutate",
    [lambda w: w.pop("m"), lambda w: w.update(s=9), lambda w: w.update(a=20), lambda w: w.update(t="fast"),
     lambda w: w.update(x=["a" * 500]), lambda w: w.update(c=True), lambda w: w.update(t=float("inf")),
     lambda w: w.update(l="lora"), lambda w: w.update(l=[""]), lambda w: w.update(l=["x" * 65]),
     lambda w: w.update(l=[f"a{i}" for i in range(9)]), lambda w: w.update(l=[3])],
)
def test_announcement_rejects_bad_fields(mutate) -> None:
    wire = msgpack.unpackb(GOLDEN)
    mutate(wire)
    with pytest.raises(CodecError):
        Announcement.from_bytes(msgpack.packb(wire))


def test_announcement_rejects_garbage_and_oversize() -> None:
    for data in (b"", b"\xc1", msgpack.packb([1, 2]), b"\x00" * (MAX_VALUE_BYTES + 1)):
        with pytest.raises(CodecError):
            Announcement.from_bytes(data)
    with pytest.raises(CodecError):
        announcement(addresses=tuple(f"tcp://10.0.0.{i}:1" for i in range(20)))

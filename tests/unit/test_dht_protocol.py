"""The hardened DHT protocol over the in-memory network (no sockets): eviction, storms, client mode, handoff."""

from __future__ import annotations

import asyncio
import time

import pytest
from kademlia.node import Node

from petalnode.dht import DHTNode, Record, dht_key
from petalnode.dht._routing import HEAD_CHECK_INTERVAL_S, LONELY_AFTER_S, DecidingRoutingTable
from petalnode.dht._wire import pack_body
from petalnode.errors import ClosedResourceError, ConfigError, DHTError, InvalidStateError, RemoteProtocolError
from petalnode.identity import Identity
from petalnode.transport import MemoryNetwork

pytestmark = pytest.mark.timeout(30)
RPC_TIMEOUT_S = 0.2


def node(network: MemoryNetwork, name: str, **kwargs: object) -> DHTNode:
    return DHTNode(Identity.from_seed(name.encode()), endpoint_factory=network.create_datagram_endpoint,
                   rpc_timeout_s=RPC_TIMEOUT_S, **kwargs)


async def test_store_and_get_between_two_nodes_and_lifecycle_errors() -> None:
    network = MemoryNetwork()
    a, b = node(network, "a"), node(network, "b")
    with pytest.raises(InvalidStateError):
        await a.store("k", b"v")
    await a.start(listen=("a", 1))
    await b.start(listen=("b", 1), bootstrap=[("a", 1)])
    assert await b.store("k", b"v") == 2  # b itself and a
    assert (await a.get("k"))[b.peer_id].value == b"v"
    with pytest.raises(ConfigError):
        await b.store("k", b"x" * 5000)
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(ClosedResourceError):
        await a.get("k")
    with pytest.raises(ClosedResourceError):
        await a.start()
    await b.aclose()


async def test_bootstrap_to_nobody_raises() -> None:
    network = MemoryNetwork()
    with pytest.raises(DHTError, match="no DHT bootstrap node answered"):
        await node(network, "lonely").start(listen=("x", 1), bootstrap=[("nowhere", 9)])


async def test_one_timeout_does_not_evict_two_do_and_timeout_is_configurable() -> None:
    network = MemoryNetwork()
    async with node(network, "a") as a:
        pass
    a, b = node(network, "a"), node(network, "b")
    await a.start(listen=("a", 1))
    await b.start(listen=("b", 1), bootstrap=[("a", 1)])
    try:
        contact = next(c for c in b.protocol.router.contacts() if c.id == a.peer_id.raw)
        network.partition("a")
        loop = asyncio.get_running_loop()
        started = loop.time()
        ok, _ = await b.protocol.call_find_node(contact, Node(dht_key("x")))
        assert not ok and RPC_TIMEOUT_S <= loop.time() - started < RPC_TIMEOUT_S * 3
        assert a.peer_id.raw in {c.id for c in b.protocol.router.contacts()}  # one strike: kept
        network.heal("a")
        ok, _ = await b.protocol.call_find_node(contact, Node(dht_key("x")))
        assert ok  # an answer clears the strike
        network.partition("a")
        await b.protocol.call_find_node(contact, Node(dht_key("x")))
        assert a.peer_id.raw in {c.id for c in b.protocol.router.contacts()}
        await b.protocol.call_find_node(contact, Node(dht_key("x")))
        assert a.peer_id.raw not in {c.id for c in b.protocol.router.contacts()}  # two in a row: evicted
    finally:
        await a.aclose()
        await b.aclose()


def test_full_bucket_pings_its_head_once_per_interval() -> None:
    now = [0.0]
    me = Node(bytes(20))
    table = DecidingRoutingTable(None, 2, me, clock=lambda: now[0])

    def far(second_byte: int) -> Node:
        # First bits 10000 shared by all: the far bucket's depth is 5, so it is full and may not split.
        return Node(bytes([0b10000000 | second_byte]) + bytes(19))

    assert table.add_contact(far(0b0100)) is None
    assert table.add_contact(far(0b0010)) is None
    head = table.add_contact(far(0b0001))
    assert head is not None and head.id == far(0b0100).id
    assert all(table.add_contact(far(0b0001 + i % 2)) is None for i in range(100))  # no storm
    now[0] += HEAD_CHECK_INTERVAL_S + 1
    assert table.add_contact(far(0b0001)) is not None
    # Evicting the silent head promotes the waiting replacement (paper section 4.1).
    table.remove_contact(head)
    assert far(0b0001).id in {n.id for n in table.contacts()}


def test_bucket_idleness_follows_the_injected_clock_not_time_monotonic() -> None:
    now = [1000.0]
    table = DecidingRoutingTable(None, 2, Node(bytes(20)), clock=lambda: now[0])
    assert table.lonely_buckets() == []
    now[0] += LONELY_AFTER_S + 1  # only the injected clock moved
    assert table.lonely_buckets() == table.buckets
    table.find_neighbors(Node(bytes([0x80]) + bytes(19)))  # a lookup touches the bucket in its range
    assert table.lonely_buckets() == []
    for i in range(3):  # a third contact near our own id splits the bucket: the halves are stamped by the clock
        table.add_contact(Node(bytes([0x01, i]) + bytes(18)))
    assert len(table.buckets) > 1 and all(b.last_updated == now[0] for b in table.buckets)
    now[0] += LONELY_AFTER_S + 1
    assert len(table.lonely_buckets()) == len(table.buckets)


async def test_client_mode_is_in_no_routing_table_and_serves_nothing() -> None:
    network = MemoryNetwork()
    servers = [node(network, f"s{i}") for i in range(4)]
    await servers[0].start(listen=("s0", 1))
    for i, s in enumerate(servers[1:], 1):
        await s.start(listen=(f"s{i}", 1), bootstrap=[("s0", 1)])
    client = node(network, "client", client_mode=True)
    await client.start(listen=("c", 1), bootstrap=[("s0", 1)])
    try:
        assert await client.store("k", b"from client") == 4  # stores on others, not on itself
        assert len(client.storage) == 0
        assert set(await servers[2].get("k")) == {client.peer_id}
        assert all(client.peer_id.raw not in {c.id for c in s.protocol.router.contacts()} for s in servers)
        assert len(client.protocol.router.contacts()) == 4
    finally:
        for n in [*servers, client]:
            await n.aclose()


async def test_new_node_is_handed_the_records_it_should_hold() -> None:
    network = MemoryNetwork()
    a = node(network, "a")
    await a.start(listen=("a", 1))
    b = node(network, "b")
    await b.start(listen=("b", 1), bootstrap=[("a", 1)])
    try:
        await a.store("handed", b"over", ttl_s=100)
        original = a.storage.records(dht_key("handed"))[0]
        late = node(network, "late")
        await late.start(listen=("late", 1), bootstrap=[("a", 1)])
        for _ in range(50):
            if late.storage.records(dht_key("handed")):
                break
            await asyncio.sleep(0.02)
        assert late.storage.records(dht_key("handed")) == [original]  # same signature and expiry: not extended
        await late.aclose()
    finally:
        await a.aclose()
        await b.aclose()


async def test_thirty_plus_writers_on_one_key_are_all_returned_through_pages() -> None:
    network = MemoryNetwork()
    nodes = [node(network, f"n{i}") for i in range(6)]
    await nodes[0].start(listen=("n0", 1))
    for i, n in enumerate(nodes[1:], 1):
        await n.start(listen=(f"n{i}", 1), bootstrap=[("n0", 1)])
    writers = [node(network, f"w{i}", client_mode=True) for i in range(40)]
    try:
        await asyncio.gather(*(w.start(listen=(f"w{i}", 1), bootstrap=[("n0", 1)]) for i, w in enumerate(writers)))
        big = b"x" * 900  # ~1 KiB records: 40 of them need several FIND_VALUE pages
        assert all(await asyncio.gather(*(w.store("popular", big) for w in writers)))
        found = await nodes[3].get("popular")
        assert set(found) == {w.peer_id for w in writers}
        # A client-mode reader holds nothing locally, so everything came over the wire, in pages.
        assert set(await writers[0].get("popular")) == {w.peer_id for w in writers}
    finally:
        for n in [*nodes, *writers]:
            await n.aclose()


def test_lookup_heap_keeps_one_entry_per_node_and_a_removed_node_out() -> None:
    from petalnode.dht._crawling import _IndexedNodeHeap

    def node(i: int) -> Node:
        return Node(bytes([i]) + bytes(19), "h", 1)

    heap = _IndexedNodeHeap(Node(bytes(20)), 3)
    heap.push([node(4), node(1), node(4), node(2)])
    heap.push(node(1))
    assert [n.id[0] for n in heap] == [1, 2, 4] and len(heap.heap) == 3
    assert node(2) in heap and node(9) not in heap
    heap.remove([node(1).id])
    heap.push([node(1), node(3)])  # another contact lists the dead node again: it stays out
    assert [n.id[0] for n in heap] == [2, 3, 4] and node(1) not in heap


def test_known_records_filter_holds_its_members_and_rarely_others() -> None:
    from petalnode.dht._known import BITS_PER_RECORD, MAX_FILTER_BYTES, MIN_RECORDS, KnownRecords

    members = [(bytes([i % 256, i // 256]) + bytes(18), 7) for i in range(1000)]
    known = KnownRecords.of(members, salt=b"s" * 8)
    assert known is not None and all(m in known for m in members)
    newer = [(writer, 8) for writer, _ in members]  # the same writers with a newer seq: not known
    assert sum(m in known for m in newer) < 25  # ~0.8% false positives expected
    again = KnownRecords.from_wire(known.to_wire())
    assert again is not None and all(m in again for m in members)
    assert KnownRecords.of(members[: MIN_RECORDS - 1]) is None and KnownRecords.from_wire(None) is None
    too_many = [(bytes(20), i) for i in range(MAX_FILTER_BYTES * 8 // BITS_PER_RECORD + 1)]
    assert KnownRecords.of(too_many) is None  # the reader then asks for everything
    largest = KnownRecords.of(too_many[:-1])
    assert largest is not None and MAX_FILTER_BYTES - 1 <= len(largest.to_wire()[1]) <= MAX_FILTER_BYTES
    pack_body(["find_value", [bytes(20), bytes(20), bytes(20), largest.to_wire()]])  # fits one datagram
    for bad in ([b"s" * 8], [b"s" * 7, b"x"], [b"s" * 8, b""], [b"s" * 8, b"x" * (MAX_FILTER_BYTES + 1)], "xx"):
        with pytest.raises(RemoteProtocolError):
            KnownRecords.from_wire(bad)


async def test_a_holder_leaves_out_what_the_reader_already_has() -> None:
    from petalnode.dht._known import KnownRecords

    network = MemoryNetwork()
    holder, reader = node(network, "holder"), node(network, "reader")
    await holder.start(listen=("holder", 1))
    await reader.start(listen=("reader", 1), bootstrap=[("holder", 1)])
    writers = [Identity.from_seed(b"kw%d" % i) for i in range(30)]
    key = dht_key("popular")
    try:
        records = [Record.create(w, key=key, value=b"v" * 200, expires_at=time.time() + 100, seq=5) for w in writers]
        for record in records:
            holder.storage.put(record)
        have = records[:20]
        known = KnownRecords.of([(r.peer_id.raw, r.seq) for r in have], salt=b"fixed-it")
        target = Node(key)
        ok, (got, _) = await reader.protocol.call_find_value(Node(holder.peer_id.raw, "holder", 1), target, known)
        assert ok and {r.peer_id for r in got} == {r.peer_id for r in records[20:]}
        ok, (everything, _) = await reader.protocol.call_find_value(Node(holder.peer_id.raw, "holder", 1), target)
        assert ok and len(everything) == 30
        # A newer record of a writer the reader has at an older seq is still sent.
        holder.storage.put(Record.create(writers[0], key=key, value=b"new", expires_at=time.time() + 100, seq=6))
        ok, (got, _) = await reader.protocol.call_find_value(Node(holder.peer_id.raw, "holder", 1), target, known)
        assert ok and writers[0].peer_id in {r.peer_id for r in got}
        # And a full lookup still finds every writer, with the newest record.
        found = await reader.get("popular")
        assert len(found) == 30 and found[writers[0].peer_id].seq == 6
    finally:
        await reader.aclose()
        await holder.aclose()

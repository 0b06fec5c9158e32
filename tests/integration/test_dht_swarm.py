"""A 50-node DHT in one process over the in-memory network: many servers per block, churn, expiry."""

from __future__ import annotations

import asyncio
import time

import pytest

from petalnode.dht import Announcement, DHTNode, ServerState
from petalnode.identity import Identity
from petalnode.transport import MemoryNetwork

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NUM_NODES = 50
NUM_SERVERS = 35
MODEL = "tiny-llama"
RPC_TIMEOUT_S = 1.0
# Lookup bound after 30% of the nodes died: unanswered calls stop holding an alpha slot after timeout/4, so a
# lookup pays about one RPC timeout for its dead contacts, plus timeout/4 when the first holder it asks to page
# the key is dead; measured 1.5-2.5 s with a 1 s RPC timeout.
LOOKUP_BOUND_S = 4.0


class WallClock:
    """A shared, settable wall clock: record expiry is absolute time, so tests move it by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def start_swarm(network: MemoryNetwork, n: int, clock: WallClock, **kwargs: object) -> list[DHTNode]:
    def make(i: int) -> DHTNode:
        return DHTNode(
            Identity.from_seed(b"swarm-%d" % i), endpoint_factory=network.create_datagram_endpoint,
            rpc_timeout_s=RPC_TIMEOUT_S, wall_clock=clock, **kwargs,
        )

    first = make(0)
    await first.start(listen=("h0", 4000))
    nodes = [first]
    rest = [make(i) for i in range(1, n)]
    # Join in waves so later nodes find a populated network (as in a real swarm that grows over time).
    for wave in range(0, len(rest), 10):
        batch = rest[wave : wave + 10]
        await asyncio.gather(
            *(node.start(listen=(f"h{wave + j + 1}", 4000), bootstrap=[("h0", 4000)]) for j, node in enumerate(batch))
        )
        nodes.extend(batch)
    return nodes


def announcement(i: int, start: int = 0, end: int = 4) -> bytes:
    return Announcement(
        state=ServerState.ONLINE, model=MODEL, start_block=start, end_block=end, throughput=100.0 + i,
        cache_tokens_left=4096, addresses=(f"memory://h{i}:5000",), version="0.1.0", public_name=f"server-{i}",
    ).to_bytes()


async def test_fifty_nodes_many_servers_per_block_and_thirty_percent_killed() -> None:
    network = MemoryNetwork(seed=1)
    clock = WallClock()
    nodes = await start_swarm(network, NUM_NODES, clock)
    client = DHTNode(Identity.from_seed(b"client"), endpoint_factory=network.create_datagram_endpoint,
                     client_mode=True, rpc_timeout_s=RPC_TIMEOUT_S, wall_clock=clock)
    try:
        await client.start(listen=("client", 4000), bootstrap=[("h0", 4000)])
        servers = nodes[:NUM_SERVERS]
        keys = [f"{MODEL}.{b}" for b in range(4)]  # four independent keys (block_key groups blocks by 8)
        stored = await asyncio.gather(*(s.store_many(keys, announcement(i)) for i, s in enumerate(servers)))
        assert all(count >= 10 for per_key in stored for count in per_key.values()), stored

        # Every server is found for every block, with its own signed, decodable announcement.
        found = await client.get_many(keys)
        for key in keys:
            assert set(found[key]) == {s.peer_id for s in servers}, key
            for peer_id, record in found[key].items():
                assert record.peer_id == peer_id
                ann = Announcement.from_bytes(record.value)
                assert ann.public_name == f"server-{servers.index(next(s for s in servers if s.peer_id == peer_id))}"

        # The client never entered anyone's routing table.
        assert all(client.peer_id.raw not in {c.id for c in n.protocol.router.contacts()} for n in nodes)

        # Kill 30% of the nodes (a crash: endpoints vanish, no goodbye), half of them servers.
        doomed = nodes[1:NUM_NODES:10] + nodes[2:NUM_NODES:10] + nodes[3:NUM_NODES:10]
        assert len(doomed) == 15
        for node in doomed:
            network.kill(f"h{nodes.index(node)}")
            await node.aclose()
        alive_servers = {s.peer_id for s in servers if s not in doomed}

        # Every surviving server's record is still found, and each lookup finishes within the bound.
        survivors = [n for n in nodes if n not in doomed]
        for reader in [client, survivors[-1]]:
            for key in keys[:2]:
                started = time.perf_counter()
                records = await reader.get(key)
                elapsed = time.perf_counter() - started
                assert alive_servers <= set(records), (key, len(alive_servers - set(records)))
                assert elapsed < LOOKUP_BOUND_S, elapsed

        # Dead writers' records vanish within one expiry: survivors refresh (store again), time moves past ttl.
        clock.now += survivors[0].record_ttl_s / 2
        await asyncio.gather(*(s.store_many(keys[:1], announcement(i)) for i, s in enumerate(servers)
                               if s not in doomed))
        clock.now += survivors[0].record_ttl_s / 2 + 1
        records = await client.get(keys[0])
        assert set(records) == alive_servers
    finally:
        await client.aclose()
        for node in nodes:
            await node.aclose()


async def test_refresh_task_keeps_own_record_alive_and_stops_on_close() -> None:
    network = MemoryNetwork(seed=2)
    clock = WallClock()
    nodes = await start_swarm(network, 8, clock, record_ttl_s=2.0)
    try:
        handle = nodes[3].start_refreshing(["m.0", "m.1"], lambda: b"v", period_s=0.2)
        await asyncio.sleep(0.3)
        assert set(await nodes[5].get("m.1")) == {nodes[3].peer_id}
        before = max(r.seq for r in nodes[6].storage.records(nodes[6].storage.keys()[0]))
        clock.now += 1.5  # the refresher re-signs with a later expiry
        await asyncio.sleep(0.5)
        clock.now += 1.0  # past the first record's expiry, not the refreshed one
        records = await nodes[5].get("m.0")
        assert set(records) == {nodes[3].peer_id}
        assert records[nodes[3].peer_id].seq > before
        handle.cancel()
        await asyncio.sleep(0.01)  # the owner keeps the task until it has finished cancelling, then forgets it
        assert handle.done
        assert not nodes[3]._tasks or all(not t.get_coro().__name__ == "refresh" for t in nodes[3]._tasks)
        clock.now += 3.0
        assert await nodes[5].get("m.0") == {}
    finally:
        for node in nodes:
            await node.aclose()
    assert all(not n._tasks and not n.protocol._tasks for n in nodes)

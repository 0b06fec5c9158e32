"""DHT cost: single-key lookups, and what a swarm view and a server's refresh cost, for N nodes in one process.

Runs over the in-memory network with zero latency, so real time is the CPU the DHT code needs (one process, one
core). Three measurements, each printed as one JSON object:
- "lookup": a full `DHTNode.get` of a key written by 5 servers, from a random node (median, p99, success);
- "swarm_view": a client reads a model's swarm with `fetch_swarm` (what a client does before routing and a
  server before choosing blocks), while servers announce random spans with their real announcement keys:
  datagrams, CPU ms and Ed25519 verifications per view (first view, then repeated views of the same records);
- "refresh": every server re-announcing its span once (what happens every ttl/2): datagrams and CPU ms per server.
With --compare-paths each measurement runs once per number of disjoint lookup paths (1 = the old single-path
lookup, then the default), side by side in one process, and a last "paths_ratio" object gives new/old ratios.
Run: python benchmarks/dht_lookup.py [--quick] [--compare-paths]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petalnode.dht import Announcement, DHTNode, ServerState
from petalnode.identity import Identity
from petalnode.node import fetch_swarm
from petalnode.transport import MemoryNetwork

WRITERS_PER_KEY = 5
NUM_KEYS = 10
MODEL = "bench-model"


def _verifications() -> int | None:
    try:
        from petalnode.dht._record import _verified
    except ImportError:  # a version without the verification cache
        return None
    return _verified.verifications


def _reset_verified_cache(size: int) -> None:
    # All nodes share one process here, and so would share its cache of verified signatures: a record stored on
    # 20 nodes would be checked once instead of 20 times. Benchmarks turn the cache off (0) while many nodes act
    # and empty it before a reader's first view, so numbers match one node per process.
    try:
        from petalnode.dht._record import VERIFIED_CACHE_SIZE, _verified
    except ImportError:
        return
    _verified.reset(VERIFIED_CACHE_SIZE if size < 0 else size)


async def _build(network: MemoryNetwork, num_nodes: int, paths: int | None = None) -> list[DHTNode]:
    extra = {} if paths is None else {"disjoint_paths": paths}
    nodes = [DHTNode(Identity.from_seed(b"bench-%d" % i), endpoint_factory=network.create_datagram_endpoint, **extra)
             for i in range(num_nodes)]
    await nodes[0].start(listen=("h0", 4000))
    for wave in range(1, num_nodes, 20):
        await asyncio.gather(*(nodes[i].start(listen=(f"h{i}", 4000), bootstrap=[("h0", 4000)])
                               for i in range(wave, min(wave + 20, num_nodes))))
    return nodes


async def measure_dht_lookups(num_nodes: int, lookups: int = 100, paths: int | None = None) -> dict[str, Any]:
    """Build a `num_nodes` swarm, announce NUM_KEYS keys, then time `lookups` lookups from random nodes."""
    network = MemoryNetwork(seed=0)
    rng = random.Random(0)
    build_started = time.perf_counter()
    nodes = await _build(network, num_nodes, paths)
    build_s = time.perf_counter() - build_started
    try:
        keys = [f"{MODEL}.{k}" for k in range(NUM_KEYS)]
        store_sent = network.datagrams_sent
        for key in keys:
            await asyncio.gather(*(w.store(key, b"announcement") for w in rng.sample(nodes, WRITERS_PER_KEY)))
        store_datagrams = (network.datagrams_sent - store_sent) / (NUM_KEYS * WRITERS_PER_KEY)
        latencies, ok = [], 0
        sent = network.datagrams_sent if hasattr(network, "datagrams_sent") else None
        for _ in range(lookups):
            reader, key = rng.choice(nodes), rng.choice(keys)
            started = time.perf_counter()
            found = await reader.get(key)
            latencies.append(time.perf_counter() - started)
            ok += len(found) == WRITERS_PER_KEY
        latencies.sort()
        return {
            "measure": "lookup", "num_nodes": num_nodes, "paths": nodes[0].disjoint_paths, "transport": "memory",
            "lookups": lookups, "datagrams_per_store": round(store_datagrams, 1),
            "median_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 2),
            "datagrams_per_lookup": None if sent is None else round((network.datagrams_sent - sent) / lookups, 1),
            "success_rate": ok / lookups, "build_s": round(build_s, 2),
        }
    finally:
        for node in nodes:
            await node.aclose()


def _announcement(i: int, start: int, end: int) -> Announcement:
    return Announcement(
        state=ServerState.ONLINE, model=MODEL, start_block=start, end_block=end, throughput=100.0 + i,
        cache_tokens_left=8192, addresses=(f"memory://h{i}:4000/{'x' * 52}",), version="0.1.0",
    )


async def measure_swarm_views(
    num_nodes: int, servers: int, num_blocks: int, span: tuple[int, int], views: int = 10, paths: int | None = None
) -> list[dict[str, Any]]:
    """`servers` of the `num_nodes` DHT nodes announce random spans; a client reads the swarm `views` times."""
    network = MemoryNetwork(seed=0)
    rng = random.Random(1)
    nodes = await _build(network, num_nodes, paths)
    extra = {} if paths is None else {"disjoint_paths": paths}
    reader = DHTNode(Identity.from_seed(b"bench-reader"), endpoint_factory=network.create_datagram_endpoint,
                     client_mode=True, **extra)
    await reader.start(listen=("reader", 4000), bootstrap=[("h0", 4000)])
    try:
        spans = []
        for _ in range(servers):
            length = rng.randint(*span)
            start = rng.randint(0, num_blocks - length)
            spans.append((start, start + length))
        announcements = [_announcement(i, a, b) for i, (a, b) in enumerate(spans)]
        keys_per_server = statistics.mean(len(a.block_keys()) for a in announcements)
        _reset_verified_cache(0)
        sent, cpu = network.datagrams_sent, time.process_time()
        for i, a in enumerate(announcements):  # one server at a time: CPU per refresh, not queueing
            await nodes[i].store_many(a.block_keys(), a.to_bytes())
        refresh = {
            "measure": "refresh", "num_nodes": num_nodes, "paths": reader.disjoint_paths, "servers": servers,
            "num_blocks": num_blocks,
            "span": list(span), "keys_per_server": round(keys_per_server, 2),
            "datagrams_per_server": round((network.datagrams_sent - sent) / servers, 1),
            "cpu_ms_per_server": round((time.process_time() - cpu) * 1000 / servers, 2),
        }
        per_view: list[tuple[int, float, int | None, int]] = []
        complete = 0
        _reset_verified_cache(-1)  # a reader with an empty cache: the first view verifies, later ones remember
        for _ in range(views):
            sent, cpu, checked = network.datagrams_sent, time.process_time(), _verifications()
            sent_bytes = network.datagram_bytes_sent
            view = await fetch_swarm(reader, MODEL, num_blocks)
            after = _verifications()
            per_view.append((network.datagrams_sent - sent, time.process_time() - cpu,
                             None if checked is None or after is None else after - checked,
                             network.datagram_bytes_sent - sent_bytes))
            complete += {(s.start, s.end) for s in view.servers.values()} == set(spans) and len(view.servers) == servers
        first, repeats = per_view[0], per_view[1:] or per_view
        view_result = {
            "measure": "swarm_view", "num_nodes": num_nodes, "paths": reader.disjoint_paths, "servers": servers,
            "num_blocks": num_blocks,
            "span": list(span), "views": views, "complete_views": complete,
            "first_view": {"datagrams": first[0], "kib": round(first[3] / 1024, 1), "cpu_ms": round(first[1] * 1000, 1),
                           "verifications": first[2]},
            "repeat_view": {
                "datagrams": statistics.median(v[0] for v in repeats),
                "kib": round(statistics.median(v[3] for v in repeats) / 1024, 1),
                "cpu_ms": round(statistics.median(v[1] for v in repeats) * 1000, 1),
                "verifications": None if first[2] is None else statistics.median(v[2] or 0 for v in repeats),
            },
        }
        return [refresh, view_result]
    finally:
        _reset_verified_cache(-1)
        await reader.aclose()
        for node in nodes:
            await node.aclose()


async def _main(quick: bool) -> None:
    for n in (50,) if quick else (50, 200):
        print(json.dumps(await measure_dht_lookups(n)), flush=True)
    # (DHT nodes, servers, model blocks, span lengths): the CI churn scenario's shape, a mid-size and a 70B-like model.
    for num_nodes, servers, num_blocks, span in _view_configs(quick):
        for result in await measure_swarm_views(num_nodes, servers, num_blocks, span):
            print(json.dumps(result), flush=True)


def _view_configs(quick: bool) -> list[tuple[int, int, int, tuple[int, int]]]:
    if quick:
        return [(100, 30, 8, (2, 4))]
    # ... and every DHT node a server of a 32-block model (the 1,000-server simulation's shape, smaller).
    return [(200, 30, 8, (2, 4)), (200, 60, 32, (4, 12)), (200, 100, 80, (8, 40)), (400, 400, 32, (4, 8))]


async def _compare_paths(quick: bool) -> None:
    """Old (1 path) and new (the default) lookups side by side, then their ratios per measurement."""
    from petalnode.dht._node import DISJOINT_PATHS

    by_paths: dict[int, list[dict[str, Any]]] = {}
    for paths in sorted({1, DISJOINT_PATHS}):
        results = [await measure_dht_lookups(n, paths=paths) for n in ((50,) if quick else (50, 200))]
        for num_nodes, servers, num_blocks, span in _view_configs(quick)[:1 if quick else 2]:
            results += await measure_swarm_views(num_nodes, servers, num_blocks, span, paths=paths)
        for result in results:
            print(json.dumps(result), flush=True)
        by_paths[paths] = results

    def ratio(new: Any, old: Any) -> float | None:
        return round(new / old, 2) if isinstance(new, int | float) and isinstance(old, int | float) and old else None

    old, new = by_paths[1], by_paths[DISJOINT_PATHS]
    for a, b in zip(old, new, strict=True):
        fields = {"median_ms", "p99_ms", "datagrams_per_lookup", "datagrams_per_store", "datagrams_per_server",
                  "cpu_ms_per_server"}
        ratios = {f: ratio(b[f], a[f]) for f in fields if f in a}
        for view in ("first_view", "repeat_view"):
            if view in a:
                ratios.update({f"{view}.{f}": ratio(b[view][f], a[view][f]) for f in a[view]})
        print(json.dumps({"measure": "paths_ratio", "of": a["measure"], "num_nodes": a["num_nodes"],
                          "new_paths": DISJOINT_PATHS, "old_paths": 1, "new_over_old": ratios,
                          "success": [a.get("success_rate", a.get("complete_views")),
                                      b.get("success_rate", b.get("complete_views"))]}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DHT lookup, swarm view and refresh cost")
    parser.add_argument("--quick", action="store_true", help="small swarms only (about a minute)")
    parser.add_argument("--compare-paths", action="store_true", help="1 disjoint path vs the default, side by side")
    args = parser.parse_args()
    asyncio.run(_compare_paths(args.quick) if args.compare_paths else _main(args.quick))

"""DHT lookup latency (median, p99) and success rate for N nodes in one process.

Runs over the in-memory network (falls back to UDP on 127.0.0.1 if it is unavailable). Every lookup is a full
`DHTNode.get` of a key written by 5 servers, issued by a random node; success means all 5 records came back.
Run: python benchmarks/dht_lookup.py  (prints one JSON object per swarm size: 50 and 200 nodes).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petalnode.dht import DHTNode
from petalnode.identity import Identity

WRITERS_PER_KEY = 5
NUM_KEYS = 10


async def measure_dht_lookups(num_nodes: int, lookups: int = 100) -> dict[str, Any]:
    """Build a `num_nodes` swarm, announce NUM_KEYS keys, then time `lookups` lookups from random nodes."""
    try:
        from petalnode.transport import MemoryNetwork

        network: Any = MemoryNetwork(seed=0)
        factory, transport = network.create_datagram_endpoint, "memory"
        hosts = [(f"h{i}", 4000) for i in range(num_nodes)]
    except ImportError:
        factory, transport = None, "udp-loopback"
        hosts = [("127.0.0.1", 0)] * num_nodes
    rng = random.Random(0)
    nodes = [DHTNode(Identity.from_seed(b"bench-%d" % i), endpoint_factory=factory) for i in range(num_nodes)]
    build_started = time.perf_counter()
    await nodes[0].start(listen=hosts[0])
    boot = hosts[0] if factory else ("127.0.0.1", nodes[0].port)
    for wave in range(1, num_nodes, 20):
        await asyncio.gather(*(nodes[i].start(listen=hosts[i], bootstrap=[boot])
                               for i in range(wave, min(wave + 20, num_nodes))))
    build_s = time.perf_counter() - build_started
    try:
        keys = [f"bench-model.{k}" for k in range(NUM_KEYS)]
        for key in keys:
            await asyncio.gather(*(w.store(key, b"announcement") for w in rng.sample(nodes, WRITERS_PER_KEY)))
        latencies, ok = [], 0
        for _ in range(lookups):
            reader, key = rng.choice(nodes), rng.choice(keys)
            started = time.perf_counter()
            found = await reader.get(key)
            latencies.append(time.perf_counter() - started)
            ok += len(found) == WRITERS_PER_KEY
        latencies.sort()
        return {
            "num_nodes": num_nodes, "transport": transport, "lookups": lookups,
            "median_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 2),
            "success_rate": ok / lookups, "build_s": round(build_s, 2),
        }
    finally:
        for node in nodes:
            await node.aclose()


async def _main() -> None:
    for n in (50, 200):
        print(json.dumps(await measure_dht_lookups(n)), flush=True)


if __name__ == "__main__":
    asyncio.run(_main())

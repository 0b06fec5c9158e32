"""Disjoint-path lookups (`_crawling`) against a synthetic network answered in memory (no sockets, no clock)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from typing import Any

import pytest
from kademlia.node import Node

from petalnode.dht._crawling import MAX_QUERIES_PER_PATH_PER_K, FastNodeSpiderCrawl
from petalnode.errors import ConfigError

pytestmark = pytest.mark.timeout(30)
KSIZE = 5
ALPHA = 3


def ident(i: int) -> bytes:
    return hashlib.sha256(b"node-%d" % i).digest()[:20]


def at(node_id: bytes) -> tuple[bytes, str, int]:
    """A contact: each synthetic node listens on its own port (one address is one node in a lookup)."""
    return (node_id, "h", 1 + int.from_bytes(node_id[:2], "big"))


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


class SyntheticNetwork:
    """Answers FIND_NODE as a swarm would: honest nodes list the k nearest of everyone, colluders only colluders."""

    def __init__(self, ids: list[bytes], colluders: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        self._wait_timeout = 1.0
        self.ids, self.colluders = ids, colluders
        self.asked: Counter[bytes] = Counter()

    async def call_find_node(self, peer: Node, target: Node) -> tuple[bool, Any]:
        self.asked[peer.id] += 1
        await asyncio.sleep(0)
        pool = self.colluders if peer.id in self.colluders else self.ids
        ranked = sorted((i for i in pool if i != peer.id), key=lambda i: distance(i, target.id))[:KSIZE]
        return True, [at(i) for i in ranked]


def seeds(ids: list[bytes], key: bytes, count: int) -> list[Node]:
    return [Node(*at(i)) for i in sorted(ids, key=lambda i: distance(i, key))[:count]]


async def test_every_node_is_asked_by_at_most_one_path_and_the_k_nearest_are_found() -> None:
    ids = [ident(i) for i in range(80)]
    key = hashlib.sha256(b"key").digest()[:20]
    for paths in (1, 2, 3):
        network = SyntheticNetwork(ids)
        start = random.Random(paths).sample(ids, KSIZE * paths)  # far from the key: the paths have to walk
        crawl = FastNodeSpiderCrawl(network, Node(key), [Node(*at(i)) for i in start], KSIZE, ALPHA, paths=paths)
        found = [n.id for n in await crawl.find()]
        assert max(network.asked.values()) == 1
        assert crawl.queried == sum(network.asked.values())
        contacted = [heap.contacted for heap in crawl.paths]
        assert all(not (a & b) for i, a in enumerate(contacted) for b in contacted[i + 1 :])
        nearest = sorted(ids, key=lambda i: distance(i, key))
        assert set(nearest[:KSIZE]) <= set(found) and len(found) <= KSIZE * paths


async def test_colluders_nearest_the_key_capture_one_path_but_not_two() -> None:
    ids = [ident(i) for i in range(60)]
    key = hashlib.sha256(b"model.0:8").digest()[:20]
    ranked = sorted(ids, key=lambda i: distance(i, key))
    colluders = set(ranked[: KSIZE + 3])  # more than k of them, nearer the key than any honest node
    honest_near = set(ranked[KSIZE + 3 : 2 * KSIZE])
    results = {}
    for paths in (1, 2):
        network = SyntheticNetwork(ids, colluders)
        crawl = FastNodeSpiderCrawl(network, Node(key), seeds(ids, key, KSIZE * paths), KSIZE, ALPHA, paths=paths)
        results[paths] = {n.id for n in await crawl.find()}
    assert results[1] <= colluders  # a store or lookup on one path reaches only the attacker
    assert results[2] & honest_near  # two disjoint paths reach the honest nodes just beyond them


class InventingNetwork:
    """Every answer lists fresh invented ids (all of which answer), each nearer the key than any before it."""

    def __init__(self, key: bytes) -> None:
        self._wait_timeout = 1.0
        self.key, self.queries = int.from_bytes(key, "big"), 0
        self.distance = 2**159  # shrinks by 10% per id: about 1,000 ids (200 answers) before they reach the key

    async def call_find_node(self, peer: Node, target: Node) -> tuple[bool, Any]:
        self.queries += 1
        await asyncio.sleep(0)
        fresh = []
        for _ in range(KSIZE):
            self.distance = max(1, self.distance * 9 // 10)
            fresh.append((self.key ^ self.distance).to_bytes(20, "big"))
        return True, [at(i) for i in fresh]


async def test_invented_contacts_cannot_make_a_lookup_endless() -> None:
    key = hashlib.sha256(b"key").digest()[:20]
    network = InventingNetwork(key)
    crawl = FastNodeSpiderCrawl(network, Node(key), [Node(*at(ident(i))) for i in range(4)], KSIZE, ALPHA, paths=2)
    await asyncio.wait_for(crawl.find(), 10)
    assert network.queries <= 2 * MAX_QUERIES_PER_PATH_PER_K * KSIZE


def test_a_lookup_needs_a_path() -> None:
    with pytest.raises(ConfigError):
        FastNodeSpiderCrawl(SyntheticNetwork([]), Node(bytes(20)), [], KSIZE, ALPHA, paths=0)


class OneSocketSybil(SyntheticNetwork):
    """Honest nodes as above, plus one attacker socket that answers as ever more ids, all nearer the key."""

    def __init__(self, ids: list[bytes], attacker: bytes, key: bytes) -> None:
        super().__init__(ids)
        self.attacker, self.key, self.distance = attacker, int.from_bytes(key, "big"), 2**150

    async def call_find_node(self, peer: Node, target: Node) -> tuple[bool, Any]:
        if peer.ip != "evil":
            ok, contacts = await super().call_find_node(peer, target)
            return ok, [(i, "evil" if i == self.attacker else h, p) for i, h, p in contacts]
        self.asked[peer.id] += 1
        fresh = []
        for _ in range(KSIZE):
            self.distance //= 2
            fresh.append(((self.key ^ self.distance).to_bytes(20, "big"), "evil", 1))
        return True, fresh


async def test_one_address_counts_as_one_node_however_many_ids_it_claims() -> None:
    ids = [ident(i) for i in range(60)]
    key = hashlib.sha256(b"model.0:8").digest()[:20]
    ranked = sorted(ids, key=lambda i: distance(i, key))
    attacker, honest_near = ranked[0], set(ranked[1 : KSIZE + 1])
    network = OneSocketSybil(ids, attacker, key)
    start = [Node(i, "evil", 1) if i == attacker else Node(*at(i)) for i in ranked[: 2 * KSIZE]]
    crawl = FastNodeSpiderCrawl(network, Node(key), start, KSIZE, ALPHA, paths=2)
    found = {n.id for n in await crawl.find()}
    assert network.asked[attacker] == 1 and sum(network.asked.values()) == crawl.queried
    assert honest_near <= found  # the sybil ids it listed at its own address were never taken

# Iterative lookups over d disjoint paths that collect records from *all* of the nearest nodes.
#
# kademlia's ValueSpiderCrawl stops at the first node holding a value and returns one value picked by majority,
# then stores it on the closest node without it. We want the union of every writer's record, so this crawl runs
# to the same end as a node lookup (all of the k nearest contacted) and merges per writer, keeping the highest
# verified seq (colluders can drop or replay old signed records, never forge a newer one). It never stores
# anything on its own: only writers write.
#
# Disjoint paths (S/Kademlia, Baumgart and Mies 2007, section 4.4): the known nearest contacts are dealt round-robin
# into d paths, each with its own heap of k; a path learns contacts only from the answers to its own queries, and
# a node is queried by at most one path (the first to query it claims it; the others drop it). So colluders that
# answer a path with only each other (or with nothing) poison that path alone, and d paths that each end at their
# own k nearest unclaimed nodes cover up to d*k nodes around the key: a single path's k nearest can be all
# colluders, the union of d paths only if there are d*k of them (or they sit on every path's route).
#
# Invariants: every record in `found` passed `Record.verify` at the crawl's wall-clock time; a record is verified
# at most once per (writer, seq) however many nodes return it; no node is queried twice in one crawl; one address
# (host, port) stands for one node id in a crawl (the first id seen there: ids are claimed, not proven); each
# path sends at most MAX_QUERIES_PER_PATH_PER_K * k queries (contacts are free to invent: an endless supply of
# ever closer ids must not make a lookup endless).
from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.node import Node, NodeHeap

from petalnode.dht._known import KnownRecords
from petalnode.dht._record import Record
from petalnode.errors import ConfigError, InvalidRecordError

SLOW_CALL_FRACTION = 0.25
# An honest lookup queries about k + log2(N) nodes per path; 8k is far above that and still bounds a path that
# keeps being handed fresh (invented) contacts closer to the key.
MAX_QUERIES_PER_PATH_PER_K = 8


class _IndexedNodeHeap(NodeHeap):
    """kademlia's NodeHeap with an index of the ids it holds and has dropped.

    kademlia's `push` and `in` scan the whole heap (quadratic per lookup: 3% of a simulated swarm's CPU), and a
    node removed for not answering comes back as soon as another contact lists it. Here both are set lookups,
    and a removed node stays out for the rest of the lookup.
    """

    def __init__(self, node: Node, maxsize: int, *, addresses: dict[tuple[str, int], bytes] | None = None) -> None:
        super().__init__(node, maxsize)
        self._ids: set[bytes] = set()
        self._removed: set[bytes] = set()
        # Shared by a lookup's paths: the first id seen at each address. Node ids in datagrams are claims nobody
        # proves, so one socket could otherwise answer as any number of ids ground next to the key.
        self._addresses = addresses

    def push(self, nodes: Node | list[Node]) -> None:
        for node in nodes if isinstance(nodes, list) else [nodes]:
            if self._addresses is not None and self._addresses.setdefault((node.ip, node.port), node.id) != node.id:
                continue
            if node.id not in self._ids and node.id not in self._removed:
                self._ids.add(node.id)
                heapq.heappush(self.heap, (self.node.distance_to(node), node))

    def remove(self, peers: list[bytes]) -> None:
        gone = self._ids.intersection(peers)
        self._removed.update(peers)
        if gone:
            self._ids -= gone
            self.heap = [entry for entry in self.heap if entry[1].id not in gone]
            heapq.heapify(self.heap)

    def __contains__(self, node: object) -> bool:
        return getattr(node, "id", None) in self._ids


class _AsyncAlphaMixin:
    """Replace SpiderCrawl's lock-step rounds with alpha calls always in flight, on each of d disjoint paths.

    kademlia's `_find` sends alpha requests and waits for all of them, so one dead contact stalls every round for
    a whole RPC timeout. Here a new request goes out as soon as any answer (or timeout) comes back (the paper's
    section 2.3 allows this), with the same stopping rule per path: every one of the path's k nearest known nodes
    was asked (or the path used up its query budget). Pending calls are tasks this coroutine owns and cancels on
    exit. With `paths=1` this is the plain single-path lookup.
    """

    nearest: Any
    protocol: Any
    alpha: int
    ksize: int
    node: Node

    def __init__(self, protocol: Any, node: Node, peers: list[Node], ksize: int, alpha: int, *, paths: int = 1) -> None:
        super().__init__(protocol, node, [], ksize, alpha)  # type: ignore[call-arg]
        if type(paths) is not int or paths < 1:
            raise ConfigError(f"a lookup needs at least one path, got {paths!r}")
        addresses: dict[tuple[str, int], bytes] = {}
        self.paths = [_IndexedNodeHeap(node, ksize, addresses=addresses) for _ in range(paths)]
        # S/Kademlia: the initiator's k closest contacts are distributed over the d paths (closest first, dealt).
        for index, peer in enumerate(sorted(peers, key=node.distance_to)):
            self.paths[index % paths].push(peer)
        self.nearest = self.paths[0]
        self._queries = [0] * paths
        self.queried = 0  # queries sent in all (benchmarks and tests)

    def closest(self) -> list[Node]:
        """The union of every path's k nearest nodes that answered, nearest to the key first."""
        found = {n.id: n for heap in self.paths for n in heap}
        return sorted(found.values(), key=self.node.distance_to)

    def _claim(self, index: int, peer: Node) -> None:
        self.paths[index].mark_contacted(peer)
        self._queries[index] += 1
        self.queried += 1
        for other, heap in enumerate(self.paths):
            if other != index:
                heap.remove([peer.id])  # and keeps it out: contacts listing it again do not bring it back

    async def _crawl(self, rpcmethod: Callable[[Node, Node], Awaitable[tuple[bool, Any]]]) -> None:
        loop = asyncio.get_running_loop()
        # A call unanswered for a quarter of the RPC timeout is probably to a dead node; it keeps running but no
        # longer holds one of the alpha slots, so dead contacts cost about one timeout per lookup, not per wave.
        slow_after_s = SLOW_CALL_FRACTION * self.protocol._wait_timeout
        budget = MAX_QUERIES_PER_PATH_PER_K * self.ksize
        pending: dict[asyncio.Task[tuple[bool, Any]], tuple[int, bytes, float]] = {}
        try:
            while True:
                now = loop.time()
                for index, heap in enumerate(self.paths):
                    fast = sum(1 for path, _, sent in pending.values() if path == index and now - sent < slow_after_s)
                    for peer in heap.get_uncontacted():
                        if fast >= self.alpha or self._queries[index] >= budget:
                            break
                        self._claim(index, peer)
                        pending[asyncio.ensure_future(rpcmethod(peer, self.node))] = (index, peer.id, now)
                        fast += 1
                if not pending:
                    return
                next_slow = min(
                    (sent + slow_after_s for _, _, sent in pending.values() if sent + slow_after_s > now), default=None
                )
                done, _ = await asyncio.wait(
                    pending,
                    timeout=None if next_slow is None else next_slow - now,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    index, peer_id, _ = pending.pop(task)
                    ok, body = task.result()
                    if ok:
                        self._on_answer(index, body)
                    else:
                        self.paths[index].remove([peer_id])
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # Each concrete crawler (below) says what an answer to path `index` adds: closer contacts, or records.
    # Declared here, without a body, so the mixin's loop type-checks; there is no default behaviour to fall back on.
    _on_answer: Callable[[int, Any], None]


class FastNodeSpiderCrawl(_AsyncAlphaMixin, NodeSpiderCrawl):
    """Find the k closest live nodes to a key."""

    async def find(self) -> list[Node]:
        """The union of the paths' k nearest live nodes (up to paths * k), nearest first."""
        await self._crawl(self.protocol.call_find_node)
        return self.closest()

    def _on_answer(self, index: int, body: Any) -> None:
        self.paths[index].push([Node(*contact) for contact in body])


class RecordSpiderCrawl(_AsyncAlphaMixin, SpiderCrawl):
    """Crawl toward `node` (the key) on `paths` disjoint paths, merging verified records from every responder."""

    def __init__(
        self,
        protocol: Any,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        *,
        verify: Callable[[Record], None],
        paths: int = 1,
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha, paths=paths)
        self._verify = verify
        self.found: dict[bytes, Record] = {}
        self.rejected = 0
        # The gate (see `_find_value`): one holder at a time, the pager, pages through the key first.
        self._pager_active = False
        self._pager_stalled = False  # a request gave up waiting for the current pager: nobody else waits for it
        self._paged = False  # some holder has paged its records to us
        self._pager_event = asyncio.Event()  # set (and replaced) on each of the pager's pages, and when it ends

    async def find(self) -> dict[bytes, Record]:
        await self._crawl(self._find_value)
        return self.found

    async def _find_value(self, peer: Node, node: Node) -> tuple[bool, Any]:
        # Each request tells its holder what we already have (a fresh salt per request), so the k replicas of a key
        # with many writers do not each send every record. Requests sent at once would all carry the same (empty)
        # filter and page through the same records in lockstep, so one holder, the pager, pages alone while the
        # other requests wait; they then carry a filter of its records and bring only what it lacked. A pager that
        # failed, or gave us nothing while we had nothing, hands the role on; one that gives no page within a
        # quarter of the RPC timeout (or stalls between pages for a whole one) is not waited for.
        while True:
            stalled = await self._wait_for_pager()
            if stalled or self._paged:
                return await self.protocol.call_find_value(peer, node, self._known())
            if not self._pager_active:
                break
        self._pager_active, self._pager_stalled = True, False
        try:
            ok, body = await self.protocol.call_find_value(peer, node, self._known(), on_page=self._pager_page)
            if ok:  # merged before the gate opens, so the waiters' filters hold these records
                records, contacts = body
                # It answered: others now carry a filter of all we have. Only a holder that gave us nothing while
                # we had nothing (it does not hold the key, or sent only invalid records) hands the role on.
                self._paged = self.merge(records) > 0 or bool(self.found)
                body = ([], contacts)
            return ok, body
        finally:
            self._pager_active = False
            self._pager_page()

    def _known(self) -> KnownRecords | None:
        return KnownRecords.of((writer, record.seq) for writer, record in self.found.items())

    def _pager_page(self) -> None:
        event, self._pager_event = self._pager_event, asyncio.Event()
        event.set()

    async def _wait_for_pager(self) -> bool:
        """Wait while a pager is at work; True if it stalled (then ask without waiting any longer)."""
        patience = SLOW_CALL_FRACTION * self.protocol._wait_timeout  # until its first page
        while self._pager_active:
            if self._pager_stalled:
                return True
            try:
                async with asyncio.timeout(patience):
                    await self._pager_event.wait()
            except TimeoutError:
                self._pager_stalled = True
                return True
            patience = self.protocol._wait_timeout  # until its next page
        return False

    def merge(self, records: list[Record]) -> int:
        """Keep the newest verified record per writer; returns how many records were taken."""
        taken = 0
        for record in records:
            subkey = record.peer_id.raw
            held = self.found.get(subkey)
            if held is not None and not record.supersedes(held):
                continue
            try:
                self._verify(record)
            except InvalidRecordError:
                self.rejected += 1
                continue
            self.found[subkey] = record
            taken += 1
        return taken

    def _on_answer(self, index: int, body: Any) -> None:
        records, contacts = body
        self.merge(records)
        self.paths[index].push([Node(*contact) for contact in contacts])

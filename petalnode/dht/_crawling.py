# Iterative lookup that collects records from *all* of the k closest nodes.
#
# kademlia's ValueSpiderCrawl stops at the first node holding a value and returns one value picked by majority,
# then stores it on the closest node without it. We want the union of every writer's record, so this crawl runs
# to the same end as a node lookup (all of the k nearest contacted) and merges per writer, keeping the highest
# verified seq. It never stores anything on its own: only writers write.
#
# Invariants: every record in `found` passed `Record.verify` at the crawl's wall-clock time; a record is verified
# at most once per (writer, seq) however many nodes return it.
from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.node import Node, NodeHeap

from petalnode.dht._known import KnownRecords
from petalnode.dht._record import Record
from petalnode.errors import InvalidRecordError

SLOW_CALL_FRACTION = 0.25


class _IndexedNodeHeap(NodeHeap):
    """kademlia's NodeHeap with an index of the ids it holds and has dropped.

    kademlia's `push` and `in` scan the whole heap (quadratic per lookup: 3% of a simulated swarm's CPU), and a
    node removed for not answering comes back as soon as another contact lists it. Here both are set lookups,
    and a removed node stays out for the rest of the lookup.
    """

    def __init__(self, node: Node, maxsize: int) -> None:
        super().__init__(node, maxsize)
        self._ids: set[bytes] = set()
        self._removed: set[bytes] = set()

    def push(self, nodes: Node | list[Node]) -> None:
        for node in nodes if isinstance(nodes, list) else [nodes]:
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
    """Replace SpiderCrawl's lock-step rounds with alpha calls always in flight.

    kademlia's `_find` sends alpha requests and waits for all of them, so one dead contact stalls every round for
    a whole RPC timeout. Here a new request goes out as soon as any answer (or timeout) comes back (the paper's
    section 2.3 allows this), with the same stopping rule: every one of the k nearest known nodes was asked.
    Pending calls are tasks this coroutine owns and cancels on exit.
    """

    nearest: Any
    protocol: Any
    alpha: int
    node: Node

    def __init__(self, protocol: Any, node: Node, peers: list[Node], ksize: int, alpha: int) -> None:
        super().__init__(protocol, node, [], ksize, alpha)  # type: ignore[call-arg]
        self.nearest = _IndexedNodeHeap(node, ksize)
        self.nearest.push(list(peers))

    async def _crawl(self, rpcmethod: Callable[[Node, Node], Awaitable[tuple[bool, Any]]]) -> None:
        loop = asyncio.get_running_loop()
        # A call unanswered for a quarter of the RPC timeout is probably to a dead node; it keeps running but no
        # longer holds one of the alpha slots, so dead contacts cost about one timeout per lookup, not per wave.
        slow_after_s = SLOW_CALL_FRACTION * self.protocol._wait_timeout
        pending: dict[asyncio.Task[tuple[bool, Any]], tuple[bytes, float]] = {}
        try:
            while True:
                now = loop.time()
                fast = sum(1 for _, sent in pending.values() if now - sent < slow_after_s)
                for peer in self.nearest.get_uncontacted():
                    if fast >= self.alpha:
                        break
                    self.nearest.mark_contacted(peer)
                    pending[asyncio.ensure_future(rpcmethod(peer, self.node))] = (peer.id, now)
                    fast += 1
                if not pending:
                    return
                next_slow = min((sent + slow_after_s for _, sent in pending.values() if sent + slow_after_s > now),
                                default=None)
                done, _ = await asyncio.wait(
                    pending, timeout=None if next_slow is None else next_slow - now,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    peer_id, _ = pending.pop(task)
                    ok, body = task.result()
                    if ok:
                        self._on_answer(body)
                    else:
                        self.nearest.remove([peer_id])
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # Each concrete crawler (below) says what an answer adds: closer contacts, or records. Declared here, without a
    # body, so the mixin's loop type-checks; there is no default behaviour to fall back on.
    _on_answer: Callable[[Any], None]


class FastNodeSpiderCrawl(_AsyncAlphaMixin, NodeSpiderCrawl):
    """Find the k closest live nodes to a key."""

    async def find(self) -> list[Node]:
        await self._crawl(self.protocol.call_find_node)
        return list(self.nearest)

    def _on_answer(self, body: Any) -> None:
        self.nearest.push([Node(*contact) for contact in body])


class RecordSpiderCrawl(_AsyncAlphaMixin, SpiderCrawl):
    """Crawl toward `node` (the key), merging verified records from every responder."""

    def __init__(
        self, protocol: Any, node: Node, peers: list[Node], ksize: int, alpha: int, *, verify: Callable[[Record], None]
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
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

    def _on_answer(self, body: Any) -> None:
        records, contacts = body
        self.merge(records)
        self.nearest.push([Node(*contact) for contact in contacts])

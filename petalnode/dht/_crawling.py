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

from collections.abc import Callable
from typing import Any

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node

from petalnode.dht._record import Record
from petalnode.errors import InvalidRecordError


class RecordSpiderCrawl(SpiderCrawl):
    """Crawl toward `node` (the key), merging verified records from every responder."""

    def __init__(
        self, protocol: Any, node: Node, peers: list[Node], ksize: int, alpha: int, *, verify: Callable[[Record], None]
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self._verify = verify
        self.found: dict[bytes, Record] = {}
        self.rejected = 0

    async def find(self) -> dict[bytes, Record]:
        return await self._find(self.protocol.call_find_value)

    def merge(self, records: list[Record]) -> None:
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

    async def _nodes_found(self, responses: dict[bytes, tuple[bool, Any]]) -> dict[bytes, Record]:
        toremove = []
        for peer_id, (ok, body) in responses.items():
            if not ok:
                toremove.append(peer_id)
                continue
            records, contacts = body
            self.merge(records)
            self.nearest.push([Node(*contact) for contact in contacts])
        self.nearest.remove(toremove)
        if self.nearest.have_contacted_all():
            return self.found
        return await self.find()

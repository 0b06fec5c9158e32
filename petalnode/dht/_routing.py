# The routing table returns decisions instead of scheduling pings itself.
#
# kademlia's RoutingTable.add_contact fires `ensure_future(call_ping(head))` on *every* message that lands in a
# full bucket: a request storm, and a task nobody owns. Here a full bucket yields "check this head" at most once
# per HEAD_CHECK_INTERVAL_S per head; the protocol owns the ping, and on failure evicts the head, which promotes
# the most recent replacement (KBucket.remove_node) - the paper's section 4.1 replacement cache.
from __future__ import annotations

from collections.abc import Callable

from kademlia.node import Node
from kademlia.routing import RoutingTable

# Long enough that a flood of newcomers costs one ping per head, short enough to notice a dead head quickly.
HEAD_CHECK_INTERVAL_S = 30.0
_MAX_TRACKED_HEADS = 4096


class DecidingRoutingTable(RoutingTable):
    """A `kademlia` routing table whose `add_contact` returns a head to ping instead of pinging it."""

    def __init__(self, protocol: object, ksize: int, node: Node, *, clock: Callable[[], float]) -> None:
        super().__init__(protocol, ksize, node)
        self._clock = clock
        self._head_checked_at: dict[bytes, float] = {}

    def add_contact(self, node: Node) -> Node | None:  # type: ignore[override]
        """Add or refresh `node` (moving it to the bucket's tail).

        Returns:
            A bucket head the caller should ping (and evict if it stays silent), or None.
        """
        if node.id == self.node.id:
            return None
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return None
        # Section 4.2: split a full bucket if it covers our own id or its depth is not 0 mod 5.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            return self.add_contact(node)
        head = bucket.head()
        now = self._clock()
        if now - self._head_checked_at.get(head.id, float("-inf")) < HEAD_CHECK_INTERVAL_S:
            return None
        if len(self._head_checked_at) >= _MAX_TRACKED_HEADS:
            self._head_checked_at.clear()
        self._head_checked_at[head.id] = now
        return head

    def contacts(self) -> list[Node]:
        return [n for bucket in self.buckets for n in bucket.get_nodes()]

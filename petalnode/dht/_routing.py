# The routing table returns decisions instead of scheduling pings itself.
#
# kademlia's RoutingTable.add_contact fires `ensure_future(call_ping(head))` on *every* message that lands in a
# full bucket: a request storm, and a task nobody owns. Here a full bucket yields "check this head" at most once
# per HEAD_CHECK_INTERVAL_S per head; the protocol owns the ping, and on failure evicts the head, which promotes
# the most recent replacement (KBucket.remove_node) - the paper's section 4.1 replacement cache.
#
# Time comes only from the injected clock (the node passes its event loop's): kademlia's KBucket stamps
# `last_updated` with `time.monotonic()` and `lonely_buckets()` compares against it, so under a virtual-time loop no
# bucket would ever look idle. Here buckets are stamped, and judged lonely, by the same clock.
from __future__ import annotations

from collections.abc import Callable
from itertools import chain

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

# Long enough that a flood of newcomers costs one ping per head, short enough to notice a dead head quickly.
HEAD_CHECK_INTERVAL_S = 30.0
_MAX_TRACKED_HEADS = 4096
# Kademlia paper section 2.3: a bucket with no lookup in its range for an hour is refreshed.
LONELY_AFTER_S = 3600.0


class ClockedKBucket(KBucket):
    """A `kademlia` KBucket whose `last_updated` comes from an injected clock (and whose halves do too)."""

    def __init__(self, range_lower: int, range_upper: int, ksize: int, *, clock: Callable[[], float]) -> None:
        self._clock = clock  # before super().__init__, which stamps the bucket
        super().__init__(range_lower, range_upper, ksize)

    def touch_last_updated(self) -> None:
        self.last_updated = self._clock()

    def split(self) -> tuple[ClockedKBucket, ClockedKBucket]:
        # As KBucket.split, which builds plain KBuckets (on time.monotonic).
        midpoint = (self.range[0] + self.range[1]) // 2
        one = ClockedKBucket(self.range[0], midpoint, self.ksize, clock=self._clock)
        two = ClockedKBucket(midpoint + 1, self.range[1], self.ksize, clock=self._clock)
        for node in chain(self.nodes.values(), self.replacement_nodes.values()):
            (one if node.long_id <= midpoint else two).add_node(node)
        return one, two


class DecidingRoutingTable(RoutingTable):
    """A `kademlia` routing table on an injected clock whose `add_contact` returns a head to ping."""

    def __init__(self, protocol: object, ksize: int, node: Node, *, clock: Callable[[], float]) -> None:
        self._clock = clock  # before super().__init__, which builds the first bucket
        super().__init__(protocol, ksize, node)
        self._head_checked_at: dict[bytes, float] = {}

    def flush(self) -> None:
        self.buckets = [ClockedKBucket(0, 2**160, self.ksize, clock=self._clock)]

    def lonely_buckets(self) -> list[KBucket]:
        """Buckets with no lookup in their range (and not split) for LONELY_AFTER_S, by our clock."""
        cutoff = self._clock() - LONELY_AFTER_S
        return [b for b in self.buckets if b.last_updated < cutoff]

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

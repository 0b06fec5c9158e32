# The compute executor's queue: strict priority between classes, round-robin between peers inside a class.
#
# Invariants:
# - `pop` returns an item of the lowest priority number that has any (inference steps before bulk work).
# - Inside one priority, peers take turns: a peer with k queued items waits behind at most one item of each other
#   peer per turn, so one peer queueing many jobs delays another peer's job by at most one job per peer
#   (Petals' task pool is priority-then-arrival, where a flood of steps queues ahead of everyone; this is the
#   deficit-free variant of round-robin fair queueing, fine here because jobs of one class cost about the same).
# - Items of one peer and priority come out in arrival order. All items under the key None share one FIFO turn
#   (how the server queues when fair shares are off: plain priority-then-arrival order).
# - Pure data structure: no threads, no clock (the executor holds the lock).

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items keyed by (priority, peer); `pop` serves priorities in order and peers in turn."""

    def __init__(self) -> None:
        # priority -> peers in turn order (the first is served next) -> that peer's items in arrival order
        self._classes: dict[int, OrderedDict[Hashable, deque[T]]] = {}
        self._per_peer: dict[Hashable, int] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def queued(self, peer: Hashable) -> int:
        """How many items `peer` has waiting, over all priorities."""
        return self._per_peer.get(peer, 0)

    def push(self, priority: int, peer: Hashable, item: T) -> None:
        peers = self._classes.setdefault(priority, OrderedDict())
        peers.setdefault(peer, deque()).append(item)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._size += 1

    def pop(self) -> T:
        """The next item to run.

        Raises:
            IndexError: the queue is empty.
        """
        if not self._size:
            raise IndexError("pop from an empty FairQueue")
        priority = min(self._classes)  # classes are deleted when they empty, so this one has items
        peers = self._classes[priority]
        peer, items = next(iter(peers.items()))
        item = items.popleft()
        if items:
            peers.move_to_end(peer)  # its turn is over: everyone else waiting in this class goes first
        else:
            del peers[peer]
            if not peers:
                del self._classes[priority]
        left = self._per_peer[peer] - 1
        if left:
            self._per_peer[peer] = left
        else:
            del self._per_peer[peer]
        self._size -= 1
        return item

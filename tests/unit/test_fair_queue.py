"""FairQueue (node/_fair_queue.py) and the executor over it: priorities first, then peers in turn."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode.errors import BusyError
from petalnode.node._executor import PRIORITY_BULK, PRIORITY_INFERENCE, ComputeExecutor
from petalnode.node._fair_queue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    return [queue.pop() for _ in range(len(queue))]


def test_a_flooding_peer_waits_its_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.push(0, "flood", f"f{i}")
    queue.push(0, "honest", "h0")
    queue.push(0, "honest", "h1")
    assert drain(queue) == ["f0", "h0", "f1", "h1", "f2", "f3", "f4"]


def test_priorities_come_first_and_none_is_one_fifo() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push(10, "a", "bulk-a")
    queue.push(0, None, "n0")
    queue.push(0, None, "n1")
    queue.push(0, "b", "b0")
    queue.push(0, None, "n2")
    assert queue.queued(None) == 3 and queue.queued("a") == 1
    assert drain(queue) == ["n0", "b0", "n1", "n2", "bulk-a"]
    assert queue.queued(None) == 0
    with pytest.raises(IndexError):
        queue.pop()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from("abcd")), max_size=60))
def test_order_within_a_peer_is_kept_and_no_peer_waits_behind_two_of_another(pushes: list) -> None:
    queue: FairQueue[tuple[int, str, int]] = FairQueue()
    for n, (priority, peer) in enumerate(pushes):
        queue.push(priority, peer, (priority, peer, n))
    out = [queue.pop() for _ in range(len(pushes))]
    assert sorted(out) == sorted((p, peer, n) for n, (p, peer) in enumerate(pushes))
    assert [p for p, _, _ in out] == sorted(p for p, _, _ in out)  # priorities in order
    for priority in {p for p, _, _ in out}:
        run = [(peer, n) for p, peer, n in out if p == priority]
        for peer in {peer for peer, _ in run}:
            mine = [i for i, (q, _) in enumerate(run) if q == peer]
            assert [run[i][1] for i in mine] == sorted(run[i][1] for i in mine)  # arrival order per peer
            # Between a peer's first item and its next, every other peer got at most one turn.
            for before, after in itertools.pairwise(mine):
                between = [q for q, _ in run[before + 1 : after]]
                assert all(between.count(q) <= 1 for q in set(between))


def test_the_executor_serves_peers_in_turn_and_caps_each_peer() -> None:
    async def scenario() -> tuple[list[str], str]:
        executor = ComputeExecutor(max_queued=16, max_queued_per_peer=4)
        gate = threading.Event()
        order: list[str] = []
        try:
            blocker = asyncio.ensure_future(executor.run(gate.wait, priority=PRIORITY_INFERENCE, peer="x"))
            await asyncio.sleep(0.05)  # the worker is now blocked inside the first job
            jobs = [
                asyncio.ensure_future(executor.run(lambda i=i: order.append(f"f{i}"), peer="flood")) for i in range(4)
            ]
            await asyncio.sleep(0)
            with pytest.raises(BusyError, match="peer flood already has 4 compute jobs queued"):
                await executor.run(lambda: None, peer="flood")
            jobs.append(
                asyncio.ensure_future(executor.run(lambda: order.append("bulk"), priority=PRIORITY_BULK, peer="honest"))
            )
            jobs.append(asyncio.ensure_future(executor.run(lambda: order.append("h0"), peer="honest")))
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(blocker, *jobs)
            return order, "ok"
        finally:
            executor.close()
            executor.join(5)

    order, _ = asyncio.run(scenario())
    assert order == ["f0", "h0", "f1", "f2", "f3", "bulk"]

"""The virtual-time loop: long sleeps and timeouts take virtual, not real, time; deadlocks raise."""

from __future__ import annotations

import asyncio
import time

import pytest

from simulations._virtual_loop import VirtualDeadlockError, VirtualTimeLoop, run

pytestmark = pytest.mark.timeout(30)


def test_an_hour_of_sleep_takes_milliseconds() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(3600)
        return before, loop.time()

    started = time.perf_counter()
    before, after = run(main())
    assert after - before == pytest.approx(3600, abs=1e-6)
    assert time.perf_counter() - started < 1.0


def test_timeouts_fire_in_virtual_time() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        fired = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(90):
                await asyncio.sleep(1000)
        fired.append(loop.time())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), timeout=10)
        fired.append(loop.time())
        return fired

    started = time.perf_counter()
    assert run(main()) == [pytest.approx(90), pytest.approx(100)]
    assert time.perf_counter() - started < 1.0


def test_timers_keep_their_order_and_wall_clock_follows() -> None:
    async def main() -> tuple[list[int], float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        order: list[int] = []
        for i, delay in enumerate([5.0, 0.001, 300.0, 0.5, 5.5]):
            loop.call_later(delay, order.append, i)
        start_wall = loop.wall_clock()
        await asyncio.sleep(301)
        return order, start_wall, loop.wall_clock()

    order, start_wall, end_wall = run(main())
    assert order == [1, 3, 0, 4, 2]
    assert start_wall == pytest.approx(1.7e9)
    assert end_wall - start_wall == pytest.approx(301)


def test_a_deadlock_raises_instead_of_hanging() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(VirtualDeadlockError):
        run(main())


def test_dht_buckets_age_and_get_refreshed_in_virtual_time() -> None:
    # The routing table reads the loop's clock (not time.monotonic), so an idle hour passes in virtual time and
    # the node's own maintenance refreshes its lonely buckets, with no patching of kademlia.
    from petalnode.dht import DHTNode
    from petalnode.dht._node import BUCKET_REFRESH_INTERVAL_S
    from petalnode.dht._routing import LONELY_AFTER_S
    from petalnode.identity import Identity
    from petalnode.transport import MemoryNetwork

    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        network = MemoryNetwork()
        nodes = [DHTNode(Identity.from_seed(b"vt-%d" % i), endpoint_factory=network.create_datagram_endpoint,
                         wall_clock=loop.wall_clock) for i in range(6)]
        await nodes[0].start(listen=("n0", 1))
        for i, node in enumerate(nodes[1:], 1):
            await node.start(listen=(f"n{i}", 1), bootstrap=[("n0", 1)])
        await asyncio.sleep(LONELY_AFTER_S + BUCKET_REFRESH_INTERVAL_S + 60)
        stamps = [b.last_updated for b in nodes[3].protocol.router.buckets]
        for node in nodes:
            await node.aclose()
        return stamps, loop.time()

    stamps, now = run(main())
    assert all(0 <= s <= now for s in stamps), stamps  # stamped by the virtual clock
    assert all(s >= LONELY_AFTER_S for s in stamps), stamps  # every bucket was refreshed after it grew lonely


def test_a_thread_can_still_wake_the_loop() -> None:
    async def main() -> int:
        ticker = asyncio.get_running_loop().create_task(asyncio.sleep(10_000))  # a pending timer, never due
        try:
            return await asyncio.to_thread(lambda: (time.sleep(0.05), 42)[1])  # wakes the loop through its self-pipe
        finally:
            ticker.cancel()

    started = time.perf_counter()
    assert run(main()) == 42
    assert time.perf_counter() - started < 1.0

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

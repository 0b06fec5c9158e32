"""TokenBucket (node/_token_bucket.py): the relay's bandwidth cap and dial-back rate, the per-peer request rate."""

from __future__ import annotations

import asyncio

import pytest

from petalnode.node._token_bucket import TokenBucket
from simulations._virtual_loop import run


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_burst_passes_at_once_then_debt_is_paid_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=200.0, clock=clock)
    assert bucket.reserve(200.0) == 0.0
    assert bucket.reserve(50.0) == pytest.approx(0.5)  # 50 units of debt at 100/s
    assert bucket.reserve(50.0) == pytest.approx(1.0)  # debt accumulates across callers


def test_tokens_refill_with_the_clock_but_never_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=20.0, clock=clock)
    assert bucket.reserve(20.0) == 0.0
    clock.now += 1.0  # 10 units back
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(1.0) == pytest.approx(0.1)
    clock.now += 3600.0  # a quiet hour refills only up to the burst
    assert bucket.reserve(20.0) == 0.0
    assert bucket.reserve(10.0) == pytest.approx(1.0)


def test_the_clock_does_not_move_backwards_into_extra_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=10.0, clock=clock)
    bucket.reserve(10.0)
    # No time passed: no refill, so the next unit costs exactly 1 / rate.
    assert bucket.reserve(1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_a_bucket_needs_a_positive_rate_and_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenBucket(rate=rate, burst=burst)


def test_take_waits_the_reserved_time_on_the_loop_clock() -> None:
    # No clock given: the running loop's time, here a virtual-time loop, so the waits are exact and instant.
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(rate=200_000, burst=200_000)
        started = loop.time()
        await bucket.take(200_000)  # the burst passes at once
        after_burst = loop.time() - started
        await bucket.take(100_000)  # then 0.5 s per 100 kB
        return [after_burst, loop.time() - started]

    after_burst, total = run(scenario())
    assert after_burst == 0.0
    assert total == pytest.approx(0.5)


def test_try_take_takes_all_or_nothing_and_never_runs_into_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.try_take(1.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.try_take(1.0)  # refusals cost nothing, so they do not push the next success further out
    clock.now += 0.5  # one unit back
    assert bucket.try_take(1.0)
    assert not bucket.try_take(1.0)
    assert not bucket.full
    clock.now += 10.0
    assert bucket.full


def test_a_clock_running_backwards_refills_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=10.0, clock=clock)
    assert bucket.try_take(10.0)
    clock.now -= 5.0
    assert not bucket.try_take(1.0)
    clock.now += 5.0  # back where it was: still nothing has been earned
    assert not bucket.try_take(1.0)

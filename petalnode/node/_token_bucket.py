# A token bucket on an injected clock, shared by the relay (bandwidth cap, dial-back rate) and the block server's
# per-peer request rate (node/_fair_share.py).
#
# Invariants:
# - Tokens never exceed `burst`; they refill at `rate` per second of the clock, never for time running backwards.
# - `reserve` may run the bucket into debt (the caller then waits it off); `try_take` never does: it takes all
#   of `amount` or nothing, so a refused caller costs the bucket nothing.

from __future__ import annotations

import asyncio
from collections.abc import Callable


class TokenBucket:
    """At most `rate` units per second on average, with bursts of up to `burst` units.

    Args:
        rate: units refilled per second.
        burst: the most units that can be taken at once after a quiet period (the bucket starts full).
        clock: a monotonic clock in seconds; None means the running loop's `time()` (so a virtual-time loop
            controls it). `reserve` and `try_take` are pure given the clock, which is what the unit tests drive.
    """

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] | None = None) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at: float | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _refill(self) -> None:
        now = self._now()
        if self._at is not None and now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    @property
    def full(self) -> bool:
        """True once the bucket has refilled to its burst (an idle peer's bucket can be forgotten)."""
        self._refill()
        return self._tokens >= self.burst

    def reserve(self, amount: float) -> float:
        """Take `amount` units now and return how many seconds the caller must wait before using them."""
        self._refill()
        self._tokens -= amount  # may go negative: the debt is paid by waiting
        return max(0.0, -self._tokens / self.rate)

    def try_take(self, amount: float) -> bool:
        """Take `amount` units if the bucket holds them now (True); otherwise take nothing (False)."""
        self._refill()
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True

    async def take(self, amount: float) -> None:
        """Take `amount` units, sleeping off any debt."""
        delay_s = self.reserve(amount)
        if delay_s > 0:
            await asyncio.sleep(delay_s)

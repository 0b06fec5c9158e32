# A virtual-time asyncio event loop: simulated hours run as fast as the callbacks do.
#
# Invariants:
# - `loop.time()` is virtual. It only moves forward, and only when no callback is ready: the selector is asked
#   to wait `timeout` seconds for the next timer, and instead of sleeping it advances the clock by exactly that
#   and reports no I/O. Everything built on `call_at` / `call_later` (asyncio.sleep, asyncio.timeout, wait_for)
#   therefore fires in virtual time, in the same order it would in real time.
# - Real file descriptors are still polled (without blocking) whenever the loop would wait, so the loop's
#   self-pipe keeps working; the simulator itself does no real I/O (the memory network only uses loop timers).
# - A loop with nothing ready and no timer would sleep forever in real time: here, after a short real wait for
#   a thread to call back (executor jobs), that is a deadlock and raises `VirtualDeadlockError` instead of
#   hanging the process. Virtual time does not wait for threads while timers are pending.
# - `wall_clock()` is the virtual time plus a fixed epoch, for code that needs absolute time (DHT record expiry).
from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# A fixed absolute start (2023-11-14): runs are reproducible and records carry plausible timestamps.
DEFAULT_EPOCH_S = 1.7e9
# How long (real seconds) a loop with no timers waits for a thread to call back before declaring a deadlock.
_THREAD_GRACE_S = 2.0


class VirtualDeadlockError(RuntimeError):
    """Nothing can ever run again: no ready callback, no timer, no I/O source."""


class _VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        # Never stand still on a positive wait: float rounding near a timer must not spin the loop forever.
        self.now = target if target > self.now else math.nextafter(self.now, math.inf)


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls real descriptors without blocking; a wait for a timer becomes a jump of the virtual clock."""

    def __init__(self, clock: _VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout == 0:
            # Callbacks are ready: run them first. Descriptors (only the self-pipe, woken by threads) are polled
            # whenever the loop would wait, which in a busy simulation is every few iterations; polling on each
            # of the hundreds of thousands of iterations cost ~3% of a run.
            return []
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            # Only a thread (an executor job finishing) can still wake the loop: give it real time, then give up.
            events = super().select(_THREAD_GRACE_S)
            if events:
                return events
            raise VirtualDeadlockError("virtual-time loop: nothing is scheduled and nothing can wake it (deadlock)")
        self._clock.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual (see the module header). Use `run(coro)` or `asyncio.Runner`."""

    def __init__(self, epoch_s: float = DEFAULT_EPOCH_S) -> None:
        self._virtual = _VirtualClock()
        self.epoch_s = epoch_s
        super().__init__(selector=_VirtualSelector(self._virtual))
        # Timers due within this margin run together; the virtual clock has no jitter to absorb.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now

    def wall_clock(self) -> float:
        """Absolute virtual time in seconds since the Unix epoch."""
        return self.epoch_s + self._virtual.now


def run(coro: Coroutine[Any, Any, T], *, epoch_s: float = DEFAULT_EPOCH_S) -> T:
    """Run `coro` to completion in a fresh virtual-time loop (like `asyncio.run`)."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(epoch_s)) as runner:
        return runner.run(coro)

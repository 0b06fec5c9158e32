"""Runs torch work off the event loop, one job at a time, inference steps before bulk work.

One worker thread owns the compute (torch parallelises inside each op with its own threads), so a long prefill
never blocks the loop that answers DHT pings and heartbeats. Jobs wait in a priority queue: interactive
inference steps (priority 0) overtake queued bulk forward/backward passes (priority 10); equal priorities run
in arrival order.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from petalnode.errors import BusyError, ClosedResourceError

T = TypeVar("T")

PRIORITY_INFERENCE = 0
PRIORITY_BULK = 10
# Queued jobs beyond this make new work fail fast with "busy" so clients try another server.
DEFAULT_MAX_QUEUED = 64


class ComputeExecutor:
    def __init__(self, *, max_queued: int = DEFAULT_MAX_QUEUED, name: str = "petalnode-compute") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._max_queued = max_queued
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def run(self, fn: Callable[[], T], *, priority: int = PRIORITY_INFERENCE) -> T:
        """Run `fn()` on the compute thread and await its result (exceptions propagate)."""
        if self._closed:
            raise ClosedResourceError("compute executor is closed")
        if self._queue.qsize() >= self._max_queued:
            raise BusyError(f"server compute queue is full ({self._max_queued} jobs); try another server")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            if future.cancelled():
                return
            try:
                result = fn()
            except BaseException as e:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._queue.put((priority, next(self._order), job))
        return await future

    def _work(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            job()

    def close(self) -> None:
        """Stop after the queued jobs (idempotent)."""
        if not self._closed:
            self._closed = True
            self._queue.put((1 << 30, next(self._order), None))

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

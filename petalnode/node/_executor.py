"""Runs torch work off the event loop, one job at a time, inference steps before bulk work, peers in turn.

One worker thread owns the compute (torch parallelises inside each op with its own threads), so a long prefill
never blocks the loop that answers DHT pings and heartbeats. Jobs wait in a `FairQueue`: interactive inference
steps (priority 0) overtake queued bulk forward/backward passes (priority 10); inside one priority the peers
that queued jobs take turns (jobs given no peer share one arrival-order turn), so a peer flooding the server
with steps delays another peer's step by about one job, not by its whole backlog.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from petalnode.errors import BusyError, ClosedResourceError
from petalnode.node._fair_queue import FairQueue

T = TypeVar("T")

PRIORITY_INFERENCE = 0
PRIORITY_BULK = 10
# Queued jobs beyond this make new work fail fast with "busy" so clients try another server.
DEFAULT_MAX_QUEUED = 64
# One peer may fill at most half of the queue, so a single flooding peer never makes the queue full for others.
DEFAULT_MAX_QUEUED_PER_PEER = DEFAULT_MAX_QUEUED // 2


class ComputeExecutor:
    def __init__(
        self,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_queued_per_peer: int = DEFAULT_MAX_QUEUED_PER_PEER,
        name: str = "petalnode-compute",
    ) -> None:
        self._queue: FairQueue[Callable[[], None]] = FairQueue()
        self._ready = threading.Condition()
        self._max_queued = max_queued
        self._max_queued_per_peer = max_queued_per_peer
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self, fn: Callable[[], T], *, priority: int = PRIORITY_INFERENCE, peer: Hashable | None = None) -> T:
        """Run `fn()` on the compute thread and await its result (exceptions propagate).

        Args:
            peer: who the job is for (jobs of different peers take turns); None: no fair queueing for it.

        Raises:
            BusyError: the queue is full, or `peer` already has its share of it queued.
            ClosedResourceError: the executor is closed.
        """
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

        with self._ready:
            if self._closed:
                raise ClosedResourceError("compute executor is closed")
            if len(self._queue) >= self._max_queued:
                raise BusyError(f"server compute queue is full ({self._max_queued} jobs); try another server")
            if peer is not None and self._queue.queued(peer) >= self._max_queued_per_peer:
                raise BusyError(
                    f"peer {peer} already has {self._max_queued_per_peer} compute jobs queued here "
                    "(the most one peer may); try another server"
                )
            self._queue.push(priority, peer, job)
            self._ready.notify()
        return await future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:  # closed and drained
                    return
                job = self._queue.pop()
            job()

    def close(self) -> None:
        """Stop after the queued jobs (idempotent)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

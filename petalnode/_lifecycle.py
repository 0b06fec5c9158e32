"""Owned background tasks, ordered cleanup and logged state changes: the lifecycle helpers every component uses.

Invariants:
- Every background task belongs to one `TaskOwner`; `TaskOwner.aclose()` cancels and awaits all of them, also when
  the caller of `aclose()` is itself cancelled (the tasks are still awaited, then the `CancelledError` is re-raised).
  A task that crashes is logged once, with its name; nothing is swallowed silently.
- `CleanupStack` closes what was registered in reverse order of registration (start order in, reverse out): every
  callback runs even if an earlier one raised or the caller was cancelled. The caller's `CancelledError` wins;
  otherwise the first cleanup error is raised (later ones are logged), unless `raise_errors=False`, where all are
  logged (used when an original error is already propagating and must not be hidden).
- `set_state` is the one place a component's state changes; it logs "old -> new".
Torch-free and socket-free: imported by the bootstrap (tests/cli/test_cli_bootstrap_imports.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

S = TypeVar("S", bound=enum.Enum)
T = TypeVar("T")


def set_state(logger: logging.Logger, what: str, old: S, new: S) -> S:
    """Log one state change ("old -> new") and return the new state; the caller stores it in its `_state`."""
    if old is not new:
        logger.debug("%s: %s -> %s", what, old.value, new.value)
    return new


async def wait_uncancellable(tasks: set[asyncio.Task[Any]] | list[asyncio.Task[Any]]) -> bool:
    """Await `tasks` to the end even if the caller is cancelled meanwhile; returns whether it was cancelled.

    A cancellation of the caller does not stop the wait (resources must still be released), and it is reported
    so that the caller re-raises it: never swallow a `CancelledError`.
    """
    cancelled = False
    pending = {t for t in tasks if not t.done()}
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


class TaskOwner:
    """Holds every background task of one component (a TaskGroup-like owner that does not fail the group).

    `spawn()` keeps a handle and logs a task that crashes; `aclose()` cancels and awaits every task. After
    `aclose()`, `spawn()` raises `RuntimeError` (a closed component must not start new work).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run `coro` as a task owned here. Raises RuntimeError once the owner is closed."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name}: cannot spawn a task after aclose()")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}: {name}" if name else None)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Own a task created elsewhere (e.g. by asyncio.start_server); after aclose() it is cancelled at once."""
        if self._closed:
            task.cancel()
            return
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("background task %r crashed", task.get_name(), exc_info=error)

    async def aclose(self) -> None:
        """Cancel and await every owned task. Idempotent; re-raises a cancellation of the caller at the end."""
        self._closed = True
        cancelled = False
        current = asyncio.current_task()
        # A task may spawn another while it is being cancelled: loop until none is left. An owned task that
        # closes its own owner is not awaited by itself (it would wait forever); it ends when it returns.
        # Done tasks may still be in the set until their done callback runs: skip them, or this would spin.
        while tasks := [t for t in self._tasks if t is not current and not t.done()]:
            for task in tasks:
                task.cancel()
            cancelled |= await wait_uncancellable(tasks)
        if cancelled:
            raise asyncio.CancelledError


class CleanupStack:
    """Close callbacks registered in start order, run in reverse order; each runs whatever the others did.

    Built on `contextlib.AsyncExitStack` (the stack itself never sees an exception: every callback is wrapped).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._stack = contextlib.AsyncExitStack()
        self._errors: list[tuple[str, BaseException]] = []

    def push(self, name: str, close: Callable[[], Awaitable[object] | object]) -> None:
        """Register `close` (sync or async) to run at `aclose()`, before everything registered earlier."""

        async def run() -> None:
            try:
                result = close()
                if isinstance(result, Awaitable):
                    await result
            except BaseException as e:  # recorded; re-raised in aclose (CancelledError first)
                self._errors.append((name, e))

        self._stack.push_async_callback(run)

    async def aclose(self, *, raise_errors: bool = True) -> None:
        """Run every callback (reverse order). Raises the caller's CancelledError, else the first error."""
        self._errors = []
        cancelled = False
        try:
            await self._stack.aclose()
        except asyncio.CancelledError:  # cannot happen inside a wrapped callback; between them it could
            cancelled = True
        errors, self._errors = self._errors, []
        first: BaseException | None = None
        for name, error in errors:
            if isinstance(error, asyncio.CancelledError):
                cancelled = True
                continue
            # KeyboardInterrupt / SystemExit are never downgraded to a log line.
            if first is None and (raise_errors or not isinstance(error, Exception)):
                first = error
                continue
            log.error("%s: closing %s failed", self.owner, name, exc_info=error)
        if cancelled:
            if first is not None:
                log.error("%s: closing failed", self.owner, exc_info=first)
            raise asyncio.CancelledError
        if first is not None:
            raise first

# The lifecycle every transport shares (TCP, WebRTC, in-memory): open/closed state, listeners, live connections and
# owned handler tasks, and one idempotent close. Each transport adds only how it moves bytes.
#
# Invariants:
# - After `aclose()` (or `_close_lifecycle()`), every public call raises `ClosedResourceError` (via `_check_open`).
# - `_close_lifecycle()` closes listeners, then connections, then cancels and awaits owned handler tasks; the tasks
#   are cancelled and awaited even if closing a listener or connection raised or the caller was cancelled.
# - Handler tasks belong to `self._tasks` (a `TaskOwner`); none outlives `aclose()`.

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol, Self

from petalnode._lifecycle import TaskOwner
from petalnode.errors import ClosedResourceError


class _Closable(Protocol):
    async def aclose(self) -> None: ...


class TransportLifecycle:
    """Mixin base: call `_init_lifecycle(name)` in `__init__`; `aclose()` calls `_close_lifecycle(connections)`."""

    _kind: str
    _closed: bool
    _listeners: list[Any]
    _tasks: TaskOwner

    def _init_lifecycle(self, kind: str) -> None:
        self._kind = kind
        self._closed = False
        self._listeners = []
        self._tasks = TaskOwner(kind)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()  # type: ignore[attr-defined]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f'{self._kind}: cannot use in state "closed"')

    def _own_task(self, task: asyncio.Task[Any]) -> None:
        """Own a task someone else created (asyncio.start_server's per-client callback task)."""
        self._tasks.adopt(task)

    async def _close_lifecycle(self, connections: Iterable[_Closable]) -> None:
        """Close listeners, connections (a snapshot of `connections`) and owned tasks. Idempotent."""
        self._closed = True
        try:
            listeners, self._listeners = list(self._listeners), []
            for listener in listeners:
                await listener.aclose()
            for connection in list(connections):
                await connection.aclose()
        finally:
            await self._tasks.aclose()

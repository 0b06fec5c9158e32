"""TaskOwner / CleanupStack: tasks are cancelled and awaited, cleanup runs in reverse order past failures and
cancellation, and a cancellation of the closer is never swallowed."""

from __future__ import annotations

import asyncio
import enum
import logging

import pytest

from petalnode._lifecycle import CleanupStack, TaskOwner, set_state


async def test_owner_cancels_and_awaits_every_task() -> None:
    owner = TaskOwner("t")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    tasks = [owner.spawn(forever(), name=f"f{i}") for i in range(3)]
    await started.wait()
    assert len(owner) == 3
    await owner.aclose()
    assert all(t.cancelled() for t in tasks)
    assert len(owner) == 0
    with pytest.raises(RuntimeError):
        owner.spawn(forever())
    await owner.aclose()  # idempotent


async def test_owner_logs_a_crashed_task(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("t")

    async def crash() -> None:
        raise ValueError("boom")

    task = owner.spawn(crash(), name="crasher")
    await asyncio.wait([task])
    await asyncio.sleep(0)
    assert "crasher" in caplog.text and "crashed" in caplog.text
    await owner.aclose()


async def test_cancelled_owner_close_still_awaits_tasks_and_reraises() -> None:
    owner = TaskOwner("t")
    cleaned = asyncio.Event()

    async def slow_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            # Cleanup that takes a while: the closer must wait for it even when it is cancelled itself.
            await asyncio.shield(asyncio.sleep(0.05))
            cleaned.set()

    task = owner.spawn(slow_cleanup())
    await asyncio.sleep(0)
    closer = asyncio.create_task(owner.aclose())
    await asyncio.sleep(0.01)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert cleaned.is_set() and task.done()


async def test_cleanup_stack_runs_in_reverse_past_failures() -> None:
    order: list[str] = []
    stack = CleanupStack("t")

    async def close(name: str, fail: bool = False) -> None:
        order.append(name)
        if fail:
            raise OSError(name)

    stack.push("a", lambda: close("a"))
    stack.push("b", lambda: close("b", fail=True))
    stack.push("c", lambda: close("c", fail=True))
    with pytest.raises(OSError, match="c"):  # the first failure (in closing order) is raised
        await stack.aclose()
    assert order == ["c", "b", "a"]


async def test_cleanup_stack_logs_instead_of_raising_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    stack = CleanupStack("t")

    def fail() -> None:
        raise OSError("x")

    stack.push("x", fail)
    await stack.aclose(raise_errors=False)
    assert "closing x failed" in caplog.text


async def test_cancelled_cleanup_stack_runs_the_rest_and_reraises() -> None:
    closed: list[str] = []
    stack = CleanupStack("t")
    entered = asyncio.Event()

    async def slow() -> None:
        entered.set()
        await asyncio.sleep(3600)

    stack.push("first", lambda: closed.append("first"))
    stack.push("slow", slow)
    closer = asyncio.create_task(stack.aclose())
    await entered.wait()
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert closed == ["first"]


def test_set_state_logs_old_to_new(caplog: pytest.LogCaptureFixture) -> None:
    class S(enum.Enum):
        A = "a"
        B = "b"

    logger = logging.getLogger("petalnode.test")
    with caplog.at_level(logging.DEBUG, logger="petalnode.test"):
        assert set_state(logger, "thing", S.A, S.B) is S.B
    assert "thing: a -> b" in caplog.text

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from petalnode.compute import SessionManager, load_block_span, load_model_info
from petalnode.errors import (
    BadRequestError,
    InvalidStateError,
    OutOfCacheMemoryError,
    ShapeError,
    UnknownSessionError,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def manager_factory(tiny_model_dir: Path):
    info = load_model_info(tiny_model_dir)
    span = load_block_span(info, 0, 3)
    per_token = info.kv_bytes_per_token_per_block(torch.float32) * 3

    def make(budget_tokens: int, clock=None, idle_timeout_s: float = 10.0) -> SessionManager:
        return SessionManager(
            span, cache_budget_bytes=budget_tokens * per_token, kv_bytes_per_token_per_block=per_token // 3,
            hidden_size=info.hidden_size, dtype=torch.float32, idle_timeout_s=idle_timeout_s,
            clock=clock or FakeClock(),
        )

    return make


def test_budget_is_enforced_at_open(manager_factory) -> None:
    manager = manager_factory(budget_tokens=100)
    first = manager.open(60)
    assert manager.free_tokens == 40
    with pytest.raises(OutOfCacheMemoryError, match="free"):
        manager.open(41)
    with pytest.raises(OutOfCacheMemoryError):
        manager.open(20, batch_size=3)
    second = manager.open(40)
    assert manager.free_tokens == 0
    manager.close(first.session_id)
    manager.close(first.session_id)  # idempotent
    assert manager.free_tokens == 60
    assert manager.get(second.session_id) is second


def test_step_past_max_length_is_refused(manager_factory) -> None:
    manager = manager_factory(budget_tokens=100)
    session = manager.open(8)
    session.step(torch.randn(1, 6, 64))
    with pytest.raises(BadRequestError, match="max_length"):
        session.step(torch.randn(1, 3, 64))
    assert session.position == 6
    session.step(torch.randn(1, 2, 64))
    assert session.position == 8


@pytest.mark.parametrize(
    "bad",
    [torch.randn(1, 4, 63), torch.randn(4, 64), torch.randn(2, 1, 64), torch.zeros(1, 4, 64, dtype=torch.long),
     torch.randn(1, 0, 64)],
)
def test_wrong_shapes_get_shape_error(manager_factory, bad: torch.Tensor) -> None:
    session = manager_factory(budget_tokens=100).open(16)
    with pytest.raises(ShapeError):
        session.step(bad)
    assert session.position == 0
    session.step(torch.randn(1, 2, 64))  # still serving


def test_batch_size_cannot_change_mid_session(manager_factory) -> None:
    session = manager_factory(budget_tokens=100).open(16, batch_size=2)
    session.step(torch.randn(2, 3, 64))
    with pytest.raises(ShapeError, match="batch"):
        session.step(torch.randn(1, 1, 64))


def test_rollback_beyond_cache_is_refused(manager_factory) -> None:
    session = manager_factory(budget_tokens=100).open(16)
    session.step(torch.randn(1, 4, 64))
    with pytest.raises(BadRequestError, match="position 7"):
        session.step(torch.randn(1, 1, 64), start_position=7)
    with pytest.raises(BadRequestError):
        session.rollback(-1)


def test_idle_sessions_expire_and_free_cache(manager_factory) -> None:
    clock = FakeClock()
    manager = manager_factory(budget_tokens=100, clock=clock, idle_timeout_s=10)
    idle = manager.open(50)
    busy = manager.open(50)
    clock.now = 8
    manager.get(busy.session_id)
    clock.now = 12
    assert manager.expire_idle() == [idle.session_id]
    assert manager.free_tokens == 50
    with pytest.raises(UnknownSessionError):
        manager.get(idle.session_id)
    with pytest.raises(InvalidStateError, match="closed"):
        idle.step(torch.randn(1, 1, 64))
    clock.now = 30
    assert manager.expire_idle() == [busy.session_id]
    assert len(manager) == 0

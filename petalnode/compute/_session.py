"""Inference sessions: a KV cache over a span of blocks, advanced by prefill and decode steps.

Invariants:
- A session's cache memory (batch x max_length tokens for every hosted block) is reserved against the
  manager's budget when the session opens, so a running session can never push the node out of memory;
  a session that would not fit gets `OutOfCacheMemoryError` at open time.
- `position` is the number of tokens in the cache. A step may name its `start_position`; a smaller value rolls
  the cache back first (client-side rollback and failover replays rely on this); a larger one is an error.
- The manager holds no I/O and no clock of its own: time is injected, and idle expiry is a method the owner
  calls, so the same code runs in servers, tests and the simulator.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from petalnode.errors import (
    BadRequestError,
    InvalidStateError,
    OutOfCacheMemoryError,
    ShapeError,
    UnknownSessionError,
)

DEFAULT_IDLE_TIMEOUT_S = 300.0


@dataclass(eq=False)
class InferenceSession:
    """One client's KV cache over the hosted span."""

    session_id: str
    span: torch.nn.Module
    max_length: int
    batch_size: int
    reserved_bytes: int
    hidden_size: int
    dtype: torch.dtype
    last_used: float
    position: int = 0
    closed: bool = False
    cache: object = field(default=None, repr=False)
    # Deep prompt tuning: [num_blocks, batch or 1, prefix, hidden], added to each block's input at positions < prefix.
    prompts: torch.Tensor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.cache = self.span.new_cache()

    def step(self, hidden_states: torch.Tensor, *, start_position: int | None = None) -> torch.Tensor:
        """Run `hidden_states` [batch, n, hidden] through the span at positions [start, start + n).

        Raises:
            ShapeError: wrong rank, batch or hidden size, or a non-floating tensor.
            BadRequestError: the step would pass max_length or starts beyond the cache.
            InvalidStateError: the session is closed.
        """
        with self._lock:
            if self.closed:
                raise InvalidStateError(f'cannot step session {self.session_id} in state "closed"')
            self._check_shape(hidden_states)
            if start_position is not None and start_position != self.position:
                self._rollback_locked(start_position)
            length = hidden_states.shape[1]
            if self.position + length > self.max_length:
                raise BadRequestError(
                    f"session {self.session_id}: {self.position} + {length} tokens exceeds max_length "
                    f"{self.max_length}"
                )
            position_ids = torch.arange(self.position, self.position + length, device=hidden_states.device)[None]
            with torch.inference_mode():
                out = self.span.forward_span(hidden_states.to(self.dtype), self.cache, position_ids, self.prompts)
            self.position += length
            return out

    def rollback(self, position: int) -> None:
        """Forget every token at or after `position` (a later step continues from there)."""
        with self._lock:
            self._rollback_locked(position)

    def _rollback_locked(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise BadRequestError(
                f"session {self.session_id}: cannot start at position {position}; the cache holds "
                f"{self.position} tokens"
            )
        if position < self.position:
            self.cache.crop(position - self.position)
            self.position = position

    def _check_shape(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.ndim != 3 or not hidden_states.is_floating_point():
            raise ShapeError(
                f"hidden states must be a float tensor [batch, seq, {self.hidden_size}], got "
                f"{tuple(hidden_states.shape)} {hidden_states.dtype}"
            )
        batch, length, hidden = hidden_states.shape
        if hidden != self.hidden_size or length < 1 or not 1 <= batch <= self.batch_size:
            raise ShapeError(
                f"hidden states must be [1..{self.batch_size}, >=1, {self.hidden_size}], got "
                f"{tuple(hidden_states.shape)}"
            )
        if self.position > 0 and batch != self._cache_batch():
            raise ShapeError(f"batch size changed mid-session: cache has {self._cache_batch()}, step has {batch}")

    def _cache_batch(self) -> int:
        layer = self.cache.layers[0]
        return int(layer.keys.shape[0]) if getattr(layer, "keys", None) is not None else 0

    def _close(self) -> None:
        with self._lock:
            self.closed = True
            self.cache = None


class SessionManager:
    """Opens, finds, expires and closes sessions within a KV-cache budget."""

    def __init__(
        self,
        span: torch.nn.Module,
        *,
        cache_budget_bytes: int,
        kv_bytes_per_token_per_block: int,
        hidden_size: int,
        dtype: torch.dtype,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`span` is the hosted span; sessions may run a sub-span of it (`open(..., span=...)`)."""
        self.span = span
        self.cache_budget_bytes = cache_budget_bytes
        self.kv_bytes_per_token_per_block = kv_bytes_per_token_per_block
        self.kv_bytes_per_token = kv_bytes_per_token_per_block * _num_blocks(span)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, InferenceSession] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self._sessions.values())

    @property
    def free_tokens(self) -> int:
        """Cache tokens (at batch 1) still available to new sessions."""
        return max(0, (self.cache_budget_bytes - self.used_bytes) // self.kv_bytes_per_token)

    def __len__(self) -> int:
        return len(self._sessions)

    def open(
        self, max_length: int, *, batch_size: int = 1, session_id: str | None = None,
        span: torch.nn.Module | None = None, prompts: torch.Tensor | None = None,
    ) -> InferenceSession:
        """Reserve cache for `batch_size` x `max_length` tokens over `span` (default: the whole hosted span).

        Raises:
            OutOfCacheMemoryError: the reservation does not fit in what is left of the budget.
            BadRequestError: nonsensical sizes or a duplicate id.
        """
        if max_length < 1 or batch_size < 1:
            raise BadRequestError(f"max_length and batch_size must be positive, got {max_length}, {batch_size}")
        span = span if span is not None else self.span
        need = max_length * batch_size * self.kv_bytes_per_token_per_block * _num_blocks(span)
        with self._lock:
            free = self.cache_budget_bytes - self.used_bytes
            if need > free:
                raise OutOfCacheMemoryError(
                    f"a session of {batch_size} x {max_length} tokens needs {need} bytes of KV cache but only "
                    f"{free} of {self.cache_budget_bytes} are free; retry later or use another server"
                )
            session_id = session_id or f"s{next(self._ids)}"
            if session_id in self._sessions:
                raise BadRequestError(f"session id {session_id!r} is already open")
            session = InferenceSession(
                session_id=session_id, span=span, max_length=max_length, batch_size=batch_size,
                reserved_bytes=need, hidden_size=self.hidden_size, dtype=self.dtype, last_used=self._clock(),
                prompts=None if prompts is None else prompts.to(self.dtype),
            )
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> InferenceSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(f"no open session {session_id!r} (closed, expired or never opened)")
        session.last_used = self._clock()
        return session

    def close(self, session_id: str) -> None:
        """Free the session's cache; closing an unknown or closed session is a no-op (idempotent)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session._close()

    def expire_idle(self) -> list[str]:
        """Close every session idle for longer than the idle timeout; returns their ids."""
        now = self._clock()
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
        for session_id in stale:
            self.close(session_id)
        return stale

    def close_all(self) -> None:
        for session_id in list(self._sessions):
            self.close(session_id)


def _num_blocks(span: torch.nn.Module) -> int:
    return int(span.end - span.start)

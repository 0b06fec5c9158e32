# Spot-checking servers' outputs: the rules, as plain functions over plain data (the driver is `_verifier.py`).
#
# A client cannot know whether a stranger's server computed its blocks honestly, but it keeps every hop's inputs
# (for failover replay), and every hop's output is the next hop's input. So it can re-run a hop's positions on an
# independent server for the same blocks (a "shadow" session, which to that server is an ordinary session: a
# prefill, then multi-token steps) and compare. On a disagreement a third server decides; the one in the minority
# is banned and the session rolls back to the first position where the outputs disagreed.
#
# Invariants:
# - Outputs agree when, at every position, ||a - b|| / max(||b||, tiny) <= the tolerance of the pair of dtypes the
#   two servers computed in (`tolerance`); measured by `benchmarks/verify_tolerance.py`, with a margin.
# - `first_mismatch` is the first position that disagrees (None: all agree); positions before it are verified.
# - `majority` decides only when exactly one side of the disagreement is confirmed by the third opinion; when the
#   third agrees with neither (or with both) nobody is banned and the caller reports it.
# - `CheckSchedule` is the only source of randomness (seeded): in SAMPLE mode the gap between checks is drawn
#   uniformly from [1, 2 * mean_gap - 1], so a server cannot tell which steps will be checked; FULL checks every
#   step before its output is returned; every mode but OFF also checks at the end of a generation.
from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import torch

from petalnode.errors import ConfigError


class VerifyMode(enum.Enum):
    """How much of the servers' work a client re-checks on other servers."""

    OFF = "off"
    """Trust every server (your own swarm)."""
    SAMPLE = "sample"
    """Check every hop every few steps (randomly spaced) and at the end of each generation: every position is
    checked before `generate()` returns, but a streamed token may be shown before its check (then retracted)."""
    FULL = "full"
    """Check every hop on every step before its output is used: no unverified token ever reaches the user."""

    @classmethod
    def parse(cls, value: VerifyMode | str | None) -> VerifyMode:
        if value is None:
            return DEFAULT_VERIFY_MODE
        if isinstance(value, VerifyMode):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(f"verify must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None


DEFAULT_VERIFY_MODE = VerifyMode.SAMPLE
"""Strangers' swarms are checked by default; see benchmarks/integrity.py for what SAMPLE costs and catches."""

SAMPLE_MEAN_GAP = 8
"""Mean number of steps between two checks in SAMPLE mode (each check re-runs all positions since the last one
in one multi-token step per hop, so the extra server work is about one step per gap, not one per token)."""

# Largest per-position relative L2 difference between two honest servers, by the dtypes they compute in. Measured
# by benchmarks/verify_tolerance.py on the default model (blocks 0-9 x 96 positions and 0-29 x 200: decode vs
# multi-token catch-up vs one prefill): fp32-fp32 at most 2.5e-6, bf16-bf16 0.051, fp32-bf16 0.091. The
# tolerances keep a margin over that (x40, x4, x2.7). fp16 (not measurable on this CPU) is given bf16's, which is
# loose: fp16 keeps 3 more mantissa bits. A server whose dtype is unknown is taken to compute in bf16.
_TOLERANCES: dict[frozenset[torch.dtype], float] = {
    frozenset({torch.float32}): 1e-4,
    frozenset({torch.float16}): 0.2,
    frozenset({torch.bfloat16}): 0.2,
    frozenset({torch.float32, torch.float16}): 0.25,
    frozenset({torch.float32, torch.bfloat16}): 0.25,
    frozenset({torch.float16, torch.bfloat16}): 0.25,
}
_TINY = 1e-6
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNKNOWN_DTYPE = torch.bfloat16


def parse_server_dtype(name: str) -> torch.dtype | None:
    """The dtype a server says it computes in (its `info` reply); None if unknown or not one we know."""
    return _DTYPES.get(name)


def tolerance(a: torch.dtype | None, b: torch.dtype | None) -> float:
    """The largest relative difference two honest servers computing in dtypes `a` and `b` can show (None:
    unknown, taken as bf16)."""
    a, b = a or UNKNOWN_DTYPE, b or UNKNOWN_DTYPE
    try:
        return _TOLERANCES[frozenset({a, b})]
    except KeyError:
        raise ConfigError(f"no verification tolerance is known for dtypes {a} and {b}") from None


def relative_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position [n]: the largest (over the batch) ||a - b|| / max(||b||, tiny) of [batch, n, hidden] tensors."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare outputs of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a32, b32 = a.float(), b.float()
    error = torch.linalg.vector_norm(a32 - b32, dim=-1) / torch.linalg.vector_norm(b32, dim=-1).clamp_min(_TINY)
    return error.amax(dim=0)


def first_mismatch(a: torch.Tensor, b: torch.Tensor, tol: float) -> int | None:
    """The index of the first position where `a` and `b` disagree beyond `tol` (None: they agree everywhere)."""
    bad = (relative_errors(a, b) > tol).nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


class Side(enum.Enum):
    MAIN = "main"
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class Majority:
    """The verdict of a third opinion: `liar` disagrees with the other two (None: no majority)."""

    liar: Side | None


def majority(main_vs_third: int | None, shadow_vs_third: int | None) -> Majority:
    """Who lied, given where the third opinion first disagrees with the main hop and with the shadow."""
    main_agrees, shadow_agrees = main_vs_third is None, shadow_vs_third is None
    if main_agrees and not shadow_agrees:
        return Majority(Side.SHADOW)
    if shadow_agrees and not main_agrees:
        return Majority(Side.MAIN)
    return Majority(None)


class CheckSchedule:
    """When to check the session's hops (see the module header)."""

    def __init__(self, mode: VerifyMode, rng: random.Random, *, mean_gap: int = SAMPLE_MEAN_GAP) -> None:
        if mean_gap < 1:
            raise ConfigError(f"the mean gap between checks is at least 1 step, got {mean_gap}")
        self.mode = mode
        self._rng = rng
        self._mean_gap = mean_gap
        self._countdown = self._draw()

    def _draw(self) -> int:
        return self._rng.randint(1, 2 * self._mean_gap - 1)

    def due(self) -> bool:
        """Called once per step: check after this one?"""
        if self.mode is VerifyMode.OFF:
            return False
        if self.mode is VerifyMode.FULL:
            return True
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self._draw()
        return True


@dataclass(slots=True)
class VerifyStats:
    """What verification did in one session (or client), for reports and benchmarks."""

    checks: int = 0
    """Catch-up steps sent to shadow servers (one per hop per check)."""
    positions_checked: int = 0
    """Positions re-run on shadows (summed over hops)."""
    mismatches: int = 0
    third_opinions: int = 0
    liars_banned: int = 0
    rollbacks: int = 0
    """Rollbacks that reached the caller (tokens already returned were wrong)."""
    referee_runs: int = 0
    """Disputes decided by the client's own copy of the blocks (no third server hosted them)."""
    unverifiable_hops: int = 0
    """Checks skipped because no independent server hosts a hop's blocks."""
    max_unverified_steps: int = 0
    """The most steps whose outputs were returned before their check (the exposure SAMPLE bounds, at most
    2 * SAMPLE_MEAN_GAP - 1; 0 in FULL): a streamed token may be retracted up to that many tokens later."""
    first_detection_position: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]



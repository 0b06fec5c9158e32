"""Checking an inference session's hops on independent servers (the rules are in `_verification.py`).

For every block range the route uses, a `_RangeCheck` keeps a shadow chain of other servers over the same blocks
and how far the session's outputs at the range's end were checked. A check sends each shadow, in one multi-token
step, the positions since its last check (the inputs the session already keeps for failover replay) and compares
what comes back with what the session used. To a shadow server that is an ordinary session: a prefill, then
multi-token steps, as speculative decoding sends. The checked server sees nothing at all.

On a disagreement a third server (a fresh session, fed all positions as one prefill) decides: a main server in
the minority is banned and replaced by its shadow (whose caches already hold every position), a shadow in the
minority is banned and replaced by the third; the session then rolls back to the first position that disagreed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from petalnode.errors import NoRouteError, PetalnodeError, VerificationError
from petalnode.identity import PeerId
from petalnode.node._failover import Phase, checker_failure_bans
from petalnode.node._referee import RefereeSession
from petalnode.node._verification import (
    CheckSchedule,
    Side,
    VerifyMode,
    VerifyStats,
    first_mismatch,
    majority,
    tolerance,
)

if TYPE_CHECKING:
    from petalnode.node._swarm_client import SwarmSession, _Hop

log = logging.getLogger(__name__)

SHADOW_RETRY_S = 30.0
"""After finding no independent server for a range, look again only this much later (sample mode)."""


@dataclass
class _RangeCheck:
    """Verification state of the session's outputs at block `end`, computed from its inputs at block `start`."""

    start: int
    end: int
    verified: int = 0
    """Positions [0, verified) of the outputs are checked."""
    shadow: list[_Hop] | RefereeSession | None = None
    """Other servers over the same blocks, or (FULL, no second server) the client's own copy."""
    shadow_position: int = 0
    """Positions the shadow's caches hold (<= verified)."""
    producers: list[tuple[int, PeerId | None]] = field(default_factory=list)
    """(first position, server) of the main servers whose outputs the session used; None: not known."""

    def producer_at(self, position: int) -> PeerId | None:
        found = None
        for first, peer in self.producers:
            if first <= position:
                found = peer
        return found

    def shadow_peers(self) -> set[PeerId]:
        return set() if isinstance(self.shadow, RefereeSession) else {hop.peer_id for hop in self.shadow or ()}


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A range's check: roll the session back to `rollback` (None: nothing to redo), promote `promote` in place of
    the main hop over this range."""

    rollback: int | None = None
    promote: list[_Hop] | None = None


class SessionVerifier:
    """Spot-checks one `SwarmSession`; created by the session when its client verifies."""

    def __init__(self, session: SwarmSession, mode: VerifyMode, rng: random.Random) -> None:
        self._session = session
        self.mode = mode
        self.schedule = CheckSchedule(mode, rng)
        self.stats = VerifyStats()
        self._ranges: dict[tuple[int, int], _RangeCheck] = {}

    def _dtypes(self, peers: Iterable[PeerId | None]) -> list[torch.dtype | None]:
        known = self._session._client.server_dtypes
        return [known.get(p) if p is not None else None for p in peers]

    def _tolerance(self, a: Iterable[PeerId | None], b: Iterable[PeerId | None] | torch.dtype) -> float:
        """The tolerance between two chains of servers (or a chain and the referee's dtype): that of their least
        precise pair of dtypes."""
        others = [b] if isinstance(b, torch.dtype) else self._dtypes(b)
        return max(tolerance(x, y) for x in self._dtypes(a) for y in others)

    def rolled_back(self, position: int) -> None:
        """The session now holds only positions [0, position)."""
        for r in self._ranges.values():
            r.verified = min(r.verified, position)
            r.shadow_position = min(r.shadow_position, position)

    def hop_started(self, hop: _Hop, position: int) -> None:
        """`hop` produces the outputs of its blocks from `position` on (a new session, or a replacement)."""
        r = self._ranges.get((hop.start, hop.end))
        if r is None:
            r = self._ranges[hop.start, hop.end] = _RangeCheck(hop.start, hop.end)
            if position > 0:
                r.producers.append((0, None))
        r.producers.append((position, hop.peer_id))

    async def check(self) -> int | None:
        """Check every range of the route up to the session's position; returns the position to roll back to
        (None: everything agrees). Bans, promotions and shadow replacements are done here.

        Raises:
            VerificationError: FULL mode and some range cannot be checked.
        """
        session = self._session
        position = session.position
        current = {(h.start, h.end) for h in session.hops}
        for key in [k for k in self._ranges if k not in current]:
            await self._drop_shadow(self._ranges.pop(key))
        ranges = [self._ranges[h.start, h.end] for h in session.hops if (h.start, h.end) in self._ranges]
        outcomes = await asyncio.gather(*(self._check_range(r, position) for r in ranges))
        rollback = None
        for r, outcome in zip(ranges, outcomes, strict=True):
            if outcome.promote is not None:
                await self._promote(r, outcome.promote)
            if outcome.rollback is not None:
                rollback = outcome.rollback if rollback is None else min(rollback, outcome.rollback)
        return rollback

    async def aclose(self) -> None:
        for r in self._ranges.values():
            await self._drop_shadow(r)
        self._ranges.clear()

    # -- one range ------------------------------------------------------------------------------------------
    async def _check_range(self, r: _RangeCheck, position: int) -> _Outcome:
        session = self._session
        if r.verified >= position:
            return _Outcome()
        inputs, outputs = session.boundary(r.start), session.boundary(r.end)
        if inputs is None or outputs is None or inputs.shape[1] < position or outputs.shape[1] < position:
            return self._unverifiable(r, "the route changed under it")
        main = r.producer_at(position - 1)
        for _attempt in range(3):
            if r.shadow is None:
                # Each look for another server may cost a DHT lookup: after none was found (by any session of this
                # client), SAMPLE looks again only SHADOW_RETRY_S later.
                loop, no_shadow = asyncio.get_running_loop(), self._session._client.no_shadow_until
                if loop.time() < no_shadow.get((r.start, r.end), 0.0) and self.mode is not VerifyMode.FULL:
                    return self._unverifiable(r, "no other server hosts these blocks")
                avoid = {p for _, p in r.producers if p is not None}
                r.shadow = await self._open_chain(r, avoid) or await self._open_referee(r)
                r.shadow_position = 0
                if r.shadow is None:
                    no_shadow[r.start, r.end] = loop.time() + SHADOW_RETRY_S
                    return self._unverifiable(r, "no other server hosts these blocks")
            try:
                shadow_out = await self._run_chain(r.shadow, inputs[:, r.shadow_position:position],
                                                   r.shadow_position)
            except Exception as e:
                if isinstance(r.shadow, RefereeSession):
                    log.warning("verification: the client's own copy of blocks %d-%d failed: %s", r.start,
                                r.end - 1, e)
                    await self._drop_shadow(r)
                    return self._unverifiable(r, f"the client's own copy failed: {e}")
                self._shadow_failed(r, e)
                await self._drop_shadow(r)
                continue
            self.stats.checks += 1
            self.stats.positions_checked += position - r.shadow_position
            offset = r.verified - r.shadow_position
            mismatch = first_mismatch(outputs[:, r.verified:position], shadow_out[:, offset:],
                                      self._shadow_tolerance(r, main))
            checked_from = r.verified
            r.shadow_position = position
            if mismatch is None:
                r.verified = position
                return _Outcome()
            return await self._settle(r, checked_from + mismatch, position, inputs, outputs,
                                      shadow_out[:, offset:], checked_from, main)
        return self._unverifiable(r, "its shadow servers kept failing")

    async def _settle(
        self, r: _RangeCheck, bad: int, position: int, inputs: torch.Tensor, outputs: torch.Tensor,
        shadow_out: torch.Tensor, checked_from: int, main: PeerId | None,
    ) -> _Outcome:
        """The main outputs and the shadow's disagree from position `bad`: ask a third server, act on the majority."""
        self.stats.mismatches += 1
        if self.stats.first_detection_position is None:
            self.stats.first_detection_position = bad
        blamed = r.producer_at(bad)
        if isinstance(r.shadow, RefereeSession):  # our own copy disagrees: no need to ask anyone else
            return self._main_lied(r, bad, blamed, main, promote=None, third=None, position=position)
        self.stats.third_opinions += 1
        avoid = {p for _, p in r.producers if p is not None} | r.shadow_peers()
        third = await self._open_chain(r, avoid)
        referee = self._session._client.referee
        third_by: set[PeerId | None] | torch.dtype
        try:
            if third is not None:
                third_out = await self._run_chain(third, inputs[:, :position], 0)
                third_by = {hop.peer_id for hop in third}
            elif referee is not None and self._session.adapter is None:
                self.stats.referee_runs += 1
                third_out = await referee.run(r.start, r.end, inputs[:, :position], self._session.prompts)
                third_by = referee.dtype
            else:
                await self._drop_shadow(r)
                return self._no_majority(r, bad, "no third server hosts these blocks")
        except Exception as e:
            if third is None:  # the referee could not run the blocks (weights missing, out of memory, ...)
                await self._drop_shadow(r)
                return self._no_majority(r, bad, f"the client's own copy could not decide: {e}")
            await self._close_chain(third)
            self._shadow_failed(r, e)
            await self._drop_shadow(r)
            return self._no_majority(r, bad, f"the third server failed: {e}")
        third_out = third_out[:, checked_from:position]
        verdict = majority(
            first_mismatch(outputs[:, checked_from:position], third_out, self._tolerance([blamed], third_by)),
            first_mismatch(shadow_out, third_out, self._tolerance(r.shadow_peers(), third_by)))
        blocks = f"blocks {r.start}-{r.end - 1}"
        if verdict.liar is Side.MAIN:
            promote = r.shadow
            assert isinstance(promote, list)
            return self._main_lied(r, bad, blamed, main, promote=promote, third=third, position=position)
        if verdict.liar is Side.SHADOW:
            self.stats.liars_banned += 1
            for peer in r.shadow_peers():
                self._session._client._ban(peer, f"verifying {blocks}: its outputs disagree with two other "
                                           "servers", None)
            await self._drop_shadow(r)
            r.shadow, r.shadow_position, r.verified = third, position if third is not None else 0, position
            return _Outcome()
        if third is not None:
            await self._close_chain(third)
        await self._drop_shadow(r)
        return self._no_majority(r, bad, "three servers gave three different answers")

    def _main_lied(self, r: _RangeCheck, bad: int, blamed: PeerId | None, main: PeerId | None, *,
                   promote: list[_Hop] | None, third: list[_Hop] | None, position: int) -> _Outcome:
        """Ban the main server, put its shadow in its place (or, when the shadow is our own copy, let failover
        route a replacement), and roll back to `bad`."""
        blocks = f"blocks {r.start}-{r.end - 1}"
        self.stats.liars_banned += 1
        by = "the client's own copy" if promote is None else "two other opinions"
        self._session._client._ban(blamed, f"outputs of {blocks} disagree with {by} from position {bad}", None)
        log.warning("verification: the server of %s (%s) returned wrong hidden states from position %d; %s "
                    "agree(s); rolling back to %d", blocks, blamed or main, bad, by, bad)
        r.verified = bad
        r.producers = [(0, None)] if blamed is None else [p for p in r.producers if p[1] != blamed]
        if promote is not None:
            r.shadow, r.shadow_position = third, position if third is not None else 0
        else:  # the referee stays the shadow; the main hop is replaced (and replayed) before its next step
            for hop in self._session.hops:
                if (hop.start, hop.end) == (r.start, r.end):
                    hop.broken = True
        return _Outcome(rollback=bad, promote=promote)

    async def _promote(self, r: _RangeCheck, chain: list[_Hop]) -> None:
        """Put `chain` (a shadow holding every position) in place of the main hop over `r`'s blocks."""
        session = self._session
        index = next((i for i, h in enumerate(session.hops) if (h.start, h.end) == (r.start, r.end)), None)
        if index is None:  # the route changed meanwhile
            await self._close_chain(chain)
            return
        old = session.hops[index]
        session.hops[index : index + 1] = chain
        await _quietly_close(old)
        if len(chain) == 1:
            r.producers = [(0, chain[0].peer_id)]
            return
        # The range is now several hops: each is checked on its own, from position 0.
        del self._ranges[r.start, r.end]
        await self._drop_shadow(r)
        for hop in chain:
            self._ranges[hop.start, hop.end] = _RangeCheck(hop.start, hop.end, producers=[(0, hop.peer_id)])

    # -- helpers --------------------------------------------------------------------------------------------
    async def _open_chain(self, r: _RangeCheck, avoid: set[PeerId]) -> list[_Hop] | None:
        session = self._session
        try:
            return await session._client._open_hops(
                r.start, r.end, session.max_length, session.batch_size, adapter=session.adapter,
                prompts=session.prompts, avoid=frozenset(avoid), wait_s=0.0)
        except NoRouteError:
            return None

    async def _open_referee(self, r: _RangeCheck) -> RefereeSession | None:
        """FULL mode with no second server: the client's own copy of the blocks is the shadow, if it has one."""
        session = self._session
        referee = session._client.referee
        if self.mode is not VerifyMode.FULL or referee is None or session.adapter is not None:
            return None
        try:
            return await referee.open_session(r.start, r.end, session.max_length, session.batch_size,
                                              session.prompts)
        except Exception as e:  # weights missing, out of memory: then the range is unverifiable
            log.warning("verification: the client's own copy cannot run blocks %d-%d: %s", r.start, r.end - 1, e)
            return None

    def _shadow_tolerance(self, r: _RangeCheck, main: PeerId | None) -> float:
        if isinstance(r.shadow, RefereeSession):
            return self._tolerance([main], r.shadow.dtype)
        return self._tolerance([main], r.shadow_peers())

    async def _run_chain(self, chain: list[_Hop] | RefereeSession, hidden: torch.Tensor,
                         start: int) -> torch.Tensor:
        if isinstance(chain, RefereeSession):
            self.stats.referee_runs += 1
            return await chain.step(hidden, start)
        client = self._session._client
        for hop in chain:
            out = await client._send_step(hop, hidden, start)
            hop.remember(hidden, start)
            hidden = out
        return hidden

    def _shadow_failed(self, r: _RangeCheck, error: Exception) -> None:
        if checker_failure_bans(error, phase=Phase.STEP):
            for peer in r.shadow_peers():
                self._session._client._ban(peer, f"verifying blocks {r.start}-{r.end - 1}", error)

    def _unverifiable(self, r: _RangeCheck, why: str) -> _Outcome:
        self.stats.unverifiable_hops += 1
        message = f"blocks {r.start}-{r.end - 1} of {self._session._client.model} cannot be verified: {why}"
        if self.mode is VerifyMode.FULL:
            raise VerificationError(f"{message}; verify='full' needs two servers on every block "
                                    "(use verify='sample' to accept unverified hops, or 'off')",
                                    missing=[(r.start, r.end)])
        warned = self._session._client.unverifiable_warned
        if (r.start, r.end) not in warned:  # once per client and range, not once per session
            warned.add((r.start, r.end))
            log.warning("verification: %s; its outputs are used unchecked", message)
        return _Outcome()

    def _no_majority(self, r: _RangeCheck, bad: int, why: str) -> _Outcome:
        message = (f"verification of blocks {r.start}-{r.end - 1} found outputs that disagree from position {bad} "
                   f"and no majority: {why}")
        if self.mode is VerifyMode.FULL:
            raise VerificationError(message, missing=[(r.start, r.end)])
        log.warning("%s; continuing unverified", message)
        return _Outcome()

    async def _drop_shadow(self, r: _RangeCheck) -> None:
        chain, r.shadow, r.shadow_position = r.shadow, None, 0
        if chain:
            await self._close_chain(chain)

    async def _close_chain(self, chain: list[_Hop] | RefereeSession) -> None:
        if isinstance(chain, RefereeSession):
            await chain.aclose()
            return
        for hop in chain:
            await _quietly_close(hop)


async def _quietly_close(hop: _Hop) -> None:
    with contextlib.suppress(PetalnodeError, OSError, RuntimeError):
        await hop.stream.aclose()

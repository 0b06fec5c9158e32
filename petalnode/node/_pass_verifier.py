"""Spot-checking stateless training calls (forward and backward through one server's blocks).

A training call is self-contained: its request holds everything the server needs. So a check sends the very same
request to another server hosting all of the hop's blocks (to that server, an ordinary training call) and
compares the replies within the tolerance of the two servers' dtypes (`_verification.py`). On a disagreement a
third server (or, for a forward, the client's own copy of the blocks) decides; the one in the minority is banned
and the majority's reply is used, so a pass never returns what one lying server made up. Checks follow the same
`CheckSchedule` as inference: every call in FULL, randomly spaced calls in SAMPLE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import torch

from petalnode.dht import ServerState
from petalnode.errors import VerificationError
from petalnode.identity import PeerId
from petalnode.node._failover import Phase, checker_failure_bans
from petalnode.node._routing import DEFAULT_RTT_S, same_weights
from petalnode.node._swarm_view import ServerView
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
    from petalnode.node._swarm_client import SwarmClient

log = logging.getLogger(__name__)

Replies = Sequence[torch.Tensor | None]


def disagreement(a: Replies, b: Replies, tol: float) -> int | None:
    """The first position where two replies (lists of tensors, None where absent) disagree; None: they agree."""
    found = None
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            if (x is None) != (y is None):
                return 0
            continue
        at = first_mismatch(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]), tol)
        if at is not None:
            found = at if found is None else min(found, at)
    return found


class PassVerifier:
    """Checks a client's forward and backward calls (one instance per client)."""

    def __init__(self, client: SwarmClient, mode: VerifyMode) -> None:
        self._client = client
        self.mode = mode
        self.schedule = CheckSchedule(mode, client.rng)
        self.stats = VerifyStats()

    async def checked(
        self, phase: Phase, main: ServerView, start: int, end: int, adapter: str | None, replies: Replies,
        call: Callable[[ServerView], Awaitable[Replies]],
        referee: Callable[[], Awaitable[Replies]] | None = None,
    ) -> Replies:
        """`replies` came from `main` for blocks [start, end); check them now if the schedule says so and return
        what the majority says (the same replies unless `main` lied)."""
        if not self.schedule.due():
            return replies
        what = f"{phase.value} through blocks {start}-{end - 1}"
        shadow = self._other_server(start, end, adapter, avoid={main.peer_id})
        if shadow is None and referee is not None:
            return await self._refereed(main, what, replies, referee)
        if shadow is None:
            return self._unverifiable(what, replies, "no other server hosts all of these blocks")
        try:
            shadow_replies = await call(shadow)
        except Exception as e:
            self._failed(shadow, what, e)
            return self._unverifiable(what, replies, f"the checking server failed: {e}")
        self.stats.checks += 1
        if disagreement(replies, shadow_replies, self._tolerance(main, shadow)) is None:
            return replies
        self.stats.mismatches += 1
        self.stats.third_opinions += 1
        third = self._other_server(start, end, adapter, avoid={main.peer_id, shadow.peer_id})
        try:
            if third is not None:
                third_replies = await call(third)
            elif referee is not None:
                self.stats.referee_runs += 1
                third_replies = await referee()
            else:
                return self._no_majority(what, replies, "no third server hosts these blocks")
        except Exception as e:
            if third is not None:
                self._failed(third, what, e)
            return self._no_majority(what, replies, f"the third opinion failed: {e}")
        third_dtype = self._dtype(third) if third is not None else self._client.referee_dtype()
        verdict = majority(
            disagreement(replies, third_replies, tolerance(self._dtype(main), third_dtype)),
            disagreement(shadow_replies, third_replies, tolerance(self._dtype(shadow), third_dtype)),
        )
        if verdict.liar is Side.MAIN:
            self.stats.liars_banned += 1
            self._client._ban(main.peer_id, f"{what}: its reply disagrees with two other opinions", None)
            return shadow_replies
        if verdict.liar is Side.SHADOW:
            self.stats.liars_banned += 1
            self._client._ban(shadow.peer_id, f"checking {what}: its reply disagrees with two other opinions",
                              None)
            return replies
        return self._no_majority(what, replies, "three different replies")

    async def _refereed(self, main: ServerView, what: str, replies: Replies,
                        referee: Callable[[], Awaitable[Replies]]) -> Replies:
        """No other server hosts the blocks: the client's own copy checks them (and is trusted: it is ours)."""
        self.stats.checks += 1
        self.stats.referee_runs += 1
        own = await referee()
        if disagreement(replies, own, tolerance(self._dtype(main), self._client.referee_dtype())) is None:
            return replies
        self.stats.mismatches += 1
        self.stats.liars_banned += 1
        self._client._ban(main.peer_id, f"{what}: its reply disagrees with the client's own copy of the blocks",
                          None)
        return own

    def _other_server(self, start: int, end: int, adapter: str | None, avoid: set[PeerId]) -> ServerView | None:
        """The closest online, unbanned server hosting all of [start, end), other than `avoid`."""
        client = self._client
        view = client._view
        if view is None:
            return None
        banned = client.bans.banned() | avoid
        candidates = [s for s in view.servers.values()
                      if s.state == ServerState.ONLINE and s.start <= start and end <= s.end and s.addresses
                      and s.peer_id not in banned and (adapter is None or adapter in s.adapters)
                      and (client.span_digest is None or same_weights(s, client.span_digest))]
        return min(candidates, key=lambda s: (client.rtt.get(s.peer_id, DEFAULT_RTT_S), s.peer_id), default=None)

    def _dtype(self, server: ServerView) -> torch.dtype | None:
        return self._client.server_dtypes.get(server.peer_id)

    def _tolerance(self, a: ServerView, b: ServerView) -> float:
        return tolerance(self._dtype(a), self._dtype(b))

    def _failed(self, server: ServerView, what: str, error: Exception) -> None:
        if checker_failure_bans(error, phase=Phase.FORWARD):
            self._client._ban(server.peer_id, f"checking {what}", error)

    def _unverifiable(self, what: str, replies: Replies, why: str) -> Replies:
        self.stats.unverifiable_hops += 1
        if self.mode is VerifyMode.FULL:
            raise VerificationError(f"{what} of {self._client.model} cannot be verified: {why}; verify='full' needs "
                                    "a second server hosting all of a hop's blocks")
        log.debug("verification: %s used unchecked: %s", what, why)
        return replies

    def _no_majority(self, what: str, replies: Replies, why: str) -> Replies:
        message = f"verification of {what} of {self._client.model} found disagreeing replies and no majority: {why}"
        if self.mode is VerifyMode.FULL:
            raise VerificationError(message)
        log.warning("%s; continuing unverified", message)
        return replies

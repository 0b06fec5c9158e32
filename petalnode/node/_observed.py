# What a client measured about each server: round trips and the latency of the steps it sent, decayed over time.
#
# A server's announced throughput is a claim anyone can inflate; these are the client's own numbers, and routing
# prefers them (see `_routing.costed_throughputs`).
#
# Invariants:
# - Pure: no I/O, no clock. Every method that needs the time takes `now` (a monotonic number of seconds, e.g. the
#   event loop's time), so tests and the churn simulator's virtual clock drive it.
# - Every estimate is a time-decayed mean: an observation made `age` seconds ago weighs 2 ** (-age / half_life).
#   A server that got faster or slower is re-learned within a few half-lives, whatever its old sample count was.
# - A server counts as measured only while its decayed step weight is at least `fresh_weight` (so n steps stay
#   evidence for about log2(n / fresh_weight) half-lives: one step for 2, a 100-step generation for about 9);
#   after that its claim is used again (capped by routing), so a server measured slow long ago gets another chance.
# - An observed throughput is finite and positive: compute time per step is floored at MIN_COMPUTE_FRACTION of the
#   step's latency, so a step no slower than the probe round trip (noise) never reads as infinitely fast.
# - A server whose claim exceeds DISCOUNT_RATIO x its observed throughput (and by a material time) is discounted:
#   it is costed by what was measured even after the measurement fades, until DISCOUNT_MEMORY_S pass without a new
#   observation of it; then it is a stranger again (so a server that was only overloaded, or got fixed, is tried
#   again, and a persistent liar wins at most one session per client per DISCOUNT_MEMORY_S). Each server is
#   reported as discounted once, however often it is discounted again.
# - Memory is bounded: at most `max_peers` servers are remembered (the least recently observed is forgotten).
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from petalnode.identity import PeerId

HALF_LIFE_S = 60.0
"""Observations lose half their weight per minute: a measurement survives the pause between two generations of a
chat (tens of seconds), and a server whose load changed (another client arrived) is re-learned within minutes."""
FRESH_WEIGHT = 0.25
"""Measured iff the decayed step weight is at least this: e.g. one step younger than two half-lives."""
MIN_COMPUTE_FRACTION = 0.1
"""Compute time of a step is at least this share of its latency (the rest may be round trip): caps an observed
throughput at 10 x blocks / latency, so round-trip noise cannot make a server look infinitely fast."""
DISCOUNT_RATIO = 4.0
"""A claim above this multiple of the observed throughput is discounted. Honest claims of one machine vary about
2x between measurements on a shared CPU (15-30 tokens/s locally, DESIGN.md), and a client's observation adds its
own overheads; 4x leaves room for both, while a 1000x liar is far beyond it."""
DISCOUNT_SLACK_S_PER_BLOCK = 0.001
"""...and only if the claim understates the observed compute by more than 1 ms per block (30 ms per token on a
30-block model): on tiny spans fixed per-step overheads (serialization, a thread hop) dwarf the compute, and a
ratio alone would call every honest server a liar there."""
DISCOUNT_MEMORY_S = 1800.0
"""How long a discounted server's last measurement outlives its freshness (30 half-lives): long enough that a liar
cannot win back sessions by waiting, short enough that an honest server caught overloaded is not costed by that
moment all day."""
MAX_PEERS = 4096
"""Servers remembered at most (a swarm's worth); the least recently observed is forgotten first."""


class DecayingMean:
    """A mean whose samples fade: a sample `age` seconds old weighs 2 ** (-age / half_life_s)."""

    __slots__ = ("_at", "_half_life_s", "_total", "_weight")

    def __init__(self, half_life_s: float) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half-life must be positive, got {half_life_s}")
        self._half_life_s = half_life_s
        self._total = 0.0
        self._weight = 0.0
        self._at = -math.inf

    def _decay(self, now: float) -> float:
        # A clock that went backwards (or equal times) decays nothing rather than growing old samples.
        return 0.5 ** (max(0.0, now - self._at) / self._half_life_s) if self._weight else 1.0

    def add(self, value: float, now: float) -> None:
        decay = self._decay(now)
        self._total = self._total * decay + value
        self._weight = self._weight * decay + 1.0
        self._at = max(self._at, now)

    @property
    def mean(self) -> float | None:
        """The weighted mean (decay does not change it: all samples fade alike); None without samples."""
        return self._total / self._weight if self._weight else None

    def weight(self, now: float) -> float:
        """Samples' total weight at `now`: about how many fresh observations the mean stands for."""
        return self._weight * self._decay(now)

    @property
    def last_at(self) -> float:
        return self._at


def compute_s_per_block(latency_s: float, rtt_s: float, blocks: int) -> float:
    """Seconds of server compute per block in one step: latency minus the round trip, floored (see the header)."""
    return max(latency_s - rtt_s, MIN_COMPUTE_FRACTION * latency_s) / blocks


def is_overclaim(
    claimed: float, observed: float, *, ratio: float = DISCOUNT_RATIO,
    slack_s_per_block: float = DISCOUNT_SLACK_S_PER_BLOCK,
) -> bool:
    """Whether a claimed throughput (blocks/s) is far above the observed one: both by `ratio` and by real time."""
    if not (observed > 0 and claimed > 0):
        return False
    return claimed > ratio * observed and 1.0 / observed - 1.0 / claimed > slack_s_per_block


@dataclass(frozen=True, slots=True)
class Discounted:
    """A server whose claim was found far above what the client measured."""

    peer_id: PeerId
    claimed: float
    observed: float


@dataclass(slots=True)
class _Peer:
    rtt: DecayingMean
    compute: DecayingMean  # seconds of compute per block per step
    discounted: bool = False

    @property
    def last_at(self) -> float:
        return max(self.rtt.last_at, self.compute.last_at)


class ObservedSpeeds:
    """Per-server round trips and step latencies a client measured itself, with decay (see the header)."""

    def __init__(
        self, *, half_life_s: float = HALF_LIFE_S, fresh_weight: float = FRESH_WEIGHT, max_peers: int = MAX_PEERS,
    ) -> None:
        if not half_life_s > 0 or not fresh_weight > 0 or max_peers < 1:
            raise ValueError("half_life_s and fresh_weight must be positive and max_peers at least 1")
        self.half_life_s = half_life_s
        self.fresh_weight = fresh_weight
        self.max_peers = max_peers
        self._peers: dict[PeerId, _Peer] = {}
        self._reported: set[PeerId] = set()

    def _peer(self, peer_id: PeerId) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            if len(self._peers) >= self.max_peers:
                oldest = min(self._peers, key=lambda p: self._peers[p].last_at)
                del self._peers[oldest]
            peer = self._peers[peer_id] = _Peer(DecayingMean(self.half_life_s), DecayingMean(self.half_life_s))
        return peer

    def record_rtt(self, peer_id: PeerId, seconds: float, now: float) -> float:
        """A probe's round trip; returns the server's round-trip estimate after it."""
        _check_seconds(seconds, "a round trip")
        peer = self._peer(peer_id)
        peer.rtt.add(seconds, now)
        mean = peer.rtt.mean
        assert mean is not None
        return mean

    def record_step(self, peer_id: PeerId, blocks: int, latency_s: float, now: float) -> None:
        """One decode step of `blocks` blocks through the server took `latency_s` (send to reply, at the client)."""
        _check_seconds(latency_s, "a step latency")
        if blocks < 1:
            raise ValueError(f"a step runs at least one block, got {blocks}")
        peer = self._peer(peer_id)
        if peer.discounted and not self._remembers_discount(peer, now):
            peer.discounted = False  # an old discount has lapsed: judged afresh from here
        peer.compute.add(compute_s_per_block(latency_s, peer.rtt.mean or 0.0, blocks), now)

    @staticmethod
    def _remembers_discount(peer: _Peer, now: float) -> bool:
        return peer.discounted and now - peer.compute.last_at <= DISCOUNT_MEMORY_S

    def rtt_s(self, peer_id: PeerId) -> float | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.rtt.mean

    def needs_probe(self, peer_id: PeerId, now: float) -> bool:
        """Whether the server's round trip is unknown or stale (decayed below `fresh_weight`): probe it again."""
        peer = self._peers.get(peer_id)
        return peer is None or peer.rtt.weight(now) < self.fresh_weight

    def throughput(self, peer_id: PeerId, now: float) -> float | None:
        """Observed blocks/s while the measurement is fresh (longer once discounted, see the header); else None."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.compute.mean is None:
            return None
        if peer.compute.weight(now) < self.fresh_weight and not self._remembers_discount(peer, now):
            return None
        return 1.0 / peer.compute.mean

    def throughputs(self, now: float) -> dict[PeerId, float]:
        """`throughput` of every server that has one: what routing costs these servers by."""
        return {p: t for p in self._peers if (t := self.throughput(p, now)) is not None}

    def discount(self, claims: Mapping[PeerId, float], now: float) -> list[Discounted]:
        """Servers whose claim (blocks/s) is now found far above the observed throughput, each reported once ever.

        Marks them discounted (see the header); the caller logs what is returned.
        """
        found = []
        for peer_id, claimed in claims.items():
            peer = self._peers.get(peer_id)
            if peer is None or self._remembers_discount(peer, now):
                continue
            observed = self.throughput(peer_id, now)
            if observed is not None and is_overclaim(claimed, observed):
                peer.discounted = True
                if peer_id not in self._reported:
                    if len(self._reported) >= self.max_peers:
                        self._reported.clear()  # bounded; at worst a liar is logged a second time
                    self._reported.add(peer_id)
                    found.append(Discounted(peer_id, claimed, observed))
        return found

    def is_discounted(self, peer_id: PeerId, now: float) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and self._remembers_discount(peer, now)


def _check_seconds(seconds: float, what: str) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {seconds}")

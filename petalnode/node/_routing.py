# Route choice: the chain of servers a client pushes hidden states through (Petals' sequence_manager, improved).
#
# Invariants:
# - Pure: swarm view, measured RTTs and observed throughputs in, route out; randomness only from the optional `rng`.
# - A route covers [start, end) exactly once, in order: hop i ends where hop i+1 starts, no hop is empty, and no
#   two consecutive hops use the same server (they would be merged: one hop is never worse than two).
# - Only ONLINE, non-banned servers with enough cache tokens are used, and each only inside its announced span.
# - With `span_digest` (the client's own digests, compute/_digest.py), only servers whose announced span digest
#   equals the client's digest of that server's announced [start, end) are used: same name, other weights (a
#   fine-tune, a corrupted download, another quantization) never enter a route.
# - The cost of a route is the expected latency of one decode step:
#       sum over hops of  rtt(server) + hop_penalty_s + blocks_in_hop / throughput(server)
#   and the returned route minimizes it (up to the optional jitter). Petals runs Dijkstra over (server, block)
#   nodes; the same optimum is a shortest path over block boundaries 0..N, a DAG, solved here by one forward pass.
# - throughput(server) is what the client observed (`observed`, from `_observed.ObservedSpeeds`) when it has a
#   measurement; otherwise the server's claim, trusted only up to CLAIM_CAP x min over its blocks of the block's
#   low median claim (of the positive claims of the online servers hosting that block, itself included). So an
#   announcement alone can never make a server look more than CLAIM_CAP times faster than the typical server on
#   its slowest-typical block, and a measured server is costed by its measurement whatever it announces (see
#   `costed_throughputs`).
from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from petalnode.dht import ServerState
from petalnode.errors import NoRouteError
from petalnode.identity import PeerId
from petalnode.node._swarm_view import ServerView, SwarmView, describe_runs, runs_where

HOP_PENALTY_S = 0.002
"""Added per hop: serialization, an extra session to open and one more server that can fail mid-generation."""
DEFAULT_RTT_S = 0.05
"""Round trip assumed for a server we have not measured yet: a typical cross-country internet path."""
MIN_THROUGHPUT = 1e-3
"""A server announcing less (e.g. 0 before it measured itself) is costed as this slow: usable only as last resort."""
ROUTE_JITTER = 0.02
"""With an rng, each server's costs are scaled by a random factor in [1, 1 + ROUTE_JITTER): routes within about 2%
of each other are chosen at random, which spreads clients over equal servers instead of all picking the first."""
CLAIM_CAP = 4.0
"""An unmeasured server's claim counts at most this multiple of the typical claim on its blocks. Same as
`_observed.DISCOUNT_RATIO`: a claim that would not be called a lie once measured is not capped before. Honest
machines on one span may differ more (a GPU next to CPUs): such a server is still ranked first while unmeasured
(4x beats every typical peer), gets tried, and from then on is costed by its measured speed, so the cap delays
nothing; it only stops a wild claim from outweighing round trips, hop counts and measured servers by 1000x."""
_NOTHING: Mapping[PeerId, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RouteHop:
    """Send blocks [start, end) to `peer_id`; `server` is its announcement as seen when routing."""

    peer_id: PeerId
    start: int
    end: int
    server: ServerView


def choose_route(
    view: SwarmView,
    *,
    start: int = 0,
    end: int | None = None,
    rtt_s: Mapping[PeerId, float],
    banned: Collection[PeerId] = (),
    min_cache_tokens: int = 0,
    hop_penalty_s: float = HOP_PENALTY_S,
    default_rtt_s: float = DEFAULT_RTT_S,
    rng: random.Random | None = None,
    model: str | None = None,
    adapter: str | None = None,
    span_digest: Callable[[int, int], bytes] | None = None,
    observed: Mapping[PeerId, float] = _NOTHING,
    claim_cap: float = CLAIM_CAP,
) -> list[RouteHop]:
    """The chain of servers through blocks [start, end) with the lowest expected decode-step latency.

    A server may serve any sub-range of its span, so a route can switch servers mid-span. Runs in
    O((end - start) x servers): for a fixed server s, the best way to reach boundary b through s is
        min over a of (best[a] - a / thr_s) + b / thr_s + rtt_s + penalty,
    and the min over a is a running minimum kept per server as b advances.

    Args:
        view: the swarm of one model.
        start, end: the block range to route (default: the whole model); failover re-routes a sub-range.
        rtt_s: measured round-trip times; unmeasured servers cost `default_rtt_s`.
        banned: servers never to use (recently failed).
        min_cache_tokens: servers announcing fewer free cache tokens are skipped.
        hop_penalty_s: added per hop, so fewer hops win near-ties.
        rng: if given, costs get a small random jitter (see ROUTE_JITTER) to spread clients.
        model: only for the error message.
        adapter: only servers announcing this LoRA adapter are eligible.
        span_digest: the client's digest of blocks [a, b) of its copy of the model; when given, only servers
            announcing exactly that digest for their [start, end) are eligible (None: no identity check).
        observed: blocks/s the client measured itself, per server; others are costed by their capped claims.
        claim_cap: see CLAIM_CAP (math.inf trusts every claim, as before measured speeds).

    Raises:
        NoRouteError: some blocks in [start, end) have no eligible server (none online, or all banned, joining
            or out of cache); `missing` lists the maximal runs, and the message says e.g. "blocks 12-14 of M have
            no server (servers there: 1 joining)".
    """
    end = view.num_blocks if end is None else end
    if not 0 <= start < end <= view.num_blocks:
        raise ValueError(f"cannot route blocks [{start}, {end}) of a {view.num_blocks}-block model")
    banned = set(banned)
    eligible = [
        s for s in (view.servers[p] for p in sorted(view.servers))
        if s.state == ServerState.ONLINE and s.peer_id not in banned and s.cache_tokens_left >= min_cache_tokens
        and s.start < end and s.end > start and (adapter is None or adapter in s.adapters)
        and (span_digest is None or same_weights(s, span_digest))
    ]
    covered = [False] * (end - start)
    for s in eligible:
        for block in range(max(s.start, start), min(s.end, end)):
            covered[block - start] = True
    if not all(covered):
        missing = [(a + start, b + start) for a, b in runs_where([not c for c in covered])]
        raise _no_route(missing, model or view.model,
                        _why(view, missing, banned, min_cache_tokens, adapter, span_digest))

    # Per server: fixed cost per hop and seconds per block, both scaled by the jitter factor.
    # Claims are capped by the medians of servers with the client's weights only: others cannot raise the cap.
    peers = view if span_digest is None else SwarmView.from_servers(
        view.num_blocks, [s for s in view.servers.values() if same_weights(s, span_digest)], model=view.model)
    throughput = costed_throughputs(peers, observed, claim_cap=claim_cap)
    fixed: list[float] = []
    per_block: list[float] = []
    for s in eligible:
        factor = 1.0 + rng.random() * ROUTE_JITTER if rng is not None else 1.0
        fixed.append((rtt_s.get(s.peer_id, default_rtt_s) + hop_penalty_s) * factor)
        per_block.append(factor / max(throughput[s.peer_id], MIN_THROUGHPUT))

    # Servers whose span contains block b (they can start or continue a hop at boundary b).
    starting_at: list[list[int]] = [[] for _ in range(end - start)]
    for i, s in enumerate(eligible):
        starting_at[max(s.start, start) - start].append(i)
    best = [math.inf] * (end - start + 1)
    best[0] = 0.0
    back: list[tuple[int, int]] = [(-1, -1)] * (end - start + 1)  # (server index, hop start boundary)
    running: dict[int, tuple[float, int]] = {}  # server index -> (min of best[a] - a * per_block, argmin a)
    for b in range(1, end - start + 1):
        a = b - 1  # boundary a becomes a possible hop start for every server hosting block a
        for i in starting_at[a]:
            running[i] = (math.inf, -1)
        for i, (value, arg) in list(running.items()):
            if eligible[i].end - start < b:  # the span ended before block a: the server is out of reach
                del running[i]
                continue
            candidate = best[a] - a * per_block[i]
            if candidate < value:
                running[i] = value, arg = candidate, a
            cost = value + b * per_block[i] + fixed[i]
            if cost < best[b]:
                best[b], back[b] = cost, (i, arg)

    hops: list[RouteHop] = []
    b = end - start
    for _ in range(end - start):  # at most one hop per block
        if b == 0:
            break
        i, a = back[b]
        server = eligible[i]
        if hops and hops[-1].peer_id == server.peer_id:  # zero-cost split: merge (never worse, see invariants)
            hops[-1] = RouteHop(server.peer_id, a + start, hops[-1].end, server)
        else:
            hops.append(RouteHop(server.peer_id, a + start, b + start, server))
        b = a
    hops.reverse()
    return hops


def costed_throughputs(
    view: SwarmView, observed: Mapping[PeerId, float] = _NOTHING, *, claim_cap: float = CLAIM_CAP,
) -> dict[PeerId, float]:
    """The blocks/s each server of `view` is costed by: observed if measured, else its claim capped (invariants).

    Claims of 0 (a server that has not measured itself yet) are no claim: they never lower a cap. Runs in
    O(blocks x servers per block x log) plus O(sum of span lengths): per-block medians first, then a min per server.
    """
    per_block: list[list[float]] = [[] for _ in range(view.num_blocks)]
    for s in view.servers.values():
        if s.state == ServerState.ONLINE and s.throughput > 0:
            for block in range(max(s.start, 0), min(s.end, view.num_blocks)):
                per_block[block].append(s.throughput)
    low_median = [sorted(c)[(len(c) - 1) // 2] if c else math.inf for c in per_block]
    costed: dict[PeerId, float] = {}
    for s in view.servers.values():
        if s.peer_id in observed:
            costed[s.peer_id] = observed[s.peer_id]
            continue
        typical = min(low_median[max(s.start, 0) : min(s.end, view.num_blocks)], default=math.inf)
        costed[s.peer_id] = min(s.throughput, claim_cap * typical)
    return costed


def route_cost_s(
    route: Sequence[RouteHop],
    *,
    rtt_s: Mapping[PeerId, float],
    hop_penalty_s: float = HOP_PENALTY_S,
    default_rtt_s: float = DEFAULT_RTT_S,
    throughput: Mapping[PeerId, float] | None = None,
) -> float:
    """Expected seconds of one decode step along `route`, by the same model `choose_route` minimizes.

    `throughput`: blocks/s per server as `costed_throughputs` gives them (default: the hops' claims, uncapped).
    """
    return sum(
        rtt_s.get(h.peer_id, default_rtt_s) + hop_penalty_s
        + (h.end - h.start) / max(h.server.throughput if throughput is None else throughput[h.peer_id],
                                  MIN_THROUGHPUT)
        for h in route
    )


def same_weights(server: ServerView, span_digest: Callable[[int, int], bytes]) -> bool:
    """Whether `server` announced the digest the client computes for the server's announced span."""
    return server.span_digest is not None and server.span_digest == span_digest(server.start, server.end)


def _no_route(missing: list[tuple[int, int]], model: str | None, detail: str) -> NoRouteError:
    what = describe_runs(missing)
    verb = "has" if what.startswith("block ") else "have"
    of_model = f" of {model}" if model else ""
    return NoRouteError(f"{what}{of_model} {verb} no server{detail}", missing=missing)


def _why(
    view: SwarmView, missing: list[tuple[int, int]], banned: set[PeerId], min_cache_tokens: int,
    adapter: str | None = None, span_digest: Callable[[int, int], bytes] | None = None,
) -> str:
    # Say why servers that do host a missing block were not used, so "no server" is never a riddle.
    reasons: dict[str, int] = {}
    other_weights = 0
    for s in view.servers.values():
        if not any(s.start < b and s.end > a for a, b in missing):
            continue
        if s.state != ServerState.ONLINE:
            reason = s.state.name.lower()
        elif span_digest is not None and not same_weights(s, span_digest):
            other_weights += 1
            continue
        elif s.peer_id in banned:
            reason = "banned after failures"
        elif adapter is not None and adapter not in s.adapters:
            reason = f"without adapter {adapter!r}"
        else:
            reason = f"without cache for {min_cache_tokens} tokens" if s.cache_tokens_left < min_cache_tokens else ""
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    parts = [f"{n} {r}" for r, n in sorted(reasons.items())]
    if other_weights:
        parts.append(f"{other_weights} server{'s' if other_weights != 1 else ''} with other weights (their span "
                     "digest differs from this client's copy of the model, or is missing)")
    if not parts:
        return ""
    return " (servers there: " + ", ".join(parts) + ")"

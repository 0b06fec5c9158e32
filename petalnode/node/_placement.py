# Which contiguous blocks a server hosts, and when it should move (Petals' block_selection, improved).
#
# Invariants:
# - Pure: swarm view in, window out. Randomness comes only from the `rng` argument; there is no clock.
# - A returned window is always [start, start + k) with 0 <= start and start + k <= num_blocks, k = min(requested,
#   num_blocks).
# - Windows are compared as Petals does (`_choose_best_start`): by the sorted tuple of their per-block throughputs,
#   smallest first. That puts the weakest block first (uncovered blocks, at 0, are filled before anything else),
#   then the next weakest, and so on; on equal-throughput swarms it agrees with "lowest summed throughput" whenever
#   the weakest blocks agree, and unlike a plain sum it never prefers 7 blocks at 1x over a hole plus 6 at 2x.
# - A server's own announcement never counts against its own choice (it "leaves" before choosing), and its current
#   window wins every tie, so re-checking never reloads blocks for nothing.
# - should_move is monotone: it moves only if the number of uncovered blocks strictly falls, or the swarm's weakest
#   block gets faster by MIN_IMPROVEMENT; so a swarm of servers running it cannot oscillate forever.
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

from petalnode.dht import ServerState
from petalnode.identity import PeerId
from petalnode.node._swarm_view import SERVING_STATES, ServerView, SwarmView

MIN_IMPROVEMENT = 1 / 0.75
"""Move only if the weakest block gets this much faster: Petals' default balance_quality=0.75 (current/new < 0.75)."""

_SIGNIFICANT_DIGITS = 9  # throughputs equal to 9 digits are a tie (float sums in different orders differ at 1e-16)


def choose_blocks(
    view: SwarmView,
    num_blocks_to_host: int,
    *,
    own_peer_id: PeerId | None = None,
    rng: random.Random,
) -> tuple[int, int]:
    """The window of `num_blocks_to_host` blocks where this server adds the most to the weakest blocks.

    Throughput of ONLINE and JOINING servers counts, except `own_peer_id`'s; a server announcing 0 (not measured
    yet) counts at the swarm's median throughput. Among equally good windows:
    1. the server's current window (its announcement in `view`, if any and of the same length) is kept;
    2. otherwise windows "aligned" to the run of equal throughput they sit in are preferred: those starting a
       multiple of k blocks after the run's start, or ending a multiple of k before its end. Filling a gap from
       either edge on that grid never wastes capacity (a gap of L blocks still needs ceil(L / k) servers), so
       one-by-one joiners tile the model exactly, and a second wave doubles coverage instead of piling up;
    3. the pick among those is random (`rng`), so servers that start at the same moment and see the same view
       land on different tiles of the grid (about 2 * ceil(L / k) choices per gap). They announce JOINING, then
       re-check: each now sees the others, rule 1 keeps whoever is alone, and exact duplicates of a JOINING
       window resolve by peer id (the lower id stays, the higher one moves). An empty swarm is the exception:
       there every server starts at block 0, as the first server of a swarm should, and a simultaneous first
       wave splits up at the re-check through the duplicate rule.

    Args:
        view: the swarm of one model.
        num_blocks_to_host: k; with k >= num_blocks the server hosts everything.
        own_peer_id: this server, if it may already be in `view`.
        rng: source of tie-breaking randomness (inject a seeded one in tests).

    Returns:
        (start, end) with end - start == min(k, num_blocks).
    """
    if num_blocks_to_host <= 0:
        raise ValueError(f"a server hosts at least one block, got {num_blocks_to_host}")
    k = min(num_blocks_to_host, view.num_blocks)
    if k == view.num_blocks:
        return 0, k
    own = view.servers.get(own_peer_id) if own_peer_id is not None else None
    others = view.without(own_peer_id) if own is not None else view
    levels = _levels(others)
    keys = _window_keys(levels, k)
    best_key = min(keys)
    best = [s for s, key in enumerate(keys) if key == best_key]
    if own is not None and own.length == k:
        if own.start in best:
            return own.start, own.end
        if own.state == ServerState.JOINING and _keeps_duplicate(view, own, k):
            return own.start, own.end
    if not any(levels):
        return 0, k  # an empty swarm starts at block 0 (simultaneous first joiners then split by the duplicate rule)
    aligned = _aligned_starts(levels, k, best)
    start = rng.choice(aligned or best)
    return start, start + k


def should_move(
    view: SwarmView,
    own_peer_id: PeerId,
    *,
    min_improvement: float = MIN_IMPROVEMENT,
    rng: random.Random,
) -> tuple[int, int] | None:
    """Rebalancing with hysteresis: the window to move to, or None to stay.

    Pretend this server leaves, ask `choose_blocks` where it would go, and move only if that clearly helps the
    whole swarm: it strictly reduces the number of blocks nobody hosts, or (with every block hosted before and
    after) it makes the weakest block at least `min_improvement` times faster. Petals also simulates every other
    server moving in turn; we do not, so the check stays O(blocks x window) per call even with 1,000 servers,
    and one server's decision never depends on guesses about the others.

    Raises:
        ValueError: `own_peer_id` is not in `view` (a server with no announcement should call `choose_blocks`).
    """
    if min_improvement < 1.0:
        raise ValueError(f"min_improvement must be >= 1, got {min_improvement}")
    own = view.servers.get(own_peer_id)
    if own is None:
        raise ValueError(f"server {own_peer_id} is not in the swarm view; choose blocks instead of moving")
    target = choose_blocks(view, own.length, own_peer_id=own_peer_id, rng=rng)
    if target == (own.start, own.end):
        return None
    moved = view.with_server(dataclasses.replace(own, start=target[0], end=target[1]))
    holes_before = view.block_coverage(SERVING_STATES).count(0)
    holes_after = moved.block_coverage(SERVING_STATES).count(0)
    if holes_after < holes_before:
        return target
    weakest_before = min(_levels(view))
    weakest_after = min(_levels(moved))
    if holes_before == holes_after == 0 and weakest_after > weakest_before * min_improvement:
        return target
    return None


def _window_keys(levels: list[float], k: int) -> list[tuple[float, ...]]:
    # Petals' comparison: the sorted throughputs of the window, weakest first, compared lexicographically.
    return [tuple(sorted(levels[s : s + k])) for s in range(len(levels) - k + 1)]


def _levels(view: SwarmView) -> list[float]:
    # Per-block throughput of ONLINE and JOINING servers, quantized so float noise does not break ties. A server
    # announcing 0 (a JOINING server has not measured itself yet) counts at the median announced throughput (1.0
    # if none): it is about to host those blocks, and counting it as 0 would let a whole wave pile onto it.
    serving = [view.servers[p] for p in sorted(view.servers) if view.servers[p].state in SERVING_STATES]
    known = sorted(s.throughput for s in serving if s.throughput > 0)
    nominal = known[len(known) // 2] if known else 1.0
    totals = [0.0] * view.num_blocks
    for server in serving:
        for block in range(server.start, server.end):
            totals[block] += server.throughput if server.throughput > 0 else nominal
    return [float(f"{x:.{_SIGNIFICANT_DIGITS}g}") for x in totals]


def _aligned_starts(levels: list[float], k: int, candidates: list[int]) -> list[int]:
    # A run is a maximal stretch of equal (quantized) throughput; a window is aligned if it starts on the k-grid
    # anchored at the start of the run holding its first block, or ends on the grid anchored at the end of the run
    # holding its last block.
    run_start, run_end = [0] * len(levels), [0] * len(levels)
    for i in range(len(levels)):
        run_start[i] = run_start[i - 1] if i and levels[i - 1] == levels[i] else i
    for i in reversed(range(len(levels))):
        run_end[i] = run_end[i + 1] if i + 1 < len(levels) and levels[i + 1] == levels[i] else i + 1
    return [
        s for s in candidates
        if (s - run_start[s]) % k == 0 or (run_end[s + k - 1] - (s + k)) % k == 0
    ]


def _keeps_duplicate(view: SwarmView, own: ServerView, k: int) -> bool:
    # Several JOINING servers that picked the very same window all see each other on re-check; without a rule
    # they would all move (and might collide again). The lowest peer id keeps the window if, ignoring the
    # higher-id duplicates, it would be among the best.
    twins = [
        p for p, s in view.servers.items()
        if p != own.peer_id and s.state == ServerState.JOINING and (s.start, s.end) == (own.start, own.end)
    ]
    if not twins or any(p < own.peer_id for p in twins):
        return False
    rest = view.without(own.peer_id)
    for twin in twins:
        rest = rest.without(twin)
    keys = _window_keys(_levels(rest), k)
    return keys[own.start] == min(keys)


JOIN_RECHECKS = 2
"""Re-checks of a joining server's choice: a peer that announced after our first look is only seen at the second."""


def join_recheck_waits(*, jitter_s: float, fixed_blocks: bool, rng: random.Random) -> Iterator[float]:
    """The waits (seconds) before each re-check of a joining server's window; none if its blocks are fixed.

    Servers that start together all saw the same swarm; each waits a random part of `jitter_s` and looks again.
    Lazy: each wait is drawn from `rng` only when the previous re-check is done, so the draws interleave with the
    re-checks' own use of `rng` (placement is reproducible for a given seed).
    """
    if fixed_blocks or jitter_s <= 0:
        return
    for _ in range(JOIN_RECHECKS):
        yield rng.uniform(0.5, 1.0) * jitter_s


@dataclasses.dataclass(frozen=True, slots=True)
class Rebalance:
    """A periodic rebalancing check's outcome: `target` to move to, or None to stay (`reason` says why);
    `skipped`: the check could not be made at all (worth telling the operator)."""

    target: tuple[int, int] | None
    reason: str
    skipped: bool = False


def rebalance_target(
    view: SwarmView, own_peer_id: PeerId, *, hosted: tuple[int, int], rng: random.Random,
    min_improvement: float = MIN_IMPROVEMENT,
) -> Rebalance:
    """Should a server hosting `hosted` move? The rules around `should_move`, in order:

    1. Our own announcement is not in the view (we are cut off, or our last store reached none of the key's
       holders yet): there is nothing to weigh a move against; stay and look again next period.
    2. Of the serving servers on exactly our blocks, only the one with the highest peer id considers moving:
       they would all see the same gain and all move (a herd, leaving our blocks empty).
    3. Otherwise `should_move` decides (with hysteresis); a target equal to `hosted` is staying.
    """
    if own_peer_id not in view.servers:
        return Rebalance(None, "our own announcement is not in the swarm view", skipped=True)
    twins = [s.peer_id for s in view.servers.values() if (s.start, s.end) == hosted and s.state in SERVING_STATES]
    if max(twins, default=own_peer_id) > own_peer_id:
        return Rebalance(None, "a server with a higher peer id hosts the same blocks")
    target = should_move(view, own_peer_id, min_improvement=min_improvement, rng=rng)
    if target is None or target == hosted:
        return Rebalance(None, "no clear gain")
    return Rebalance(target, "the swarm gains")

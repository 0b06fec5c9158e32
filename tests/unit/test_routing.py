"""Route choice: the cheapest chain of eligible servers through [start, end), and NoRouteError when there is none."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode.dht import ServerState
from petalnode.errors import NoRouteError, PetalnodeError
from petalnode.identity import PeerId
from petalnode.node._routing import CLAIM_CAP, RouteHop, choose_route, costed_throughputs, route_cost_s
from petalnode.node._swarm_view import ServerView, SwarmView

ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE


def pid(i: int) -> PeerId:
    return PeerId(hashlib.sha256(f"peer{i}".encode()).digest()[:20])


def server(i: int, start: int, end: int, throughput: float = 100.0, *, state: ServerState = ONLINE,
           cache: int = 1000, adapters: tuple[str, ...] = ()) -> ServerView:
    return ServerView(
        peer_id=pid(i), start=start, end=end, throughput=throughput, state=state, cache_tokens_left=cache,
        addresses=(), public_name=None, version="0.1.0", adapters=adapters,
    )


def swarm(num_blocks: int, *servers: ServerView) -> SwarmView:
    return SwarmView.from_servers(num_blocks, servers)


def spans(route: list[RouteHop]) -> list[tuple[PeerId, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in route]


def test_single_server_covering_all() -> None:
    view = swarm(10, server(1, 0, 10))
    route = choose_route(view, rtt_s={})
    assert spans(route) == [(pid(1), 0, 10)]
    assert route[0].server is view.servers[pid(1)]


def test_two_halves() -> None:
    assert spans(choose_route(swarm(10, server(1, 0, 5), server(2, 5, 10)), rtt_s={})) == [
        (pid(1), 0, 5), (pid(2), 5, 10),
    ]


def test_one_server_beats_two_equal_hops_through_the_hop_penalty() -> None:
    view = swarm(10, server(1, 0, 10), server(2, 0, 5), server(3, 5, 10))
    rtt = {pid(1): 0.01, pid(2): 0.01, pid(3): 0.01}
    assert spans(choose_route(view, rtt_s=rtt)) == [(pid(1), 0, 10)]


def test_two_fast_halves_beat_one_very_slow_server() -> None:
    # Slow: 10 / 10 = 1 s per step; halves: 2 x (0.01 + 0.002 + 5 / 100) = 0.124 s.
    view = swarm(10, server(1, 0, 10, throughput=10.0), server(2, 0, 5), server(3, 5, 10))
    rtt = {pid(1): 0.01, pid(2): 0.01, pid(3): 0.01}
    assert spans(choose_route(view, rtt_s=rtt)) == [(pid(2), 0, 5), (pid(3), 5, 10)]


def test_a_big_hop_penalty_prefers_the_slower_single_server() -> None:
    view = swarm(10, server(1, 0, 10, throughput=10.0), server(2, 0, 5), server(3, 5, 10))
    assert spans(choose_route(view, rtt_s={}, hop_penalty_s=2.0)) == [(pid(1), 0, 10)]


def test_rtt_matters() -> None:
    view = swarm(10, server(1, 0, 10), server(2, 0, 10))
    assert spans(choose_route(view, rtt_s={pid(1): 0.2, pid(2): 0.01})) == [(pid(2), 0, 10)]
    assert spans(choose_route(view, rtt_s={pid(1): 0.01, pid(2): 0.2})) == [(pid(1), 0, 10)]
    # Unmeasured servers cost default_rtt_s.
    assert spans(choose_route(view, rtt_s={pid(1): 0.2}, default_rtt_s=0.01)) == [(pid(2), 0, 10)]
    assert spans(choose_route(view, rtt_s={pid(1): 0.2}, default_rtt_s=0.5)) == [(pid(1), 0, 10)]


def test_a_route_may_switch_servers_mid_span() -> None:
    # Server 2 alone: 0.05 + 0.002 + 10 / 100 = 0.152 s. Server 1 (near, fast) for [0, 3), then server 2 for the
    # rest of its span: (0.001 + 0.002 + 3 / 1000) + (0.05 + 0.002 + 7 / 100) = 0.128 s.
    view = swarm(10, server(1, 0, 3, throughput=1000.0), server(2, 0, 10))
    assert spans(choose_route(view, rtt_s={pid(1): 0.001})) == [(pid(1), 0, 3), (pid(2), 3, 10)]
    assert spans(choose_route(view, rtt_s={pid(1): 0.05})) == [(pid(2), 0, 10)]


def test_banned_servers_are_avoided() -> None:
    view = swarm(10, server(1, 0, 10), server(2, 0, 10, throughput=1.0))
    assert spans(choose_route(view, rtt_s={}, banned={pid(1)})) == [(pid(2), 0, 10)]
    with pytest.raises(NoRouteError) as info:
        choose_route(view, rtt_s={}, banned=[pid(1), pid(2)])
    assert info.value.missing == [(0, 10)]
    assert "2 banned after failures" in str(info.value)


def test_partial_coverage_raises_with_the_exact_missing_runs() -> None:
    view = SwarmView.from_servers(30, [server(1, 0, 12), server(2, 15, 20), server(3, 21, 29)], model="smol")
    with pytest.raises(NoRouteError) as info:
        choose_route(view, rtt_s={})
    assert info.value.missing == [(12, 15), (20, 21), (29, 30)]
    assert str(info.value) == "blocks 12-14, 20 and 29 of smol have no server"
    assert isinstance(info.value, PetalnodeError)
    with pytest.raises(NoRouteError, match=r"^blocks 12-14 of M have no server$"):
        choose_route(swarm(15, server(1, 0, 12)), rtt_s={}, model="M")
    with pytest.raises(NoRouteError, match=r"^block 3 has no server$"):
        choose_route(swarm(4, server(1, 0, 3)), rtt_s={})


def test_cache_token_filter() -> None:
    view = swarm(10, server(1, 0, 10, cache=100), server(2, 0, 10, throughput=1.0, cache=5000))
    assert spans(choose_route(view, rtt_s={}, min_cache_tokens=100)) == [(pid(1), 0, 10)]
    assert spans(choose_route(view, rtt_s={}, min_cache_tokens=101)) == [(pid(2), 0, 10)]
    with pytest.raises(NoRouteError, match="without cache for 6000 tokens"):
        choose_route(view, rtt_s={}, min_cache_tokens=6000)


def test_an_adapter_routes_only_through_servers_that_have_it() -> None:
    view = swarm(8, server(1, 0, 8, 1000.0), server(2, 0, 4, adapters=("a",)), server(3, 4, 8, adapters=("a", "b")))
    assert spans(choose_route(view, rtt_s={})) == [(pid(1), 0, 8)]
    assert spans(choose_route(view, rtt_s={}, adapter="a")) == [(pid(2), 0, 4), (pid(3), 4, 8)]
    with pytest.raises(NoRouteError, match="without adapter 'b'") as info:
        choose_route(view, rtt_s={}, adapter="b")
    assert info.value.missing == [(0, 4)]


def test_sub_range_for_failover() -> None:
    view = swarm(30, server(1, 0, 30, throughput=1.0), server(2, 0, 12), server(3, 10, 20), server(4, 18, 30))
    route = choose_route(view, start=12, end=20, rtt_s={})
    assert spans(route) == [(pid(3), 12, 20)]
    route = choose_route(view, start=5, end=25, rtt_s={})
    assert route[0].start == 5 and route[-1].end == 25
    assert [h.peer_id for h in route] == [pid(2), pid(3), pid(4)]
    # Only the sub-range must be covered: blocks outside it may have no server.
    assert spans(choose_route(swarm(30, server(1, 10, 20)), start=12, end=15, rtt_s={})) == [(pid(1), 12, 15)]
    with pytest.raises(NoRouteError) as info:
        choose_route(swarm(30, server(1, 10, 20)), start=5, end=25, rtt_s={})
    assert info.value.missing == [(5, 10), (20, 25)]
    for bad in [(5, 5), (-1, 3), (0, 31)]:
        with pytest.raises(ValueError):
            choose_route(swarm(30, server(1, 0, 30)), start=bad[0], end=bad[1], rtt_s={})


def test_joining_and_offline_servers_are_never_used() -> None:
    view = swarm(10, server(1, 0, 10, state=JOINING), server(2, 0, 10, state=OFFLINE), server(3, 0, 10, 0.5))
    assert spans(choose_route(view, rtt_s={pid(1): 0.0, pid(2): 0.0})) == [(pid(3), 0, 10)]
    with pytest.raises(NoRouteError, match=r"\(servers there: 1 joining, 1 offline\)"):
        choose_route(view.without(pid(3)), rtt_s={})


def test_a_zero_throughput_server_is_a_last_resort_not_an_error() -> None:
    view = swarm(4, server(1, 0, 4, throughput=0.0), server(2, 0, 4, throughput=1.0))
    assert spans(choose_route(view, rtt_s={})) == [(pid(2), 0, 4)]
    assert spans(choose_route(view.without(pid(2)), rtt_s={})) == [(pid(1), 0, 4)]


def test_jitter_spreads_clients_over_equal_servers() -> None:
    view = swarm(10, *(server(i, 0, 10) for i in range(4)))
    assert len({choose_route(view, rtt_s={})[0].peer_id for _ in range(10)}) == 1  # no rng: deterministic
    chosen = {choose_route(view, rtt_s={}, rng=random.Random(seed))[0].peer_id for seed in range(40)}
    assert chosen == {pid(i) for i in range(4)}
    # Jitter is small: a clearly better server still wins every time.
    view = view.with_server(server(9, 0, 10, throughput=200.0))
    assert {choose_route(view, rtt_s={}, rng=random.Random(s))[0].peer_id for s in range(40)} == {pid(9)}


def test_route_cost_matches_the_model() -> None:
    view = swarm(10, server(1, 0, 5, throughput=10.0), server(2, 5, 10, throughput=50.0))
    route = choose_route(view, rtt_s={pid(1): 0.02})
    expected = (0.02 + 0.002 + 5 / 10) + (0.05 + 0.002 + 5 / 50)
    assert route_cost_s(route, rtt_s={pid(1): 0.02}) == pytest.approx(expected)


def brute_force_cost(
    view: SwarmView, start: int, end: int, rtt: dict[PeerId, float], observed: dict[PeerId, float] | None = None,
) -> float:
    servers = [s for s in view.servers.values() if s.state == ONLINE]
    throughput = brute_force_throughputs(view, observed or {})

    @functools.cache
    def best(a: int) -> float:  # cheapest way from boundary a to `end`
        if a == end:
            return 0.0
        options = [
            rtt.get(s.peer_id, 0.05) + 0.002 + (b - a) / max(throughput[s.peer_id], 1e-3) + best(b)
            for s in servers if s.start <= a < s.end
            for b in range(a + 1, min(s.end, end) + 1)
        ]
        return min(options, default=float("inf"))

    return best(start)


def brute_force_throughputs(view: SwarmView, observed: dict[PeerId, float]) -> dict[PeerId, float]:
    """The invariant of _routing.py, written out plainly: observed, else the claim capped at CLAIM_CAP x the least,
    over the server's blocks, of the low median of the positive claims of the online servers hosting the block."""
    result = {}
    for s in view.servers.values():
        if s.peer_id in observed:
            result[s.peer_id] = observed[s.peer_id]
            continue
        cap = math.inf
        for block in range(s.start, s.end):
            claims = sorted(o.throughput for o in view.servers.values()
                            if o.state == ONLINE and o.throughput > 0 and o.start <= block < o.end)
            if claims:
                cap = min(cap, CLAIM_CAP * claims[(len(claims) - 1) // 2])
        result[s.peer_id] = min(s.throughput, cap)
    return result


cases = st.integers(min_value=1, max_value=12).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(
        st.tuples(st.integers(0, n - 1), st.integers(1, n), st.sampled_from([1.0, 5.0, 20.0, 100.0]),
                  st.sampled_from([ONLINE, ONLINE, JOINING]), st.sampled_from([None, 0.0, 0.01, 0.3]),
                  st.sampled_from([None, None, 0.5, 50.0, 1000.0])),
        max_size=8,
    ),
    st.integers(0, n - 1),
    st.integers(1, n),
))


@settings(max_examples=200, deadline=None)
@given(cases)
def test_route_is_a_valid_chain_and_optimal(case: tuple) -> None:
    n, specs, start, length = case
    end = min(n, start + length)
    view = swarm(n, *(server(i, a, min(n, a + k), thr, state=state)
                      for i, (a, k, thr, state, *_) in enumerate(specs)))
    rtt = {pid(i): r for i, (*_, r, _) in enumerate(specs) if r is not None}
    observed = {pid(i): o for i, (*_, o) in enumerate(specs) if o is not None}
    optimum = brute_force_cost(view, start, end, rtt, observed)
    try:
        route = choose_route(view, start=start, end=end, rtt_s=rtt, observed=observed)
    except NoRouteError as e:
        assert optimum == float("inf")
        assert e.missing and all(start <= a < b <= end for a, b in e.missing)
        return
    assert route[0].start == start and route[-1].end == end
    for hop, following in itertools.pairwise(route):
        assert hop.end == following.start and hop.peer_id != following.peer_id
    for hop in route:
        assert hop.start < hop.end and hop.server.start <= hop.start and hop.end <= hop.server.end
        assert hop.server.state == ONLINE
    costed = costed_throughputs(view, observed)
    assert costed == pytest.approx(brute_force_throughputs(view, observed))
    assert route_cost_s(route, rtt_s=rtt, throughput=costed) == pytest.approx(optimum)


@pytest.mark.timeout(60)  # a liveness bound; speed itself is a benchmark's job, not a timed test on a shared machine
def test_routes_1000_servers_and_80_blocks() -> None:
    rng = random.Random(0)
    servers = []
    for i in range(1000):
        length = rng.randint(4, 30)
        start = rng.randint(0, 80 - length)
        servers.append(server(i, start, start + length, throughput=rng.uniform(1, 100)))
    view = swarm(80, *servers)
    rtt = {s.peer_id: rng.uniform(0.001, 0.2) for s in servers[::2]}
    route = choose_route(view, rtt_s=rtt, rng=rng)
    assert route[0].start == 0 and route[-1].end == 80
    assert all(a.end == b.start for a, b in itertools.pairwise(route))


def test_a_1000x_claimer_is_not_chosen_over_an_honest_measured_server() -> None:
    # Server 1 claims 100 blocks/s and ran at 80 for us; server 2 claims 100000 and ran at 0.5.
    view = swarm(10, server(1, 0, 10, throughput=100.0), server(2, 0, 10, throughput=100_000.0))
    assert spans(choose_route(view, rtt_s={}, claim_cap=math.inf)) == [(pid(2), 0, 10)]  # claims alone: the liar
    observed = {pid(1): 80.0, pid(2): 0.5}
    assert spans(choose_route(view, rtt_s={}, observed=observed)) == [(pid(1), 0, 10)]
    # Measured is measured: even trusting every claim, the liar's measurement is what counts.
    assert spans(choose_route(view, rtt_s={}, observed=observed, claim_cap=math.inf)) == [(pid(1), 0, 10)]
    assert {choose_route(view, rtt_s={}, observed=observed, rng=random.Random(s))[0].peer_id
            for s in range(20)} == {pid(1)}


def test_an_unmeasured_liar_is_capped_by_the_claims_around_it() -> None:
    honest = [server(i, 0, 10, throughput=100.0 + i) for i in range(3)]
    liar = server(9, 0, 10, throughput=100_000.0)
    view = swarm(10, *honest, liar)
    costed = costed_throughputs(view)
    # Low median of {100, 101, 102, 100000} is 101: the liar counts as 4 x 101, the honest claims as they are.
    assert costed[pid(9)] == pytest.approx(CLAIM_CAP * 101.0)
    assert [costed[pid(i)] for i in range(3)] == [100.0, 101.0, 102.0]
    # Capped, its claim no longer outweighs a round trip: a near honest server wins over a far liar, which
    # uncapped would win by 10 / 100000 s against 10 / 100 s.
    rtt = {pid(0): 0.001, pid(1): 0.2, pid(2): 0.2, pid(9): 0.09}
    assert spans(choose_route(view, rtt_s=rtt, claim_cap=math.inf)) == [(pid(9), 0, 10)]
    assert spans(choose_route(view, rtt_s=rtt)) == [(pid(0), 0, 10)]
    # A server measured slower than its cap is costed by its measurement, an honest fast one by its own.
    assert costed_throughputs(view, {pid(9): 3.0})[pid(9)] == 3.0
    assert costed_throughputs(view, {pid(0): 5000.0})[pid(0)] == 5000.0


def test_the_cap_compares_servers_block_by_block_and_ignores_zero_claims() -> None:
    view = swarm(10, server(1, 0, 5, throughput=10.0), server(2, 5, 10, throughput=10_000.0),
                 server(3, 0, 10, throughput=0.0), server(4, 4, 6, throughput=20.0, state=JOINING))
    costed = costed_throughputs(view)
    # Server 2 shares blocks only with server 3 (no claim yet) and a joining server: nothing to compare with.
    assert costed[pid(2)] == 10_000.0
    assert costed[pid(1)] == 10.0 and costed[pid(3)] == 0.0
    # A second opinion on server 2's blocks caps it.
    costed = costed_throughputs(view.with_server(server(5, 8, 10, throughput=50.0)))
    assert costed[pid(2)] == CLAIM_CAP * 50.0


def test_a_liar_spanning_blocks_nobody_else_hosts_is_capped_by_the_blocks_others_do() -> None:
    # Blocks 0-4: honest servers at 10 and 12 and the liar; blocks 5-9: the liar alone. Its cap comes from the
    # shared blocks (low median of {10, 12, 1e6} = 12), not from its own claim on the blocks only it hosts.
    view = swarm(10, server(1, 0, 5, throughput=10.0), server(2, 0, 5, throughput=12.0),
                 server(3, 0, 10, throughput=1e6))
    assert costed_throughputs(view)[pid(3)] == CLAIM_CAP * 12.0

"""Fair shares per peer (node/_fair_share.py): session count, cache share and request rate, on an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode.errors import BusyError, ConfigError
from petalnode.node._fair_share import (
    FairShareLedger,
    FairShareLimits,
    PeerUsage,
    SessionGrant,
    check_session,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


LIMITS = FairShareLimits(max_sessions=4, max_cache_share=0.5, requests_per_s=10.0, request_burst=20.0)


@pytest.mark.parametrize(
    ("usage", "tokens", "capacity", "refused"),
    [
        (PeerUsage(0, 0), 100, 1000, None),  # a first session
        (PeerUsage(0, 0), 1000, 1000, None),  # a peer holding nothing may ask for the whole cache (if it fits)
        (PeerUsage(1, 400), 100, 1000, None),  # 500 of 1000 is exactly the share
        (PeerUsage(1, 400), 101, 1000, "cache tokens"),  # one token over the share
        (PeerUsage(1, 1000), 1, 1000, "cache tokens"),  # a peer that took the whole cache gets no second session
        (PeerUsage(3, 30), 10, 1000, None),
        (PeerUsage(4, 40), 10, 1000, "sessions open"),  # the fifth session of a peer
    ],
)
def test_check_session_table(usage: PeerUsage, tokens: int, capacity: int, refused: str | None) -> None:
    if refused is None:
        check_session(LIMITS, usage, tokens=tokens, capacity_tokens=capacity, peer="p")
    else:
        with pytest.raises(BusyError, match=refused):
            check_session(LIMITS, usage, tokens=tokens, capacity_tokens=capacity, peer="p")


def test_the_refusal_names_the_peer_and_the_limit() -> None:
    with pytest.raises(BusyError, match=r"peer p1 .*\(max 4 sessions per peer\)"):
        check_session(LIMITS, PeerUsage(4, 0), tokens=1, capacity_tokens=100, peer="p1")
    with pytest.raises(BusyError, match=r"share of 50 \(50% of this server's 100\)"):
        check_session(LIMITS, PeerUsage(1, 50), tokens=1, capacity_tokens=100, peer="p1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_sessions": 0},
        {"max_cache_share": 0.0},
        {"max_cache_share": 1.5},
        {"requests_per_s": 0.0},
        {"requests_per_s": float("inf")},
        {"request_burst": 0.5},
    ],
)
def test_nonsensical_limits_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FairShareLimits(**kwargs)


def test_ledger_counts_sessions_per_peer_and_gives_them_back() -> None:
    ledger = FairShareLedger(LIMITS, clock=FakeClock())
    grants = [ledger.admit_session("a", tokens=100, capacity_tokens=1000) for _ in range(4)]
    with pytest.raises(BusyError, match="sessions open"):
        ledger.admit_session("a", tokens=1, capacity_tokens=1000)
    # Another peer is not affected by a's usage.
    ledger.admit_session("b", tokens=500, capacity_tokens=1000)
    assert ledger.usage("a") == PeerUsage(4, 400)
    ledger.release(grants[0])
    assert ledger.usage("a") == PeerUsage(3, 300)
    ledger.admit_session("a", tokens=100, capacity_tokens=1000)
    with pytest.raises(BusyError, match="cache tokens"):
        ledger.admit_session("b", tokens=1, capacity_tokens=1000)
    # A refusal records nothing.
    assert ledger.usage("b") == PeerUsage(1, 500)


def test_request_rate_is_a_token_bucket_per_peer() -> None:
    clock = FakeClock()
    ledger = FairShareLedger(LIMITS, clock=clock)
    for _ in range(20):  # the burst
        ledger.check_request("a")
    with pytest.raises(BusyError, match=r"request rate here \(10 calls/s, bursts of 20\)"):
        ledger.check_request("a")
    ledger.check_request("b")  # b's bucket is its own
    clock.now += 0.1  # one call back at 10/s
    ledger.check_request("a")
    with pytest.raises(BusyError):
        ledger.check_request("a")


def test_the_peer_table_is_bounded_and_never_forgets_a_peer_holding_sessions() -> None:
    clock = FakeClock()
    ledger = FairShareLedger(LIMITS, clock=clock, max_peers=3)
    ledger.admit_session("holder", tokens=10, capacity_tokens=100)
    for i in range(100):
        ledger.check_request(f"p{i}")
        assert len(ledger) <= 3
    assert ledger.usage("holder") == PeerUsage(1, 10)


peers = st.sampled_from(["a", "b", "c"])
ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), peers, st.integers(1, 600)),
        st.tuples(st.just("close"), peers, st.integers(0, 10)),
        st.tuples(st.just("call"), peers, st.floats(0.0, 0.5)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    capacity=st.integers(100, 4000),
    share=st.floats(0.05, 1.0),
    max_sessions=st.integers(1, 8),
    rate=st.floats(1.0, 100.0),
    burst=st.integers(1, 50),
)
def test_no_peer_ever_exceeds_its_share(
    ops: list, capacity: int, share: float, max_sessions: int, rate: float, burst: int
) -> None:
    """Whatever peers do, each holds at most max_sessions sessions and at most its share of the cache beyond its
    first session, and makes at most burst + rate x elapsed calls."""
    limits = FairShareLimits(max_sessions=max_sessions, max_cache_share=share, requests_per_s=rate, request_burst=burst)
    clock = FakeClock()
    ledger = FairShareLedger(limits, clock=clock)
    held: dict[str, list[SessionGrant]] = {"a": [], "b": [], "c": []}
    calls = dict.fromkeys(held, 0)
    for op, peer, arg in ops:
        if op == "open":
            try:
                held[peer].append(ledger.admit_session(peer, tokens=arg, capacity_tokens=capacity))
            except BusyError:
                pass
        elif op == "close" and held[peer]:
            ledger.release(held[peer].pop(arg % len(held[peer])))
        elif op == "call":
            clock.now += arg
            try:
                ledger.check_request(peer)
                calls[peer] += 1
            except BusyError:
                pass
        for name, grants in held.items():
            assert len(grants) <= max_sessions
            if len(grants) > 1:
                assert sum(g.tokens for g in grants) <= int(share * capacity)
            assert ledger.usage(name) == PeerUsage(len(grants), sum(g.tokens for g in grants))
            assert calls[name] <= burst + rate * clock.now + 1e-9


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(64, 100_000), data=st.data())
def test_an_idle_server_admits_a_single_normal_client(capacity: int, data: st.DataObject) -> None:
    """Default limits: a lone client is never refused for fairness when it opens one session of any size that fits
    the cache, or up to 16 sessions that together take at most half of it; its calls at a steady 200 per second
    (one step per token per hop, beyond any CPU server's speed) never hit the rate."""
    clock = FakeClock()
    ledger = FairShareLedger(FairShareLimits(), clock=clock)
    if data.draw(st.booleans()):
        lengths = [data.draw(st.integers(1, capacity))]
    else:
        count = data.draw(st.integers(1, 16))
        lengths = [data.draw(st.integers(1, max(1, capacity // (2 * count)))) for _ in range(count)]
    for tokens in lengths:
        ledger.admit_session("client", tokens=tokens, capacity_tokens=capacity)
    for _ in range(2000):
        clock.now += 0.005
        ledger.check_request("client")

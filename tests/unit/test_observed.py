"""Observed speeds: decayed means of round trips and step latencies, the compute floor, and the discount decision."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode.identity import PeerId
from petalnode.node._observed import (
    DISCOUNT_MEMORY_S,
    DISCOUNT_RATIO,
    HALF_LIFE_S,
    MIN_COMPUTE_FRACTION,
    DecayingMean,
    ObservedSpeeds,
    compute_s_per_block,
    is_overclaim,
)


def pid(i: int) -> PeerId:
    return PeerId(hashlib.sha256(f"peer{i}".encode()).digest()[:20])


def test_a_decaying_mean_weighs_samples_by_their_age() -> None:
    mean = DecayingMean(half_life_s=10.0)
    assert mean.mean is None and mean.weight(0.0) == 0.0
    mean.add(1.0, now=0.0)
    mean.add(4.0, now=10.0)  # the first sample is one half-life old: weight 0.5 against 1
    assert mean.mean == pytest.approx((0.5 * 1.0 + 4.0) / 1.5)
    assert mean.weight(10.0) == pytest.approx(1.5)
    assert mean.weight(30.0) == pytest.approx(1.5 / 4)
    mean.add(4.0, now=5.0)  # a clock that went backwards decays nothing
    assert mean.weight(10.0) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        DecayingMean(0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.001, 10.0), min_size=1, max_size=50), st.floats(0.01, 100.0))
def test_a_server_that_changed_speed_is_relearned_within_a_few_half_lives(old: list[float], new: float) -> None:
    # However many old samples (up to 50 here), after ten half-lives of new ones at one per half-life the mean is
    # the new value within 3% of the spread (old weight <= 50 / 1024, against about 2 for the new ones).
    mean = DecayingMean(half_life_s=1.0)
    for value in old:
        mean.add(value, now=0.0)
    for t in range(1, 11):
        mean.add(new, now=float(t))
    assert mean.mean is not None
    spread = max(abs(v - new) for v in old)
    assert abs(mean.mean - new) <= 0.03 * spread + 1e-9
    assert min([*old, new]) - 1e-9 <= mean.mean <= max([*old, new]) + 1e-9


def test_compute_per_block_subtracts_the_round_trip_and_is_floored() -> None:
    assert compute_s_per_block(0.05, 0.01, 4) == pytest.approx(0.01)
    # A step no slower than the probe: noise, not an infinitely fast server.
    assert compute_s_per_block(0.01, 0.02, 2) == pytest.approx(MIN_COMPUTE_FRACTION * 0.01 / 2)


@given(st.floats(0.0, 10.0), st.floats(0.0, 10.0), st.integers(1, 100))
def test_observed_throughput_is_finite_and_bounded_by_the_latency(latency: float, rtt: float, blocks: int) -> None:
    speeds = ObservedSpeeds()
    speeds.record_rtt(pid(1), rtt, now=0.0)
    speeds.record_step(pid(1), blocks, latency + 1e-6, now=0.0)
    throughput = speeds.throughput(pid(1), now=0.0)
    assert throughput is not None and math.isfinite(throughput) and throughput > 0
    assert throughput <= blocks / (MIN_COMPUTE_FRACTION * (latency + 1e-6)) * (1 + 1e-9)


def test_observed_throughput_from_steps_minus_the_probed_round_trip() -> None:
    speeds = ObservedSpeeds()
    assert speeds.throughput(pid(1), 0.0) is None and speeds.throughputs(0.0) == {}
    assert speeds.record_rtt(pid(1), 0.01, now=0.0) == pytest.approx(0.01)
    for t in range(5):
        speeds.record_step(pid(1), 10, 0.11, now=float(t))  # 0.1 s of compute for 10 blocks: 100 blocks/s
    assert speeds.throughput(pid(1), 5.0) == pytest.approx(100.0)
    assert speeds.throughputs(5.0) == {pid(1): pytest.approx(100.0)}
    assert speeds.rtt_s(pid(1)) == pytest.approx(0.01) and speeds.rtt_s(pid(2)) is None
    assert not speeds.needs_probe(pid(1), 0.0) and speeds.needs_probe(pid(2), 0.0)
    assert speeds.needs_probe(pid(1), 3 * HALF_LIFE_S)  # a round trip measured long ago is measured again
    # A probe alone measures no throughput.
    speeds.record_rtt(pid(2), 0.01, now=0.0)
    assert speeds.throughput(pid(2), 0.0) is None


def test_a_stale_measurement_is_forgotten_so_the_server_gets_another_chance() -> None:
    speeds = ObservedSpeeds()
    speeds.record_step(pid(1), 1, 1.0, now=0.0)
    assert speeds.throughput(pid(1), HALF_LIFE_S) is not None  # weight 0.5
    assert speeds.throughput(pid(1), 2.5 * HALF_LIFE_S) is None  # weight below FRESH_WEIGHT: claim used again


def test_bad_observations_are_refused() -> None:
    speeds = ObservedSpeeds()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite number of seconds"):
            speeds.record_step(pid(1), 1, bad, now=0.0)
        with pytest.raises(ValueError, match="finite number of seconds"):
            speeds.record_rtt(pid(1), bad, now=0.0)
    with pytest.raises(ValueError, match="at least one block"):
        speeds.record_step(pid(1), 0, 0.1, now=0.0)


def test_memory_is_bounded_forgetting_the_least_recently_observed() -> None:
    speeds = ObservedSpeeds(max_peers=3)
    for i in range(5):
        speeds.record_step(pid(i), 1, 0.1, now=float(i))
    speeds.record_step(pid(2), 1, 0.1, now=10.0)
    speeds.record_step(pid(9), 1, 0.1, now=11.0)
    assert set(speeds.throughputs(11.0)) == {pid(2), pid(4), pid(9)}


def test_the_discount_decision() -> None:
    assert is_overclaim(1000.0, 10.0)  # 100x and 99 ms per block
    assert not is_overclaim(DISCOUNT_RATIO * 10.0, 10.0)  # within the ratio
    assert not is_overclaim(1e6, 2000.0)  # 500x, but under 1 ms per block: overheads, not a lie that matters
    assert not is_overclaim(0.0, 10.0) and not is_overclaim(10.0, 0.0)


def test_a_claim_far_above_the_measurement_is_discounted_and_reported_once() -> None:
    speeds = ObservedSpeeds()
    speeds.record_rtt(pid(1), 0.001, now=0.0)
    speeds.record_step(pid(1), 5, 0.051, now=0.0)  # 100 blocks/s
    speeds.record_step(pid(2), 5, 0.051, now=0.0)  # (no probe: the whole latency counts as compute)
    claims = {pid(1): 100_000.0, pid(2): 120.0, pid(3): 1e9}
    found = speeds.discount(claims, now=1.0)
    assert [(d.peer_id, d.claimed) for d in found] == [(pid(1), 100_000.0)]
    assert found[0].observed == pytest.approx(100.0)
    assert speeds.discount(claims, now=2.0) == []  # reported once
    assert speeds.is_discounted(pid(1), 2.0)
    assert not speeds.is_discounted(pid(2), 2.0) and not speeds.is_discounted(pid(3), 2.0)
    # Long after, the honest server's measurement has faded (its claim is used again), the liar's has not...
    assert speeds.throughputs(10 * HALF_LIFE_S) == {pid(1): pytest.approx(100.0)}
    # ...until DISCOUNT_MEMORY_S without news of it: then it is a stranger again, costed by its capped claim.
    assert speeds.throughputs(DISCOUNT_MEMORY_S + 1.0) == {}
    assert not speeds.is_discounted(pid(1), DISCOUNT_MEMORY_S + 1.0)
    # Measured as a liar again, it is discounted again, but not reported again.
    speeds.record_step(pid(1), 5, 0.051, now=DISCOUNT_MEMORY_S + 2.0)
    assert speeds.discount(claims, now=DISCOUNT_MEMORY_S + 2.0) == []
    assert speeds.is_discounted(pid(1), DISCOUNT_MEMORY_S + 2.0)


def test_an_honest_server_that_got_faster_after_a_discount_is_judged_afresh() -> None:
    speeds = ObservedSpeeds()
    speeds.record_step(pid(1), 1, 0.1, now=0.0)  # 10 blocks/s against a claim of 100: discounted
    assert len(speeds.discount({pid(1): 100.0}, now=0.0)) == 1
    later = DISCOUNT_MEMORY_S + 10.0
    for i in range(5):  # it was only overloaded: now it runs at its claim
        speeds.record_step(pid(1), 1, 0.01, now=later + i)
    assert not speeds.is_discounted(pid(1), later + 5)
    assert speeds.discount({pid(1): 100.0}, now=later + 5) == []
    assert speeds.throughput(pid(1), later + 5) == pytest.approx(100.0, rel=0.01)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-3, 1e6), st.floats(1e-3, 1e6))
def test_discounted_iff_both_ratio_and_time_say_so(claimed: float, observed: float) -> None:
    expected = claimed > DISCOUNT_RATIO * observed and (1 / observed - 1 / claimed) > 0.001
    assert is_overclaim(claimed, observed) == expected
    if claimed <= observed:
        assert not is_overclaim(claimed, observed)  # an honest or modest claim is never discounted

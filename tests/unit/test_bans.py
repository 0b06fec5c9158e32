"""BanList: exponential backoff per peer with an injected clock; a success clears the strikes."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from petalnode.identity import PeerId
from petalnode.node import BanList
from petalnode.node._bans import BAN_BASE_S, BAN_MAX_S


def pid(i: int) -> PeerId:
    return PeerId(hashlib.sha256(f"peer{i}".encode()).digest()[:20])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap() -> None:
    clock = Clock()
    bans = BanList(clock)
    durations = [bans.ban(pid(1)) for _ in range(8)]
    assert durations == [min(BAN_MAX_S, BAN_BASE_S * 2**i) for i in range(8)]
    assert durations[:3] == [30.0, 60.0, 120.0] and durations[-1] == BAN_MAX_S


def test_a_ban_expires_with_the_clock() -> None:
    clock = Clock()
    bans = BanList(clock, base_s=10.0, max_s=100.0)
    assert not bans.is_banned(pid(1)) and bans.banned() == set()
    assert bans.ban(pid(1)) == 10.0
    assert bans.is_banned(pid(1)) and bans.banned() == {pid(1)}
    assert not bans.is_banned(pid(2))
    clock.now += 9.99
    assert bans.is_banned(pid(1))
    clock.now += 0.01
    assert not bans.is_banned(pid(1)) and bans.banned() == set()
    # Strikes outlive the ban: the next failure is banned twice as long.
    assert bans.ban(pid(1)) == 20.0


def test_success_clears_strikes_and_the_ban() -> None:
    clock = Clock()
    bans = BanList(clock)
    bans.ban(pid(1))
    bans.ban(pid(1))
    bans.ban(pid(2))
    bans.succeeded(pid(1))
    bans.succeeded(pid(3))  # never banned: a no-op
    assert bans.banned() == {pid(2)}
    assert bans.ban(pid(1)) == BAN_BASE_S


@given(st.lists(st.tuples(st.sampled_from(["ban", "ok", "tick"]), st.integers(0, 3), st.floats(0, 700)),
                max_size=40))
def test_banned_is_exactly_the_peers_whose_latest_ban_has_not_expired(ops: list) -> None:
    clock = Clock()
    bans = BanList(clock)
    until: dict[PeerId, float] = {}
    strikes: dict[PeerId, int] = {}
    for op, i, dt in ops:
        peer = pid(i)
        if op == "ban":
            strikes[peer] = strikes.get(peer, 0) + 1
            duration = bans.ban(peer)
            assert duration == min(BAN_MAX_S, BAN_BASE_S * 2 ** (strikes[peer] - 1))
            until[peer] = clock.now + duration
        elif op == "ok":
            bans.succeeded(peer)
            strikes.pop(peer, None)
            until.pop(peer, None)
        else:
            clock.now += dt
        expected = {p for p, t in until.items() if t > clock.now}
        assert bans.banned() == expected
        assert all(bans.is_banned(pid(j)) == (pid(j) in expected) for j in range(4))

"""The client's failover policy (node/_failover.py): whose fault an error is, and what to do about it. Pure."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode import errors
from petalnode.errors import (
    BadRequestError,
    BusyError,
    ClosedResourceError,
    CodecError,
    ConnectionClosedError,
    DHTError,
    InternalError,
    InvalidStateError,
    LocalProtocolError,
    NoRouteError,
    OutOfCacheMemoryError,
    PetalnodeError,
    RemoteProtocolError,
    RPCTimeoutError,
    UnknownSessionError,
    error_from_code,
)
from petalnode.identity import PeerId
from petalnode.node._failover import (
    MAX_FAILOVERS,
    ROUTE_RETRY_PERIOD_S,
    Attempts,
    GiveUp,
    Phase,
    Propagate,
    Reroute,
    Verdict,
    accepted,
    classify,
    next_action,
    no_second_opinion,
    retry_original_server,
    route_retry_delay_s,
    view_needs_refresh,
)


def pid(i: int) -> PeerId:
    return PeerId(hashlib.sha256(f"peer{i}".encode()).digest()[:20])


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


def _make(cls: type[BaseException]) -> BaseException:
    return cls("missing", missing=[(0, 1)]) if issubclass(cls, NoRouteError) else cls("boom")


ERROR_TREE = [PetalnodeError, *_all_subclasses(PetalnodeError)]
OTHER_ERRORS = [ValueError, TypeError, AssertionError, KeyError, RuntimeError, OSError, TimeoutError,
                asyncio.CancelledError, KeyboardInterrupt]
BLOCKS = (2, 5)


@pytest.mark.parametrize(
    ("error", "phase", "verdict"),
    [
        (ConnectionClosedError("gone"), Phase.STEP, Verdict.SERVER_FAULT),
        (errors.OpenTimeoutError("slow open"), Phase.OPEN, Verdict.SERVER_FAULT),
        (errors.StepTimeoutError("slow step"), Phase.STEP, Verdict.SERVER_FAULT),
        (errors.ConnectTimeoutError("slow dial"), Phase.OPEN, Verdict.SERVER_FAULT),
        (errors.HandshakeTimeoutError("slow handshake"), Phase.FORWARD, Verdict.SERVER_FAULT),
        # Every phase timeout is a petalnode error now: a builtin one reaching the policy is our bug.
        (TimeoutError(), Phase.OPEN, Verdict.CLIENT),
        (errors.ClientTimeoutError("facade"), Phase.STEP, Verdict.CLIENT),
        (RPCTimeoutError("slow"), Phase.FORWARD, Verdict.SERVER_FAULT),
        (RemoteProtocolError("non-finite"), Phase.STEP, Verdict.SERVER_FAULT),
        (CodecError("garbage reply"), Phase.BACKWARD, Verdict.SERVER_FAULT),
        (InternalError("oops"), Phase.STEP, Verdict.SERVER_FAULT),
        (UnknownSessionError("lost it"), Phase.STEP, Verdict.SERVER_FAULT),
        (error_from_code("no-such-code", "?"), Phase.STEP, Verdict.SERVER_FAULT),
        (BusyError("leaving"), Phase.STEP, Verdict.UNAVAILABLE),
        (BusyError("queue full"), Phase.FORWARD, Verdict.UNAVAILABLE),
        (OutOfCacheMemoryError("full"), Phase.OPEN, Verdict.UNAVAILABLE),
        (OutOfCacheMemoryError("full mid-session?"), Phase.STEP, Verdict.SERVER_FAULT),
        (BadRequestError("too long"), Phase.STEP, Verdict.REFUSED),
        (BadRequestError("not inside"), Phase.OPEN, Verdict.REFUSED),
        (LocalProtocolError("too big to send"), Phase.STEP, Verdict.CLIENT),
        (ClosedResourceError("closed"), Phase.STEP, Verdict.CLIENT),
        (InvalidStateError("closed"), Phase.STEP, Verdict.CLIENT),
        (NoRouteError("none"), Phase.OPEN, Verdict.CLIENT),
        (DHTError("lookup"), Phase.OPEN, Verdict.CLIENT),
        (ValueError("our bug"), Phase.STEP, Verdict.CLIENT),
        (asyncio.CancelledError(), Phase.STEP, Verdict.CLIENT),
    ],
)
def test_classify(error: BaseException, phase: Phase, verdict: Verdict) -> None:
    assert classify(error, phase=phase) is verdict


@given(st.sampled_from(ERROR_TREE + OTHER_ERRORS), st.sampled_from(list(Phase)))
def test_classify_is_total_and_only_server_side_errors_are_hop_failures(cls: type, phase: Phase) -> None:
    verdict = classify(_make(cls), phase=phase)
    assert isinstance(verdict, Verdict)
    server_side = (errors.TransportError, errors.RemoteError, errors.RemoteProtocolError, errors.CodecError)
    assert (verdict is not Verdict.CLIENT) == issubclass(cls, server_side)


def test_a_client_error_propagates_and_bans_nobody() -> None:
    assert next_action(Attempts(), ValueError("bug"), phase=Phase.STEP, peer=pid(1), blocks=BLOCKS,
                       what="x") == Propagate()


def test_a_server_fault_bans_it_and_reroutes_its_blocks() -> None:
    action = next_action(Attempts(), ConnectionClosedError("gone"), phase=Phase.STEP, peer=pid(1), blocks=BLOCKS,
                         what="x")
    assert action == Reroute(blocks=BLOCKS, ban=pid(1), avoid=frozenset(), attempts=Attempts(failures=1))


def test_a_refusal_asks_another_server_and_bans_the_refuser_only_once_it_accepts() -> None:
    action = next_action(Attempts(), BadRequestError("bad?"), phase=Phase.STEP, peer=pid(1), blocks=BLOCKS,
                         what="x")
    assert isinstance(action, Reroute) and action.ban is None and action.avoid == {pid(1)}
    # The same server refusing again (say, the view still routes to it) is not a second opinion.
    again = next_action(action.attempts, BadRequestError("bad?"), phase=Phase.STEP, peer=pid(1), blocks=BLOCKS,
                        what="x")
    assert isinstance(again, Reroute) and again.ban is None
    to_ban, rest = accepted(again.attempts)
    assert to_ban == {pid(1)} and rest == Attempts(failures=2)
    assert accepted(Attempts(failures=3)) == (frozenset(), Attempts(failures=3))


def test_two_distinct_refusals_raise_bad_request_and_ban_nobody() -> None:
    first = next_action(Attempts(), BadRequestError("bad"), phase=Phase.STEP, peer=pid(1), blocks=BLOCKS, what="x")
    assert isinstance(first, Reroute)
    second = next_action(first.attempts, BadRequestError("still bad"), phase=Phase.STEP, peer=pid(2),
                         blocks=BLOCKS, what="the step")
    assert isinstance(second, GiveUp) and second.ban is None
    assert isinstance(second.error, BadRequestError) and not isinstance(second.error, NoRouteError)
    assert "the step was refused as a bad request by 2 servers" in str(second.error)


def test_no_second_opinion_after_a_refusal_is_a_bad_request_otherwise_the_route_error() -> None:
    no_route = NoRouteError("blocks 2-4 have no server", missing=[BLOCKS])
    assert no_second_opinion(Attempts(failures=1), no_route) is no_route
    error = no_second_opinion(Attempts(failures=1, refused_by=frozenset({pid(1)})), no_route)
    assert isinstance(error, BadRequestError) and "no other server can check it" in str(error)


failures = st.sampled_from([ConnectionClosedError("x"), errors.StepTimeoutError("x"), BusyError("x"),
                            InternalError("x"), RemoteProtocolError("x"), BadRequestError("x"),
                            OutOfCacheMemoryError("x")])


@settings(max_examples=300)
@given(st.lists(st.tuples(failures, st.integers(0, 3)), min_size=1, max_size=30), st.sampled_from(list(Phase)),
       st.integers(0, 10))
def test_failover_always_terminates_in_one_error_type_and_never_bans_a_refuser(
    sequence: list[tuple[Exception, int]], phase: Phase, cap: int,
) -> None:
    attempts = Attempts()
    for step, (error, server) in enumerate(sequence):
        action = next_action(attempts, error, phase=phase, peer=pid(server), blocks=BLOCKS, what="x",
                             max_failovers=cap)
        if isinstance(error, BadRequestError):
            assert not isinstance(action, Propagate) and action.ban is None  # a refusal alone never bans
        else:
            assert action.ban == pid(server)
        if isinstance(action, GiveUp):
            assert type(action.error) in (NoRouteError, BadRequestError)
            if isinstance(action.error, NoRouteError):
                assert step == cap and action.error.missing == [BLOCKS]
            assert step <= cap
            return
        assert isinstance(action, Reroute) and action.blocks == BLOCKS
        assert action.attempts.failures == step + 1 and action.avoid == action.attempts.refused_by
        attempts = action.attempts
    assert len(sequence) <= cap  # never more than `cap` reroutes


def test_the_default_cap() -> None:
    attempts = Attempts()
    for _ in range(MAX_FAILOVERS):
        action = next_action(attempts, errors.OpenTimeoutError("x"), phase=Phase.OPEN, peer=pid(1), blocks=BLOCKS,
                             what="x")
        assert isinstance(action, Reroute)
        attempts = action.attempts
    last = next_action(attempts, errors.OpenTimeoutError("x"), phase=Phase.OPEN, peer=pid(1), blocks=BLOCKS,
                       what="opening")
    assert isinstance(last, GiveUp) and isinstance(last.error, NoRouteError) and last.ban == pid(1)
    assert f"opening failed {MAX_FAILOVERS + 1} times; last error: OpenTimeoutError" in str(last.error)


def test_view_freshness() -> None:
    assert view_needs_refresh(None, 10.0, route_failed=False)
    assert not view_needs_refresh(3.0, 10.0, route_failed=False)
    assert not view_needs_refresh(10.0, 10.0, route_failed=False)
    assert view_needs_refresh(10.5, 10.0, route_failed=False)
    assert view_needs_refresh(0.0, 10.0, route_failed=True)


def test_route_retry_delay() -> None:
    assert route_retry_delay_s(view_is_fresh=False, now=100.0, deadline=50.0) == 0.0  # refresh first, at once
    assert route_retry_delay_s(view_is_fresh=True, now=100.0, deadline=100.0) is None
    assert route_retry_delay_s(view_is_fresh=True, now=99.7, deadline=100.0) == pytest.approx(0.3)
    assert route_retry_delay_s(view_is_fresh=True, now=10.0, deadline=100.0) == ROUTE_RETRY_PERIOD_S


def test_backward_tries_the_original_server_first_unless_banned_or_failed() -> None:
    assert retry_original_server(Attempts(), banned=False)
    assert not retry_original_server(Attempts(), banned=True)
    assert not retry_original_server(Attempts(failures=1), banned=False)
    refused = next_action(Attempts(), BadRequestError("?"), phase=Phase.BACKWARD, peer=pid(1), blocks=BLOCKS,
                          what="x")
    assert isinstance(refused, Reroute) and not retry_original_server(refused.attempts, banned=False)


def test_a_failing_checker_is_banned_only_for_server_failures() -> None:
    from petalnode.errors import BadRequestError, BusyError, InvalidStateError, RemoteProtocolError
    from petalnode.node._failover import checker_failure_bans

    assert checker_failure_bans(RemoteProtocolError("garbage"), phase=Phase.STEP)
    assert checker_failure_bans(BusyError("full"), phase=Phase.FORWARD)
    assert not checker_failure_bans(BadRequestError("refused"), phase=Phase.STEP)
    with pytest.raises(InvalidStateError):  # ours, not the server's: raised as it is
        checker_failure_bans(InvalidStateError("closed"), phase=Phase.STEP)

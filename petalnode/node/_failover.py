# The swarm client's failover decisions, as plain functions over plain data.
#
# The async drivers (`SwarmSession.step`, `SwarmClient.forward` / `backward`, opening sessions, routing) gather
# facts, ask this module, and do the I/O. Nothing here imports asyncio, sockets, torch or a clock: time is an
# argument, and the simulator and the unit tests run the very same rules.
#
# Invariants:
# - `classify` is total: every exception gets a verdict, and only errors the server can have caused (transport
#   failures, timeouts, malformed or non-finite replies, typed remote errors) are hop failures; anything else
#   (our own bugs, a closed client, routing or DHT errors) propagates to the caller unchanged.
# - An error caused by the client's own request never bans a server. The client validates what it knows before
#   sending (SwarmSession.step, SwarmClient._check_pass) and raises `BadRequestError` locally. A remote
#   `BadRequestError` on a request that passed that validation is ambiguous (our request, or a lying server):
#   it bans nobody by itself; the same request goes to a different server, and the refuser is banned only once
#   another server accepted that request. Two distinct refusals end in `BadRequestError` to the caller, and so
#   does a refusal when no other server gets to host those blocks within the wait for blocks (no second opinion).
# - Every failover loop ends: a request fails over at most `max_failovers` times; the failure after that ends in
#   `NoRouteError` (the one final type for every path: step, open, forward, backward), chained to the last error.
from __future__ import annotations

import enum
from dataclasses import dataclass

from petalnode.errors import (
    BadRequestError,
    BusyError,
    CodecError,
    NoRouteError,
    OutOfCacheMemoryError,
    PetalnodeError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
)
from petalnode.identity import PeerId

MAX_FAILOVERS = 8
"""Reroutes per request (one step, one open, one pass, one backward hop) before giving up with NoRouteError."""

ROUTE_RETRY_PERIOD_S = 1.0
"""While blocks have no server, look again this often (until the wait for blocks runs out)."""


class Phase(enum.Enum):
    """What the client was doing when a server failed."""

    OPEN = "open"  # opening an inference session
    STEP = "step"  # an inference step (or the replay that rebuilds a replacement's cache)
    FORWARD = "forward"  # a stateless training forward pass
    BACKWARD = "backward"  # a training backward pass (with its recomputing forward calls)


class Verdict(enum.Enum):
    """Whose fault an error is, and so what the client does about it."""

    SERVER_FAULT = "server_fault"
    """The server failed or broke the protocol: ban it and reroute."""
    UNAVAILABLE = "unavailable"
    """An honest server that cannot take the request now (busy, leaving, cache full): ban it and reroute."""
    REFUSED = "refused"
    """The server called our request bad, though it passed local validation: reroute, ban only on a second opinion."""
    CLIENT = "client"
    """Not a hop failure (our bug, a closed client, routing): propagate it unchanged."""


# Errors a server can cause; anything else is ours. RemoteError subclasses are handled one by one below.
# No builtin TimeoutError here: every phase timeout is a petalnode error (ConnectTimeoutError is a TransportError;
# RPC, open and step timeouts are RemoteErrors), see petalnode/_timeouts.py.
_SERVER_SIDE = (TransportError, RemoteProtocolError, CodecError)


def classify(error: BaseException, *, phase: Phase) -> Verdict:
    """Whose fault `error` is, raised while talking to one server in `phase`.

    `BusyError` (a full queue, or a server leaving or moving) and, when opening, `OutOfCacheMemoryError` (its
    announced free cache was stale) come from honest servers: UNAVAILABLE. They still ban (with the ordinary
    backoff, cleared by the next success): the server's announcement lingers in the DHT for up to a TTL, and
    without a ban the router would pick it again at once and fail the same way. During a step a full cache is
    impossible for an honest server (the cache is reserved at open), so there it is the server's fault.
    `CodecError` here is a reply that does not decode (the driver turns a request we cannot encode into a local
    error before it gets here).

    Raises:
        nothing: every exception gets a verdict.
    """
    if not isinstance(error, Exception):  # CancelledError, KeyboardInterrupt, SystemExit
        return Verdict.CLIENT
    if isinstance(error, BadRequestError):
        return Verdict.REFUSED
    if isinstance(error, BusyError):
        return Verdict.UNAVAILABLE
    if isinstance(error, OutOfCacheMemoryError):
        return Verdict.UNAVAILABLE if phase is Phase.OPEN else Verdict.SERVER_FAULT
    if isinstance(error, RemoteError):
        # UnknownSessionError (it lost our session), RPCTimeoutError, InternalError, and codes we do not know.
        return Verdict.SERVER_FAULT
    if isinstance(error, _SERVER_SIDE):
        return Verdict.SERVER_FAULT
    return Verdict.CLIENT


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempts:
    """The failures of one request so far.

    Attributes:
        failures: hop failures of this request (each one is followed by a reroute or ends it).
        refused_by: servers that refused this request as bad and are not banned (yet): routed around while
            the request is retried, banned once another server accepts it.
    """

    failures: int = 0
    refused_by: frozenset[PeerId] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Reroute:
    """Route blocks [start, end) anew, avoiding `avoid` (and banned servers), and retry the request.

    Attributes:
        blocks: the failed hop's blocks.
        ban: ban this server now (None: ban nobody).
        avoid: servers to route around for this request without banning them.
        attempts: the request's record, to pass to the next decision.
    """

    blocks: tuple[int, int]
    ban: PeerId | None
    avoid: frozenset[PeerId]
    attempts: Attempts


@dataclass(frozen=True, slots=True, kw_only=True)
class GiveUp:
    """Stop failing over: ban `ban` (if any) and raise `error` (chained to the last hop error)."""

    error: PetalnodeError
    ban: PeerId | None


@dataclass(frozen=True, slots=True)
class Propagate:
    """Not a hop failure: re-raise the error unchanged, ban nobody."""


Decision = Reroute | GiveUp | Propagate


def next_action(
    attempts: Attempts,
    error: BaseException,
    *,
    phase: Phase,
    peer: PeerId,
    blocks: tuple[int, int],
    what: str,
    max_failovers: int = MAX_FAILOVERS,
) -> Decision:
    """What to do after `peer`, serving `blocks` of a request, failed with `error`.

    Args:
        attempts: the request's failures before this one (`Attempts()` for the first).
        error: what the server call raised.
        phase: what the request was.
        peer: the server that failed.
        blocks: [start, end) of the failed hop.
        what: the request, for messages ("step at position 5 of model M").
        max_failovers: reroutes allowed for this request.

    Returns:
        Reroute (retry elsewhere), GiveUp (raise its error), or Propagate (re-raise `error`).
    """
    verdict = classify(error, phase=phase)
    if verdict is Verdict.CLIENT:
        return Propagate()
    failures = attempts.failures + 1
    refused = attempts.refused_by
    ban: PeerId | None = peer
    if verdict is Verdict.REFUSED:
        refused, ban = refused | {peer}, None
        if len(refused) >= 2:
            names = ", ".join(sorted(str(p) for p in refused))
            return GiveUp(error=BadRequestError(f"{what} was refused as a bad request by {len(refused)} servers "
                                                f"({names}); last: {error}"), ban=None)
    if failures > max_failovers:
        return GiveUp(error=NoRouteError(f"{what} failed {failures} times; last error: {type(error).__name__}: "
                                         f"{error}", missing=[blocks]), ban=ban)
    return Reroute(blocks=blocks, ban=ban, avoid=refused,
                   attempts=Attempts(failures=failures, refused_by=refused))


def checker_failure_bans(error: BaseException, *, phase: Phase) -> bool:
    """A call to a server that was only checking another one (verification) failed: ban it?

    Yes when the server failed or cannot serve (SERVER_FAULT, UNAVAILABLE); not for a refusal (the request may be
    the cause, and the checked reply is simply left unchecked). Not a server failure at all (our bug, a closed
    client): `error` itself is raised.
    """
    verdict = classify(error, phase=phase)
    if verdict is Verdict.CLIENT:
        raise error
    return verdict in (Verdict.SERVER_FAULT, Verdict.UNAVAILABLE)


def accepted(attempts: Attempts) -> tuple[frozenset[PeerId], Attempts]:
    """A server accepted the request: (servers to ban now, the record to go on with).

    The servers that refused this very request are banned now: another server took it, so the refusal was theirs.
    """
    return attempts.refused_by, Attempts(failures=attempts.failures)


def no_second_opinion(attempts: Attempts, no_route: NoRouteError) -> PetalnodeError:
    """The error to raise when a reroute finds no server: after a refusal, the refusal itself (nobody else can
    judge the request, and the likeliest cause is the request); otherwise the routing error."""
    if not attempts.refused_by:
        return no_route
    names = ", ".join(sorted(str(p) for p in attempts.refused_by))
    return BadRequestError(f"the request was refused as bad by {names}, and no other server can check it: "
                           f"{no_route}")


def view_needs_refresh(age_s: float | None, max_age_s: float, *, route_failed: bool) -> bool:
    """Fetch the swarm view again before routing? `age_s` None: there is no view yet.

    A recent view is reused: after a failure, rerouting must not wait on a DHT lookup that may itself be slowed
    by the very peer that just failed. A view that yielded no route is refreshed before the next try.
    """
    return route_failed or age_s is None or age_s > max_age_s


def route_retry_delay_s(*, view_is_fresh: bool, now: float, deadline: float) -> float | None:
    """After a NoRouteError: 0 to retry at once (the view was not fetched by this attempt, so fetch it first),
    a wait in seconds (blocks may get a server), or None to give up (the wait for blocks ran out)."""
    if not view_is_fresh:
        return 0.0
    if now >= deadline:
        return None
    return min(ROUTE_RETRY_PERIOD_S, deadline - now)


def retry_original_server(attempts: Attempts, *, banned: bool) -> bool:
    """Backward of a traced hop goes to the server that ran its forward first, unless it is banned or it (or a
    replacement) already failed this backward: then the hop's blocks are routed anew."""
    return attempts.failures == 0 and not banned

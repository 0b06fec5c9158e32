# Fair shares per peer: how much of a server one peer may hold at once, so one client cannot starve the others.
#
# A peer is the peer id its channel proved in the handshake (`CallContext.remote_peer_id`). Three limits:
# - open inference sessions: at most `max_sessions` per peer;
# - cache tokens held: at most `max_cache_share` of the server's KV cache per peer, counted in tokens at batch 1
#   over the hosted span (a session over part of the span counts that part). A peer holding no session is always
#   admitted by this rule (the cache manager still refuses what does not fit), so a lone client's one long
#   session is never refused for fairness;
# - request rate: RPC calls (session opens, steps, forward, backward, info) at most `requests_per_s` on average
#   with bursts of `request_burst`, a token bucket per peer (node/_token_bucket.py) on an injected clock.
# A peer over a limit gets `BusyError` naming the limit: clients treat "busy" as an honest server that cannot take
# the request now (node/_failover.py: UNAVAILABLE), reroute, and do not hold it against the server beyond the
# ordinary backoff. Compute turns are shared by the executor (node/_fair_queue.py), not here.
#
# Why a fixed share and not "use everything while nobody else waits": a session holds its cache until it ends and
# nothing here preempts one, so a server that lets one peer take all of its cache has nothing to give the next
# peer until that peer leaves. A fixed share keeps the rest free for others at the price of idle cache when only
# one peer is around; half of it still fits any single normal session (the first one is exempt anyway).
#
# Sybil: peer ids are free, so these limits bound one identity, not one attacker: k identities hold k shares
# (two identities can hold the whole cache). Per-address limits would raise the cost to one address per share;
# they are not done (relayed peers all arrive from their relay's address, so they need care).
#
# Invariants: pure (no asyncio, torch or sockets; time comes from the injected clock); the per-peer table is
# bounded (MAX_TRACKED_PEERS), forgetting the least recently seen peer that holds no session.

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from petalnode.errors import BusyError, ConfigError
from petalnode.node._token_bucket import TokenBucket

# A normal client holds one session per hop of each generation it runs; 16 concurrent generations through one
# server from one identity is already a gateway (which can raise the limit), not an interactive user.
DEFAULT_MAX_SESSIONS_PER_PEER = 16
DEFAULT_MAX_CACHE_SHARE = 0.5
# One loopback RPC costs the event loop about 60-75 us (DESIGN.md), so 500 calls/s from one peer is a few percent
# of it; a client at batch 1 sends one step per token per hop, far below this on CPU (15-30 tokens/s for the
# whole default model), and the burst absorbs a prefill-and-decode spurt of a fast tiny model.
DEFAULT_REQUESTS_PER_S = 500.0
DEFAULT_REQUEST_BURST = 1000.0
# Peers whose state is remembered at once (the bucket and usage of each): about 200 bytes each.
MAX_TRACKED_PEERS = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class FairShareLimits:
    """What one peer may hold of a server at once (see the module header for how each is counted).

    Args:
        max_sessions: open inference sessions per peer.
        max_cache_share: fraction (0, 1] of the server's KV cache one peer may hold beyond its first session.
        requests_per_s: RPC calls per second per peer, on average.
        request_burst: calls a quiet peer may make at once.

    Raises:
        ConfigError: a limit that is not positive, or a share above 1.
    """

    max_sessions: int = DEFAULT_MAX_SESSIONS_PER_PEER
    max_cache_share: float = DEFAULT_MAX_CACHE_SHARE
    requests_per_s: float = DEFAULT_REQUESTS_PER_S
    request_burst: float = DEFAULT_REQUEST_BURST

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions per peer must be at least 1, got {self.max_sessions}")
        if not 0 < self.max_cache_share <= 1:
            raise ConfigError(f"max_cache_share must be in (0, 1], got {self.max_cache_share}")
        if not (self.requests_per_s > 0 and math.isfinite(self.requests_per_s)):
            raise ConfigError(f"requests_per_s per peer must be positive, got {self.requests_per_s}")
        if not (self.request_burst >= 1 and math.isfinite(self.request_burst)):
            raise ConfigError(f"request_burst per peer must be at least 1, got {self.request_burst}")


@dataclass(slots=True)
class PeerUsage:
    """What one peer holds now."""

    sessions: int = 0
    cache_tokens: int = 0


def cache_cap_tokens(limits: FairShareLimits, capacity_tokens: int) -> int:
    """The most cache tokens one peer may hold (beyond its first session) on a server with `capacity_tokens`."""
    return int(limits.max_cache_share * capacity_tokens)


def check_session(
    limits: FairShareLimits, usage: PeerUsage, *, tokens: int, capacity_tokens: int, peer: object
) -> None:
    """Admit or refuse a new session of `tokens` cache tokens for a peer that holds `usage`.

    Raises:
        BusyError: the peer would exceed its session count or its cache share (the message says which).
    """
    if usage.sessions >= limits.max_sessions:
        raise BusyError(
            f"peer {peer} already has {usage.sessions} sessions open here, the most one peer may "
            f"(max {limits.max_sessions} sessions per peer); close one or use another server"
        )
    cap = cache_cap_tokens(limits, capacity_tokens)
    if usage.sessions > 0 and usage.cache_tokens + tokens > cap:
        raise BusyError(
            f"peer {peer} holds {usage.cache_tokens} cache tokens here and asks for {tokens} more, over "
            f"its share of {cap} ({limits.max_cache_share:.0%} of this server's {capacity_tokens}); "
            "use another server"
        )


@dataclass(frozen=True, slots=True)
class SessionGrant:
    """A session admitted for `peer`; give it back with `FairShareLedger.release`."""

    peer: Hashable
    tokens: int


@dataclass(slots=True)
class _Peer:
    usage: PeerUsage = field(default_factory=PeerUsage)
    bucket: TokenBucket | None = None


class FairShareLedger:
    """Per-peer usage and request buckets of one server, and the admission decisions over them.

    Args:
        limits: the per-peer limits.
        clock: a monotonic clock in seconds for the request buckets (the server passes its loop's time).
        max_peers: how many peers to remember at once (the least recently seen peer with no session is forgotten
            first; forgetting one only refills its bucket, which a new peer id would get anyway).
    """

    def __init__(
        self, limits: FairShareLimits, *, clock: Callable[[], float], max_peers: int = MAX_TRACKED_PEERS
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._max_peers = max_peers
        self._peers: OrderedDict[Hashable, _Peer] = OrderedDict()

    def usage(self, peer: Hashable) -> PeerUsage:
        entry = self._peers.get(peer)
        return PeerUsage(entry.usage.sessions, entry.usage.cache_tokens) if entry is not None else PeerUsage()

    def __len__(self) -> int:
        return len(self._peers)

    def check_request(self, peer: Hashable) -> None:
        """Count one RPC call of `peer` against its rate.

        Raises:
            BusyError: the peer is over its request rate (the call should be refused before any work).
        """
        entry = self._entry(peer)
        if entry.bucket is None:
            entry.bucket = TokenBucket(self.limits.requests_per_s, self.limits.request_burst, clock=self._clock)
        if not entry.bucket.try_take(1.0):
            raise BusyError(
                f"peer {peer} is over its request rate here ({self.limits.requests_per_s:g} calls/s, "
                f"bursts of {self.limits.request_burst:g}); slow down or use another server"
            )

    def admit_session(self, peer: Hashable, *, tokens: int, capacity_tokens: int) -> SessionGrant:
        """Record a new session of `tokens` cache tokens for `peer`, if its share allows.

        Raises:
            BusyError: over the session count or the cache share (nothing is recorded).
        """
        entry = self._entry(peer)
        check_session(self.limits, entry.usage, tokens=tokens, capacity_tokens=capacity_tokens, peer=peer)
        entry.usage.sessions += 1
        entry.usage.cache_tokens += tokens
        return SessionGrant(peer, tokens)

    def release(self, grant: SessionGrant) -> None:
        """Give back a session's share (idempotent per grant is the caller's job: call once per admit)."""
        entry = self._peers.get(grant.peer)
        if entry is None:  # cannot happen: a peer holding sessions is never forgotten
            return
        entry.usage.sessions = max(0, entry.usage.sessions - 1)
        entry.usage.cache_tokens = max(0, entry.usage.cache_tokens - grant.tokens)

    def _entry(self, peer: Hashable) -> _Peer:
        entry = self._peers.get(peer)
        if entry is not None:
            self._peers.move_to_end(peer)
            return entry
        if len(self._peers) >= self._max_peers:
            self._forget_one()
        entry = self._peers[peer] = _Peer()
        return entry

    def _forget_one(self) -> None:
        # Oldest first; at most one pass over the table. Peers holding sessions are bounded by the cache, so
        # when every remembered peer holds one the table simply grows past max_peers by those.
        for peer, entry in self._peers.items():
            if entry.usage.sessions == 0:
                del self._peers[peer]
                return

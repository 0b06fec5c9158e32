"""Which servers a client avoids for now: exponential backoff per peer, time injected.

A failure bans a peer for `base_s * 2**(strikes - 1)` seconds (capped); a success clears its strikes. Pure
bookkeeping, no I/O: the client and the churn simulator share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from petalnode.identity import PeerId

# Long enough to outlast one slow DHT lookup (a stalled peer costs a few RPC timeouts) between ban and reroute.
BAN_BASE_S = 30.0
BAN_MAX_S = 600.0


@dataclass
class _Strikes:
    count: int
    until: float


class BanList:
    def __init__(self, clock: Callable[[], float], *, base_s: float = BAN_BASE_S, max_s: float = BAN_MAX_S) -> None:
        self._clock = clock
        self._base_s = base_s
        self._max_s = max_s
        self._peers: dict[PeerId, _Strikes] = {}

    def ban(self, peer: PeerId) -> float:
        """Record a failure of `peer`; returns how long it is banned for."""
        strikes = self._peers.get(peer)
        count = strikes.count + 1 if strikes else 1
        duration = min(self._max_s, self._base_s * 2 ** (count - 1))
        self._peers[peer] = _Strikes(count, self._clock() + duration)
        return duration

    def succeeded(self, peer: PeerId) -> None:
        self._peers.pop(peer, None)

    def is_banned(self, peer: PeerId) -> bool:
        strikes = self._peers.get(peer)
        return strikes is not None and strikes.until > self._clock()

    def banned(self) -> set[PeerId]:
        now = self._clock()
        return {peer for peer, strikes in self._peers.items() if strikes.until > now}

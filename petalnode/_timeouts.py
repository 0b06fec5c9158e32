"""How long each phase may take: one `Timeouts` object, and one scope that turns expiry into the phase's error.

Invariants:
- Every field is a *timeout* (how long to wait for one phase), in seconds, positive, or None for no limit.
  Periods (refresh, keepalive interval, sweep), policy durations (ban base/max, record TTL) and limits are not
  here; they stay named constants in their modules.
- `Node`, `SwarmClient` and the client models take one `Timeouts` and hand it down (RPC, RPC streams,
  transports, DHT, block server); a layer never reads a timeout constant of another layer.
- `timeout_scope` is the only place a builtin `TimeoutError` from `asyncio.timeout` becomes a petalnode error,
  so no builtin `TimeoutError` escapes a public call. A cancellation stays a cancellation.

Modelled on httpx/_config.py `Timeout` (per phase, None = no limit, derive variants) and trio's timeouts.
This module is torch-free: the bootstrap and DHT processes import it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from petalnode.errors import ConfigError, PetalnodeTimeoutError

__all__ = ["DEFAULT_TIMEOUTS", "Timeouts", "timeout_scope"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Per-phase timeouts in seconds; None means no limit. Derive variants with `replace(...)`.

    The WebRTC handshake and keepalive are separate fields, not a per-transport default hidden in the
    transport: aiortc notices a dead peer only after about 33 s (measured with aiortc 1.16 here), so WebRTC
    needs a much shorter keepalive than TCP (whose FIN/RST arrive promptly), and its offer/answer exchange
    through a relay takes longer than a TCP handshake. A user tuning one transport must not change the other
    by accident.
    """

    connect: float | None = 5.0
    """Dialling a peer, including the transport handshake (was transport/_base.py CONNECT_TIMEOUT_S: a
    loopback/LAN handshake takes milliseconds, a far peer a few hundred). Also bounds opening an RPC stream."""
    handshake: float | None = 5.0
    """TCP identity handshake on an accepted or dialled connection (was transport/_tcp.py HANDSHAKE_TIMEOUT_S,
    equal to the connect timeout)."""
    webrtc_handshake: float | None = 10.0
    """WebRTC offer/answer plus identity proof (was transport/_webrtc.py HANDSHAKE_TIMEOUT_S; the data channel
    opens in ~35 ms on one host, an unreachable STUN server adds 5 s)."""
    keepalive: float | None = 20.0
    """Drop a TCP (or in-memory) connection whose keepalive probes go unanswered this long (was
    transport/_base.py KEEPALIVE_TIMEOUT_S, four 5 s keepalive intervals)."""
    webrtc_keepalive: float | None = 8.0
    """Same for WebRTC connections (was transport/_webrtc.py KEEPALIVE_TIMEOUT_S: four 2 s intervals, far below
    aiortc's own ~33 s dead-peer detection)."""
    rpc: float | None = 30.0
    """A unary RPC call, dialling included, when the caller gives no per-call timeout (was transport/_rpc.py
    RPC_TIMEOUT_S)."""
    first_message: float | None = 10.0
    """A server waiting for the first message of an accepted stream: the RPC request envelope, then the block
    server's open-session request (was FIRST_MESSAGE_TIMEOUT_S in transport/_rpc.py and node/_block_server.py)."""
    heartbeat: float | None = 5.0
    """An RPC stream with no heartbeat from the peer for this long is declared dead (was transport/_rpc_stream.py
    HEARTBEAT_TIMEOUT_S, five 1 s heartbeat intervals)."""
    open: float | None = 15.0
    """The swarm client opening an inference session on one server (was node/_swarm_client.py OPEN_TIMEOUT_S)."""
    step: float | None = 60.0
    """One inference step or forward/backward pass on one server (was node/_swarm_client.py STEP_TIMEOUT_S; a
    long prefill on a CPU server takes tens of seconds). The swarm client also uses it for its unary calls."""
    rtt_probe: float | None = 2.0
    """The swarm client measuring a server's round trip before routing (was node/_swarm_client.py
    RTT_PROBE_TIMEOUT_S); a server slower than this is routed as unmeasured."""
    wait_for_blocks: float | None = 60.0
    """How long the swarm client waits for servers to cover the requested blocks before raising NoRouteError
    (was node/_swarm_client.py WAIT_FOR_BLOCKS_S)."""
    client_start: float | None = 60.0
    """The synchronous client facade waiting for the swarm client to start (was node/_remote_chain.py
    CONNECT_TIMEOUT_S: DHT bootstrap plus the first swarm view)."""
    dht_rpc: float | None = 2.0
    """One DHT datagram RPC (was dht/_protocol.py RPC_TIMEOUT_S; kademlia hard-codes 5 s, too long for a
    lookup that asks dozens of peers)."""
    dht_lookup: float | None = 20.0
    """One iterative DHT lookup (get or store) (was dht/_node.py LOOKUP_TIMEOUT_S)."""
    dht_bootstrap: float | None = 20.0
    """Joining the DHT through the bootstrap peers (was dht/_node.py BOOTSTRAP_TIMEOUT_S)."""
    offline_announce: float | None = 3.0
    """A leaving server announcing OFFLINE before it closes (was node/_node.py OFFLINE_ANNOUNCE_TIMEOUT_S)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"timeout {field.name!r} must be a number of seconds or None, got {value!r}")
            if not value > 0:  # also rejects NaN
                raise ConfigError(f"timeout {field.name!r} must be positive or None, got {value!r}")

    def replace(self, **changes: Any) -> Timeouts:
        """A copy with some fields changed, validated like the original.

        Raises:
            ConfigError: an unknown field or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown timeout(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


DEFAULT_TIMEOUTS = Timeouts()


class timeout_scope:
    """`async with timeout_scope(seconds, StepTimeoutError, "..."):` is `asyncio.timeout(seconds)` whose expiry
    raises `error_cls(message)` instead of the builtin `TimeoutError`.

    Only this scope's own expiry is converted: a cancellation from outside stays `CancelledError`, and a builtin
    `TimeoutError` raised by the body for another reason passes unchanged. `seconds=None` means no limit.
    """

    __slots__ = ("_error_cls", "_message", "_scope", "_seconds")

    def __init__(self, seconds: float | None, error_cls: type[PetalnodeTimeoutError], message: str) -> None:
        self._seconds = seconds
        self._error_cls = error_cls
        self._message = message
        self._scope: asyncio.Timeout | None = None

    async def __aenter__(self) -> timeout_scope:
        self._scope = asyncio.timeout(self._seconds)
        await self._scope.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._scope is not None
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if self._scope.expired():
                raise self._error_cls(self._message) from None
            raise
        return False

    def expired(self) -> bool:
        """Whether this scope's deadline passed."""
        return self._scope is not None and self._scope.expired()

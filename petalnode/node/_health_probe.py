"""Collect swarm health: read each model's announcements from the DHT, then time an "info" call to each server.

The thin I/O driver under `_health.py` (which decides what the numbers mean); the health page (`petalnode.monitor`)
and `petalnode status --json` both call `collect_health`, so they print the same thing. Torch-free: a bootstrap
serving the health page never loads torch. At most MAX_PROBES servers per model are probed, MAX_CONCURRENT_PROBES
at a time, each bounded by the probe timeout, so one refresh takes at most about
ceil(MAX_PROBES / MAX_CONCURRENT_PROBES) probe timeouts beyond the DHT lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from petalnode.dht import DHTNode, ServerState
from petalnode.errors import PetalnodeError
from petalnode.identity import PeerAddress, PeerId
from petalnode.node._health import NOT_PROBED, Probe, ProbeStatus, health_report, model_health
from petalnode.node._info import InfoRequest, ServerInfo
from petalnode.node._swarm import fetch_swarm
from petalnode.node._swarm_view import ServerView, SwarmView
from petalnode.rpc import RPC

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0  # as Timeouts.rtt_probe: a server slower than this to say "info" is not usable anyway
MAX_PROBES = 256
MAX_CONCURRENT_PROBES = 32


def _address_of(server: ServerView) -> PeerAddress | None:
    """The first parseable announced address, pinned to the announcing peer id (nobody can redirect the probe)."""
    for text in server.addresses:
        with contextlib.suppress(PetalnodeError):
            return PeerAddress.parse(text).with_peer_id(server.peer_id)
    return None


async def probe_servers(
    rpc: RPC, view: SwarmView, *, timeout_s: float = PROBE_TIMEOUT_S, clock: Callable[[], float] = time.monotonic,
) -> dict[PeerId, Probe]:
    """Call "info" on every ONLINE server of `view` (up to MAX_PROBES), concurrently; the round trip of each."""
    limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
    online = [s for s in sorted(view.servers.values(), key=lambda s: str(s.peer_id)) if s.state is ServerState.ONLINE]

    async def probe(server: ServerView) -> tuple[PeerId, Probe]:
        address = _address_of(server)
        if address is None:
            return server.peer_id, NOT_PROBED
        async with limit:
            started = clock()
            try:
                info = await rpc.call(address, "info", InfoRequest(), expected=ServerInfo, timeout_s=timeout_s)
            except (PetalnodeError, OSError) as e:
                log.debug("health probe of %s failed: %s", server.peer_id, e)
                return server.peer_id, Probe(status=ProbeStatus.FAILED)
            assert isinstance(info, ServerInfo)
            return server.peer_id, Probe(status=ProbeStatus.OK, rtt_s=clock() - started, dtype=info.dtype or None,
                                         sessions=info.sessions)

    return dict(await asyncio.gather(*(probe(s) for s in online[:MAX_PROBES])))


async def collect_health(
    dht: DHTNode, rpc: RPC | None, models: Sequence[tuple[str, int]], *, measured_by: str,
    probe_timeout_s: float = PROBE_TIMEOUT_S, wall_clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The health report (`_health.health_report`) of each (model name, number of blocks); `rpc=None`: no probes."""
    results = []
    for model, num_blocks in models:
        view = await fetch_swarm(dht, model, num_blocks)
        probes = {} if rpc is None else await probe_servers(rpc, view, timeout_s=probe_timeout_s)
        results.append(model_health(view, model, probes))
    return health_report(results, generated_at=wall_clock(), measured_by=measured_by)

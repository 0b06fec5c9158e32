# Swarm health as plain data: what the health page, GET /api/health and `petalnode status --json` show.
#
# Invariants:
# - Pure: a SwarmView and the round trips this node measured go in, a JSON-ready dict comes out; no I/O, no clock
#   (the caller stamps `generated_at`). The page, the endpoint and `status --json` all render this one dict.
# - Block numbers are 0-based, as `petalnode status` prints them; `uncovered` holds half-open [start, end) runs
#   (what `petalnode join --blocks START:END` takes), the headline inclusive ranges as users count ("blocks 47-48").
# - A server counts towards a block's coverage iff it announced ONLINE and did not fail this node's probe (Petals'
#   health monitor: a model is healthy iff every block has an online, reachable server). A server not probed
#   (no transport, or over the probe cap) still counts: its announcement is all there is to go on.
# - Rows are sorted by (start, end, peer id) as in `petalnode status`, so equal inputs give equal output.
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from petalnode.dht import ServerState
from petalnode.errors import PetalnodeError
from petalnode.identity import PeerAddress, PeerId
from petalnode.node._swarm_view import ServerView, SwarmView, describe_runs, runs_where

PEER_ID_SHORT_CHARS = 12  # as `petalnode status` prints peer ids
HEALTH_SCHEMA_VERSION = 1


class ProbeStatus(enum.Enum):
    """What this node learnt by calling a server's "info" verb."""

    OK = "ok"
    FAILED = "failed"  # no answer within the probe timeout, or an error: not reachable from here
    NOT_PROBED = "not probed"  # not announced online, no usable address, or beyond the probe cap


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """One server's answer to this node's "info" call, and how long it took."""

    status: ProbeStatus
    rtt_s: float | None = None
    dtype: str | None = None
    sessions: int | None = None

    def __post_init__(self) -> None:
        if (self.status is ProbeStatus.OK) != (self.rtt_s is not None):
            raise ValueError("a round trip is known exactly when the probe succeeded")


NOT_PROBED = Probe(status=ProbeStatus.NOT_PROBED)


def reachability(server: ServerView) -> tuple[str, str | None]:
    """("direct" | "relayed" | "unknown", relay host:port or None) from the server's first announced address.

    A server behind NAT announces `webrtc://RELAY_HOST:RELAY_PORT/ID` (node/_signaling.py): others reach it
    through that relay (signaling, and the relayed data path when no direct WebRTC path exists).
    """
    for text in server.addresses:
        try:
            address = PeerAddress.parse(text)
        except PetalnodeError:
            continue
        if address.scheme == "tcp":
            return "direct", None
        return "relayed", f"{address.host}:{address.port}"
    return "unknown", None


def counts_for_coverage(server: ServerView, probe: Probe) -> bool:
    """Whether the server makes its blocks usable (see the module header)."""
    return server.state is ServerState.ONLINE and probe.status is not ProbeStatus.FAILED


def headline(uncovered: list[tuple[int, int]]) -> str:
    """ "healthy", or "broken: blocks 47-48 have no server" (inclusive, 0-based, as `petalnode status`)."""
    if not uncovered:
        return "healthy"
    missing = sum(end - start for start, end in uncovered)
    return f"broken: {describe_runs(uncovered)} {'has' if missing == 1 else 'have'} no server"


def model_health(view: SwarmView, model: str, probes: Mapping[PeerId, Probe] | None = None) -> dict[str, Any]:
    """The health of one model's swarm.

    Args:
        view: the merged announcements (node/_swarm.py `fetch_swarm`).
        model: the model's name (as in its DHT keys).
        probes: this node's probe of each server; a server missing here is NOT_PROBED.

    Returns:
        {"model", "num_blocks", "healthy", "headline", "uncovered": [[start, end), ...], "blocks": [{"index",
        "servers", "throughput", "joining"}], "servers": [row, ...]}; a row holds "peer_id", "peer_short", "name",
        "state", "start", "end", "blocks" (inclusive text), "throughput", "cache_tokens_left", "version",
        "adapters", "reachability", "relay", "address", "probe", "rtt_ms" (None unless measured), "dtype",
        "sessions", "counted".
    """
    probes = probes or {}
    counted = [0] * view.num_blocks
    throughput = [0.0] * view.num_blocks
    joining = [0] * view.num_blocks
    rows = []
    for server in sorted(view.servers.values(), key=lambda s: (s.start, s.end, str(s.peer_id))):
        probe = probes.get(server.peer_id, NOT_PROBED)
        counts = counts_for_coverage(server, probe)
        for block in range(server.start, server.end):
            if counts:
                counted[block] += 1
                throughput[block] += server.throughput
            elif server.state is ServerState.JOINING:
                joining[block] += 1
        how, relay = reachability(server)
        rows.append({
            "peer_id": str(server.peer_id), "peer_short": str(server.peer_id)[:PEER_ID_SHORT_CHARS],
            "name": server.public_name, "state": server.state.name.lower(), "start": server.start,
            "end": server.end, "blocks": f"{server.start}-{server.end - 1}", "throughput": server.throughput,
            "cache_tokens_left": server.cache_tokens_left, "version": server.version,
            "adapters": list(server.adapters), "reachability": how, "relay": relay,
            "address": server.addresses[0] if server.addresses else None, "probe": probe.status.value,
            "rtt_ms": None if probe.rtt_s is None else round(probe.rtt_s * 1000.0, 3), "dtype": probe.dtype,
            "sessions": probe.sessions, "counted": counts,
        })
    uncovered = runs_where([count == 0 for count in counted])
    return {
        "model": model, "num_blocks": view.num_blocks, "healthy": not uncovered, "headline": headline(uncovered),
        "uncovered": [[start, end] for start, end in uncovered],
        "blocks": [{"index": i, "servers": counted[i], "throughput": throughput[i], "joining": joining[i]}
                   for i in range(view.num_blocks)],
        "servers": rows,
    }


def health_report(models: list[dict[str, Any]], *, generated_at: float, measured_by: str) -> dict[str, Any]:
    """The document served at /api/health and printed by `status --json`: every model's health, stamped.

    Args:
        models: `model_health` results, in the order the user named the models.
        generated_at: Unix time of the lookup.
        measured_by: who measured the round trips (the monitoring node's peer id), since they differ per vantage.
    """
    return {
        "schema": HEALTH_SCHEMA_VERSION, "generated_at": generated_at, "healthy": all(m["healthy"] for m in models),
        "measured_by": measured_by,
        "rtt_note": "rtt_ms: round trip of an `info` call from the monitoring node; null (shown as \u2014) when it "
                    "was not measured (probe failed, server not online, or no address)",
        "models": models,
    }

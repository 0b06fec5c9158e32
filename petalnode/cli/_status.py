"""`petalnode status`: the swarm of a model as a table, and whether it is servable."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from petalnode.cli._swarm_key import add_swarm_key_option, swarm_key_from_args
from petalnode.errors import ConfigError, DHTError


def add_status_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("status", help="show which servers host which blocks of a model")
    parser.add_argument("--bootstrap", action="append", default=[], required=True, metavar="ADDR")
    parser.add_argument("--model", default=None, help="local model directory or id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--pinned-digests", type=Path, default=None, metavar="FILE",
                        help="the model's block digests from `petalnode digest`, for a copy without block weights")
    parser.add_argument("--json", action="store_true",
                        help="print the health report the health page serves at /api/health (per block coverage, "
                             "servers, measured round trips) instead of the table")
    add_swarm_key_option(parser)
    parser.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> int:
    from petalnode.compute import load_model_info, span_digest_for

    swarm_key = swarm_key_from_args(args)  # before loading the model: a bad key file fails at once
    info = load_model_info(args.model)
    if args.json:  # exactly the health page's report; like the page, it does not check weights against ours
        report = asyncio.run(_health(args.bootstrap, info.source.name, info.num_blocks, swarm_key))
        print(json.dumps(report, indent=2))
        return 0 if report["healthy"] else 1
    try:
        span_digest = span_digest_for(info, args.pinned_digests)  # hashed once, then cached next to the weights
    except ConfigError as e:
        if args.pinned_digests is not None:
            raise
        print(f"petalnode: weights not checked ({e})", file=sys.stderr)
        span_digest = None
    view = asyncio.run(_fetch(args.bootstrap, info.source.name, info.num_blocks, swarm_key))
    print(render_status(view, info.source.name, args.bootstrap[0], span_digest=span_digest))
    return 0 if not _usable(view, span_digest).uncovered_blocks() else 1


async def _fetch(bootstrap: list[str], model: str, num_blocks: int, swarm_key=None):
    from petalnode.dht import DHTNode
    from petalnode.identity import Identity
    from petalnode.node import fetch_swarm

    async with DHTNode(Identity.generate(), client_mode=True, swarm_key=swarm_key) as dht:
        await _bootstrap(dht, bootstrap)
        return await fetch_swarm(dht, model, num_blocks)


async def _health(bootstrap: list[str], model: str, num_blocks: int, swarm_key=None) -> dict:
    """The health report (node/_health.py) through a client-mode DHT node, plus an RPC to time the servers."""
    from petalnode.dht import DHTNode
    from petalnode.identity import Identity
    from petalnode.node import collect_health
    from petalnode.rpc import RPC
    from petalnode.transport import TcpTransport

    identity = Identity.generate()
    async with (TcpTransport(identity, swarm_key=swarm_key) as transport, RPC(transport) as rpc,
                DHTNode(identity, client_mode=True, swarm_key=swarm_key) as dht):
        await _bootstrap(dht, bootstrap)
        return await collect_health(dht, rpc, [(model, num_blocks)], measured_by=str(identity.peer_id))


async def _bootstrap(dht, bootstrap: list[str]) -> None:
    from petalnode.identity import PeerAddress

    addresses = [PeerAddress.parse(a) for a in bootstrap]
    try:
        await dht.bootstrap([(a.host, a.port) for a in addresses])
    except DHTError as e:
        raise DHTError(f"no peers reachable at the bootstrap address ({', '.join(bootstrap)}): {e}. "
                       "Check that a bootstrap or server is running there (and, for a private swarm, that "
                       "--swarm-key names its key).") from e


def render_status(view, model: str, bootstrap: str, *, span_digest=None) -> str:
    """The table; with `span_digest` (this machine's copy of the model, ModelInfo.span_digest) the header shows
    the model's digest, each server's digest is marked OTHER when its weights differ, and only servers with the
    same weights count towards "servable" (as clients route: node/_routing.py)."""
    from petalnode.compute import short_digest
    from petalnode.node import describe_runs, same_weights

    rows = [("blocks", "peer", "state", "digest", "steps/s/block", "cache tokens", "name", "address", "adapters")]
    for server in sorted(view.servers.values(), key=lambda s: (s.start, s.end, str(s.peer_id))):
        digest = short_digest(server.span_digest)
        if span_digest is not None and server.span_digest is not None and not same_weights(server, span_digest):
            digest = f"OTHER:{digest}"
        rows.append((
            f"{server.start}-{server.end - 1}", str(server.peer_id)[:12], server.state.name.lower(), digest,
            f"{server.throughput:.0f}", str(server.cache_tokens_left), server.public_name or "-",
            server.addresses[0] if server.addresses else "-", ",".join(server.adapters) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    identity = "" if span_digest is None else f" (digest {short_digest(span_digest(0, view.num_blocks))})"
    lines = [f"model {model}{identity}: {view.num_blocks} blocks, {len(view.servers)} servers"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    missing = _usable(view, span_digest).uncovered_blocks()
    if missing:
        first = missing[0]
        weights = "" if span_digest is None else " with these weights"
        lines.append(f"NOT SERVABLE: {describe_runs(missing)} of {model} have no online server{weights}; start one "
                     "with:")
        lines.append(f"  petalnode join --bootstrap {bootstrap} --model {model} --blocks {first[0]}:{first[1]}")
    else:
        weights = "" if span_digest is None else " with these weights"
        lines.append(f"servable: every block has at least one online server{weights}")
    return "\n".join(lines)


def _usable(view, span_digest):
    """The servers a client with this copy of the model would route through (all of them without a digest)."""
    from petalnode.node import SwarmView, same_weights

    if span_digest is None:
        return view
    return SwarmView.from_servers(view.num_blocks, [s for s in view.servers.values() if same_weights(s, span_digest)],
                                  model=view.model)

"""`petalnode bootstrap` and `petalnode join`: run a node until Ctrl-C / SIGTERM, then leave cleanly."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from petalnode.cli._monitor import add_monitor_options, serve_health_page
from petalnode.cli._swarm_key import add_swarm_key_option, swarm_key_from_args
from petalnode.errors import ConfigError


def add_daemon_parsers(commands: argparse._SubParsersAction) -> None:
    boot = commands.add_parser("bootstrap", help="run a DHT-only node that others join")
    boot.add_argument("--listen", default="0.0.0.0:31337", help="HOST:PORT to listen on (TCP and UDP)")
    _common(boot)
    add_monitor_options(boot)
    boot.set_defaults(run=run_bootstrap)

    join = commands.add_parser("join", help="donate this machine: serve blocks of a model to a swarm")
    join.add_argument("--bootstrap", action="append", default=[], required=True, metavar="ADDR",
                      help="address of a peer in the swarm (repeatable), e.g. tcp://203.0.113.5:31337/<peer id>")
    join.add_argument("--vram", default=None, help="memory budget for weights and cache, e.g. 512M, 8G, 1.5GiB")
    join.add_argument("--model", default=None, help="local model directory or id (default: SmolLM2-135M-Instruct)")
    group = join.add_mutually_exclusive_group()
    group.add_argument("--num-blocks", type=int, default=None, help="how many blocks to host (placement picks)")
    group.add_argument("--blocks", default=None, help="host exactly these blocks, START:END (e.g. 10:20)")
    join.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT to listen on (port 0: any free port)")
    join.add_argument("--public-name", default=None, help="a name shown in `petalnode status`")
    join.add_argument("--dtype", default=None, help="fp32, fp16, bf16 or auto (default: $PETALNODE_DTYPE, else "
                      "auto: bf16/fp16 on GPU, measured on CPU)")
    join.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    join.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    join.add_argument("--rebalance-period", type=float, default=120.0, metavar="SECONDS",
                      help="re-check placement about this often and move if the swarm clearly gains (0: never)")
    join.add_argument("--adapters", nargs="+", default=[], metavar="PATH_OR_NAME",
                      help="LoRA adapters to serve (PEFT format, safetensors): adapter directories or hub ids already "
                           "in the local Hugging Face cache; NAME=PATH sets the name clients select it by (default: "
                           "the directory name or the hub id)")
    _fair_share_flags(join)
    _common(join)
    add_monitor_options(join)
    join.set_defaults(run=run_join)


def _fair_share_flags(join: argparse.ArgumentParser) -> None:
    from petalnode.node import FairShareLimits

    d = FairShareLimits()
    fair = join.add_argument_group("fair shares", "what one peer (one peer id) may hold of this server at once; a "
                                   "peer over its share is told \"busy\" and its client uses another server")
    fair.add_argument("--peer-sessions", type=int, default=d.max_sessions, metavar="N",
                      help=f"open inference sessions per peer (default {d.max_sessions})")
    fair.add_argument("--peer-cache-share", type=float, default=d.max_cache_share, metavar="FRACTION",
                      help="share of the KV cache one peer may hold beyond its first session (default "
                           f"{d.max_cache_share})")
    fair.add_argument("--peer-requests-per-s", type=float, default=d.requests_per_s, metavar="RATE",
                      help=f"RPC calls per second per peer, on average (default {d.requests_per_s:g})")
    fair.add_argument("--peer-request-burst", type=float, default=d.request_burst, metavar="N",
                      help=f"calls a quiet peer may make at once (default {d.request_burst:g})")
    fair.add_argument("--no-fair-share", action="store_true",
                      help="no per-peer limits or compute turns: first come, first served")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--announce-host", default=None, help="host/IP others should dial (default: detected)")
    parser.add_argument("--identity", default=None, type=Path,
                        help="key file to keep the same peer id across restarts (created if missing)")
    parser.add_argument("--turn", action="append", default=[], metavar="URL",
                        help="also offer ICE this TURN server, turn:USER:PASS@HOST:PORT (repeatable; experimental: "
                             "symmetric NATs are handled by the built-in relay without it)")
    parser.add_argument("--relay-bandwidth", default="4M", metavar="BYTES_PER_S",
                        help="cap on data this node relays for NATed peers, e.g. 4M (0: relay nothing)")
    parser.add_argument("--no-nat-traversal", action="store_true",
                        help="TCP only: no STUN, WebRTC signaling or relaying (the node must be reachable directly)")
    add_swarm_key_option(parser)
    parser.add_argument("--record-ttl", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", default=None, type=Path, help=argparse.SUPPRESS)


def _split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen must be HOST:PORT, e.g. 0.0.0.0:31337, got {text!r}")
    return host.strip("[]"), int(port)


def _node_kwargs(args: argparse.Namespace, *, public: bool = False) -> dict:
    from petalnode.compute import parse_size
    from petalnode.identity import Identity
    from petalnode.node import DEFAULT_RECORD_TTL_S, NatOptions

    host, port = _split_listen(args.listen)
    identity = Identity.load_or_create(args.identity) if args.identity else Identity.generate()
    # NAT traversal by default: a bootstrap is public (STUN, signaling, relay); a server finds out with a
    # dial-back and, behind NAT, becomes reachable by WebRTC through its bootstrap (see node/_signaling.py).
    nat = None if args.no_nat_traversal else NatOptions(
        mode="public" if public else "auto", turn=tuple(args.turn),
        relay_bytes_per_s=float(parse_size(args.relay_bandwidth)) if args.relay_bandwidth != "0" else 0.0)
    return dict(identity=identity, listen_host=host, listen_port=port, announce_host=args.announce_host,
                record_ttl_s=args.record_ttl or DEFAULT_RECORD_TTL_S, nat=nat, swarm_key=swarm_key_from_args(args))


async def _serve_until_stopped(node, on_ready, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        async with serve_health_page(node, args) as health:  # {"monitor": url} with --monitor-port, else {}
            on_ready(node, health)
            await stop.wait()
            print("petalnode: shutting down (announcing offline)...", file=sys.stderr, flush=True)
    finally:
        await node.aclose()


def _write_ready(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def run_bootstrap(args: argparse.Namespace) -> int:
    from petalnode.node import Node

    node = Node(**_node_kwargs(args, public=True))

    def ready(node: Node, health: dict) -> None:
        print(str(node.address), flush=True)
        print(f"petalnode: bootstrap running. Others join with:\n  petalnode join --bootstrap {node.address}",
              file=sys.stderr, flush=True)
        _write_ready(args.ready_file, {"address": str(node.address), **health})

    asyncio.run(_serve_until_stopped(node, ready, args))
    return 0


def run_join(args: argparse.Namespace) -> int:
    from petalnode.compute import configure_threads, parse_size
    from petalnode.node import FairShareLimits, Node, ServeOptions, parse_span

    vram = parse_size(args.vram) if args.vram else None
    blocks = parse_span(args.blocks) if args.blocks else None
    if args.num_blocks is not None and args.num_blocks < 1:
        raise ConfigError("--num-blocks must be at least 1")
    fair_share = None if args.no_fair_share else FairShareLimits(
        max_sessions=args.peer_sessions, max_cache_share=args.peer_cache_share,
        requests_per_s=args.peer_requests_per_s, request_burst=args.peer_request_burst)
    configure_threads(args.threads)
    progress_bar = _ProgressBar()
    options = ServeOptions(model=args.model, vram_bytes=vram, num_blocks=args.num_blocks, blocks=blocks,
                           public_name=args.public_name, dtype=args.dtype, device=args.device,
                           rebalance_period_s=args.rebalance_period or None, adapters=tuple(args.adapters),
                           fair_share=fair_share)
    node = Node(**_node_kwargs(args), bootstrap=args.bootstrap, serve=options, progress=progress_bar.update)

    def ready(node: Node, health: dict) -> None:
        progress_bar.close()
        hosted = node.hosted
        with_adapters = f" with LoRA adapters {', '.join(sorted(hosted.adapters))}" if hosted.adapters else ""
        print(f"petalnode: serving blocks {hosted.start}:{hosted.end} of {hosted.model}{with_adapters} at "
              f"{node.address} ({hosted.throughput:.0f} steps/s per block). Ctrl-C to leave.", file=sys.stderr,
              flush=True)
        _write_ready(args.ready_file, {"address": str(node.address), "start": hosted.start, "end": hosted.end,
                                       **health})

    asyncio.run(_serve_until_stopped(node, ready, args))
    return 0


def run_monitor_node(args: argparse.Namespace) -> int:
    """`petalnode monitor`: a node (a bootstrap of its own without --bootstrap) whose job is the health page."""
    from petalnode.node import Node

    node = Node(**_node_kwargs(args, public=not args.bootstrap), bootstrap=args.bootstrap)

    def ready(node: Node, health: dict) -> None:
        print(health["monitor"], flush=True)
        _write_ready(args.ready_file, {"address": str(node.address), **health})

    asyncio.run(_serve_until_stopped(node, ready, args))
    return 0


class _ProgressBar:
    """A tqdm bar for block loading, created on first use."""

    def __init__(self) -> None:
        self._bar = None

    def update(self, label: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=f"petalnode: {label}", unit="block", file=sys.stderr)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

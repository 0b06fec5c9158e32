"""`petalnode monitor` and `--monitor-port` on bootstrap/join: serve the swarm health page from this node.

The page runs in the node's own process and event loop (petalnode.monitor), reading the swarm through the node's
DHT and timing each server with the node's RPC. Which models to watch: `--model` (repeatable); a daemon that
serves blocks watches its own model by default, any other node the default model. A model is named by a local
directory or id (its config gives the number of blocks) or as NAME=BLOCKS for a model not on this machine (a
bootstrap usually has no weights). Nothing here imports torch unless the default model must first be converted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

from petalnode.errors import ConfigError

_NAMED_BLOCKS = re.compile(r"^(?P<name>[^=]+)=(?P<blocks>\d+)$")
DEFAULT_REFRESH_S = 10.0  # = petalnode.monitor.DEFAULT_REFRESH_S, not imported here: that loads uvicorn and FastAPI


def add_monitor_parser(commands: argparse._SubParsersAction) -> None:
    from petalnode.cli._daemon import _common, run_monitor_node

    parser = commands.add_parser("monitor", help="serve a swarm health page (HTML and JSON) from a node")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="ADDR",
                        help="a peer of the swarm (repeatable); without it this node starts a swarm of its own")
    parser.add_argument("--listen", default="0.0.0.0:0", help="HOST:PORT of this node's DHT and RPC (port 0: any)")
    parser.add_argument("--port", dest="monitor_port", type=int, required=True, help="HTTP port of the page")
    parser.add_argument("--host", dest="monitor_host", default="127.0.0.1", help="HTTP host (default loopback)")
    _model_and_refresh(parser, "--model", "--refresh")
    _common(parser)
    parser.set_defaults(run=run_monitor_node)


def add_monitor_options(parser: argparse.ArgumentParser) -> None:
    """The health-page flags of `bootstrap` and `join`."""
    group = parser.add_argument_group("health page", "serve the swarm health page from this node as well")
    group.add_argument("--monitor-port", type=int, default=None, metavar="PORT", help="HTTP port (0: any free)")
    group.add_argument("--monitor-host", default="127.0.0.1", help="HTTP host of the page (default loopback)")
    _model_and_refresh(group, "--monitor-model", "--monitor-refresh")


def _model_and_refresh(parser: Any, model_flag: str, refresh_flag: str) -> None:
    parser.add_argument(model_flag, dest="monitor_model", action="append", default=[], metavar="MODEL",
                        help="model to watch (repeatable): a local directory or id, or NAME=BLOCKS (default: the "
                             "served model, else SmolLM2-135M-Instruct)")
    parser.add_argument(refresh_flag, dest="monitor_refresh", type=float, default=DEFAULT_REFRESH_S,
                        metavar="SECONDS", help=f"look at the swarm again this often (default {DEFAULT_REFRESH_S:g})")


def model_spec(text: str) -> tuple[str, int]:
    """(name as in DHT keys, number of blocks) for a `--model` value: NAME=BLOCKS, or a model on this machine."""
    from pathlib import Path

    from petalnode.compute import resolve_model

    named = _NAMED_BLOCKS.match(text)
    if named and not Path(text).exists():
        if int(named["blocks"]) < 1:
            raise ConfigError(f"{text!r}: a model has at least one block")
        return named["name"], int(named["blocks"])
    source = resolve_model(text)
    config = json.loads((source.path / "config.json").read_text())
    blocks = config.get("num_hidden_layers")
    if type(blocks) is not int or blocks < 1:
        raise ConfigError(f"{source.path / 'config.json'} has no num_hidden_layers; name the model as NAME=BLOCKS")
    return source.name, blocks


def _watched_models(node: Any, specs: list[str]) -> list[tuple[str, int]]:
    if specs:
        return [model_spec(spec) for spec in specs]
    info = getattr(node, "model_info", None)
    if info is not None:  # a server: its own model
        return [(info.source.name, info.num_blocks)]
    return [model_spec("default")]


@contextlib.asynccontextmanager
async def serve_health_page(node: Any, args: argparse.Namespace) -> AsyncIterator[dict[str, str]]:
    """While inside, `node` (started) serves the health page if `--monitor-port` was given; yields the ready-file
    fields ({"monitor": url} or {})."""
    port = getattr(args, "monitor_port", None)
    if port is None:
        yield {}
        return
    from petalnode.monitor import HealthMonitor
    from petalnode.node import collect_health

    models = _watched_models(node, args.monitor_model)

    async def collect() -> dict[str, Any]:
        return await collect_health(node.dht, node.rpc, models, measured_by=str(node.identity.peer_id))

    async with HealthMonitor(collect, host=args.monitor_host, port=port, refresh_s=args.monitor_refresh) as monitor:
        print(f"petalnode: swarm health page at {monitor.url} (JSON at {monitor.url}api/health)", file=sys.stderr,
              flush=True)
        yield {"monitor": monitor.url}

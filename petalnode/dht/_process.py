# A single DHT node as an OS process, for multi-process tests (a later `petalnode bootstrap` replaces it).
#
# Prints one JSON line {"port": ..., "peer_id": ...} on stdout once it serves, then serves until SIGTERM or
# SIGINT, when it closes cleanly and exits 0. With --announce it keeps a signed record under each given key
# (refreshed every ttl/2) whose value is its peer id text. It never imports torch.
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from petalnode.dht._node import RECORD_TTL_S, DHTNode
from petalnode.dht._protocol import RPC_TIMEOUT_S
from petalnode.errors import ConfigError
from petalnode.identity import Identity
from petalnode.swarm_key import SwarmKey


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m petalnode.dht._process", description=__doc__)
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    parser.add_argument("--bootstrap", type=_address, action="append", default=[])
    parser.add_argument("--announce", action="append", default=[], help="key to keep a record under")
    parser.add_argument("--client", action="store_true", help="client mode (not added to routing tables)")
    parser.add_argument("--rpc-timeout", type=float, default=RPC_TIMEOUT_S)
    parser.add_argument("--ttl", type=float, default=RECORD_TTL_S)
    parser.add_argument("--seed", default=None, help="deterministic identity seed (tests only)")
    parser.add_argument("--swarm-key", default=None, metavar="FILE", help="private swarm key file")
    return parser


async def serve(args: argparse.Namespace) -> None:
    identity = Identity.from_seed(args.seed.encode()) if args.seed else Identity.generate()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    swarm_key = SwarmKey.load(args.swarm_key) if args.swarm_key else None
    node = DHTNode(identity, client_mode=args.client, rpc_timeout_s=args.rpc_timeout, record_ttl_s=args.ttl,
                   swarm_key=swarm_key)
    await node.start(listen=args.listen, bootstrap=args.bootstrap)
    async with node:
        if args.announce:
            value = identity.peer_id.to_text().encode()
            node.start_refreshing(args.announce, lambda: value)
        print(json.dumps({"port": node.port, "peer_id": node.peer_id.to_text()}), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

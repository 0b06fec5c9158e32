"""`petalnode swarm-key FILE` and the `--swarm-key FILE` option every swarm command takes (private swarms)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SWARM_KEY_HELP = (
    "join the private swarm of this key file (create one with: petalnode swarm-key FILE; give the same file to "
    "every member). Peers without it cannot connect, read or write the DHT, announce or open sessions. "
    "Default: the public swarm"
)


def add_swarm_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--swarm-key", default=None, type=Path, metavar="FILE", help=SWARM_KEY_HELP)


def swarm_key_from_args(args: argparse.Namespace):  # -> SwarmKey | None (imported lazily: keeps startup light)
    from petalnode.swarm_key import SwarmKey

    return None if args.swarm_key is None else SwarmKey.load(args.swarm_key)


def add_swarm_key_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "swarm-key",
        help="create a key file for a private swarm",
        description="Write a new random 32-byte swarm key to FILE (mode 0600; an existing file is never "
        "overwritten). Start every node and client of the swarm with --swarm-key FILE.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="where to write the key")
    parser.set_defaults(run=run_swarm_key)


def run_swarm_key(args: argparse.Namespace) -> int:
    from petalnode.swarm_key import SwarmKey

    key = SwarmKey.generate()
    key.save(args.file)
    print(
        f"petalnode: wrote swarm key {args.file} (fingerprint {key.fingerprint}). Copy it to every member and "
        f"start them with --swarm-key {args.file}",
        file=sys.stderr,
    )
    return 0

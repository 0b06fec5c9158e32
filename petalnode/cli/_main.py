"""Entry point of the `petalnode` command: parse arguments, dispatch, turn our errors into clear messages."""

from __future__ import annotations

import argparse
import logging
import sys

from petalnode.cli._daemon import add_daemon_parsers
from petalnode.cli._digest import add_digest_parser
from petalnode.cli._generate import add_generate_parser
from petalnode.cli._monitor import add_monitor_parser
from petalnode.cli._status import add_status_parser
from petalnode.cli._swarm_key import add_swarm_key_parser
from petalnode.errors import PetalnodeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petalnode", description="Run large language models across many machines, BitTorrent-style."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_daemon_parsers(commands)
    add_digest_parser(commands)
    add_generate_parser(commands)
    add_monitor_parser(commands)
    add_status_parser(commands)
    add_swarm_key_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except PetalnodeError as e:
        print(f"petalnode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("petalnode: interrupted", file=sys.stderr)
        return 130

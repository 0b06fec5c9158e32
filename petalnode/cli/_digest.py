"""`petalnode digest`: a model's content digests, as a pin file for clients without a full copy of the model."""

from __future__ import annotations

import argparse


def add_digest_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "digest", help="print a model's block digests (a pin file for `generate --pinned-digests`)",
        description="Hash the model's blocks (once; cached next to the weights) and print the pin file: a client "
                    "whose copy lacks the blocks' weights routes only through servers matching these digests.",
    )
    parser.add_argument("--model", default=None, help="local model directory or id (default: SmolLM2-135M-Instruct)")
    parser.set_defaults(run=run_digest)


def run_digest(args: argparse.Namespace) -> int:
    from petalnode.compute import load_model_info, pins_to_json

    info = load_model_info(args.model)
    digests = info.block_digests(range(info.num_blocks))
    print(pins_to_json(info.source.name, [digests[b] for b in range(info.num_blocks)]))
    return 0

"""One petalnode process of the NAT bed: `python -m tests.natbed._peer ROLE '{json options}'`.

Roles: `public` (bootstrap with STUN and signaling; prints its address), `server` (serves blocks behind NAT;
prints the address it announces), `client` (generates greedily through the swarm; prints tokens and the ICE
path of each WebRTC connection). Long-lived roles run until their stdin closes. Output: one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _public(options: dict) -> None:
    from petalnode.node import NatOptions, Node

    node = Node(listen_host=options["host"],
                nat=NatOptions(mode="public", relay_bytes_per_s=options.get("relay_bytes_per_s", 4 << 20)))
    await node.start()
    _say(address=str(node.address))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.aclose()


async def _server(options: dict) -> None:
    from petalnode.node import NatOptions, Node, ServeOptions

    node = Node(
        listen_host="0.0.0.0", bootstrap=[options["bootstrap"]],
        serve=ServeOptions(model=options["model"], blocks=tuple(options["blocks"]), join_jitter_s=0,
                           rebalance_period_s=None),
        nat=NatOptions(turn=tuple(options.get("turn", ()))),
    )
    await node.start()
    _say(address=str(node.address))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await node.aclose()


def _client(options: dict) -> None:
    import torch

    from petalnode.client import AutoDistributedModelForCausalLM
    from petalnode.identity import Identity
    from petalnode.node import NatOptions, Signaling

    identity = Identity.generate()
    signaling = Signaling(identity, NatOptions(turn=tuple(options.get("turn", ()))))
    started = time.perf_counter()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        options["model"], bootstrap=[options["bootstrap"]], transport=signaling.transport(), identity=identity,
        wait_for_blocks_s=options.get("wait_s", 20.0),
    )
    try:
        prompt = torch.tensor([options["prompt"]])
        tokens = model.generate(prompt, max_new_tokens=options["new_tokens"], do_sample=False)
        elapsed = time.perf_counter() - started
        paths = {str(k): v for k, v in signaling.webrtc.connection_paths().items()}
    finally:
        model.close()
    _say(tokens=tokens[0].tolist(), paths=paths, seconds=round(elapsed, 3))


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    role, options = sys.argv[1], json.loads(sys.argv[2])
    if role == "client":
        _client(options)
    else:
        asyncio.run({"public": _public, "server": _server}[role](options))


if __name__ == "__main__":
    main()

"""The NAT bed's client: `python -m tests.natbed._peer client '{json options}'`.

Generates greedily through the swarm with a TCP + WebRTC transport and prints one JSON line: the tokens, the
path of each WebRTC connection (ICE candidate pair, or "relayed via ...") and the time taken. (The bootstrap and
the server are the real `petalnode bootstrap` / `petalnode join` commands.)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


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
        timings = [_timed(model, prompt, options["new_tokens"]) for _ in range(options.get("timed_runs", 0))]
        paths = {str(k): v for k, v in signaling.webrtc.connection_paths().items()}
    finally:
        model.close()
    _say(tokens=tokens[0].tolist(), paths=paths, seconds=round(elapsed, 3), timings=timings)


def _timed(model, prompt, new_tokens: int) -> dict:
    """Time to first token and decode tokens/s of one greedy generation (a streamer stamps each token)."""
    stamps: list[float] = []

    class Clock:
        def put(self, value: object) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    started = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=Clock(),
                   pad_token_id=0)
    tokens = stamps[1:]
    return {"ttft_s": tokens[0] - started, "decode_tokens_per_s": (len(tokens) - 1) / (tokens[-1] - tokens[0])}


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    role, options = sys.argv[1], json.loads(sys.argv[2])
    if role != "client":
        raise SystemExit(f"unknown role {role!r}")
    _client(options)


if __name__ == "__main__":
    main()

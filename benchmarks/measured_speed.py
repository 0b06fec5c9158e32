"""How many sessions a server announcing far more than its real speed attracts, and what the honest route costs; JSON.

Two servers host every block of a tiny model (their own processes): an honest one, and tests/slow_liar_server.py
announcing `--claim-factor` times its measured throughput while sleeping `--delay` s before each step (so it is
really slower; its outputs are right). `--clients` clients, one after another, each run `--generations` greedy
generations; for each generation we record whether the session's route went through the liar, whether the liar
computed any step at all (its step counter: with the library's default spot-checks it is also the only possible
second opinion), and the median decode-step latency the client saw. Each client learns on its own, so the liar's
best case is one session per client: the first, before anything was measured.

Run: .venv/bin/python benchmarks/measured_speed.py [--clients 3] [--generations 6] [--claim-factor 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.identity import PeerAddress
from petalnode.node import LocalSwarm
from tests.slow_liar_server import liar_steps, start_liar
from tests.tiny_models import build_tiny_model

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
BLOCKS = 6


class StepClock:
    """A transformers streamer that timestamps every token after the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run(args: argparse.Namespace, workdir: Path) -> dict:
    model_dir = build_tiny_model(workdir / "model", num_layers=BLOCKS)
    count_file = workdir / "liar-steps"
    swarm = LocalSwarm(str(model_dir), threads=1)
    clients = []
    try:
        swarm.start()
        swarm.add_server(["--blocks", f"0:{BLOCKS}"])
        liar = start_liar(swarm, model_dir, count_file, blocks=f"0:{BLOCKS}", claim_factor=args.claim_factor,
                          delay_s=args.delay)
        liar_id = PeerAddress.parse(liar.info["address"]).peer_id
        for _ in range(args.clients):
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[swarm.bootstrap_address])
            generations = []
            try:
                for _ in range(args.generations):
                    before, clock = liar_steps(count_file), StepClock()
                    with model.inference_session(max_length=PROMPT.shape[1] + args.tokens) as session:
                        model.generate(PROMPT, max_new_tokens=args.tokens, do_sample=False, streamer=clock)
                        route = {hop.peer_id for hop in session.session.hops}
                    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
                    generations.append({"through_liar": liar_id in route,
                                        "liar_computed": liar_steps(count_file) > before,
                                        "median_step_ms": round(1000 * statistics.median(steps), 2)})
            finally:
                model.close()
            clients.append(generations)
    finally:
        swarm.stop()
    through = [g["through_liar"] for c in clients for g in c]
    honest_ms = [g["median_step_ms"] for c in clients for g in c if not g["through_liar"]]
    liar_ms = [g["median_step_ms"] for c in clients for g in c if g["through_liar"]]
    return {
        "claim_factor": args.claim_factor, "liar_delay_s": args.delay, "clients": args.clients,
        "generations_per_client": args.generations, "tokens": args.tokens,
        "liar_sessions": sum(through), "sessions": len(through), "liar_share": round(sum(through) / len(through), 3),
        "first_session_through_liar": [c[0]["through_liar"] for c in clients],
        "sessions_where_liar_computed_steps": sum(g["liar_computed"] for c in clients for g in c),
        "median_step_ms_honest": statistics.median(honest_ms) if honest_ms else None,
        "median_step_ms_liar": statistics.median(liar_ms) if liar_ms else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--claim-factor", type=float, default=1000.0)
    parser.add_argument("--delay", type=float, default=0.03, help="seconds the liar sleeps before each step")
    args = parser.parse_args()
    if args.clients < 1 or args.generations < 1 or args.tokens < 2:
        parser.error("need at least 1 client, 1 generation and 2 tokens")
    with tempfile.TemporaryDirectory(prefix="petalnode-speed-") as tmp:
        print(json.dumps(run(args, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()

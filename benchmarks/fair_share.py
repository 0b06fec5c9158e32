"""An honest client's per-step latency alone and under a flood from another peer, fair shares on vs off; JSON.

One server hosts every block of the model (its own process); the honest client (this process) runs greedy
generations and records the time of every decoding step (a streamer timestamps each new token). The flood is
tests/fair_share_flooder.py in its own process and peer id: it opens `--flood-sessions` sessions of
`--flood-max-length` tokens (small enough that, with fair shares off too, the honest client still finds cache,
so the comparison is about compute and loop time) and steps in all of them as fast as the server answers.
For each mode (`on`: default limits; `off`: `--no-fair-share`) the same server process serves both phases:
alone, then under the flood. Medians and p90s of the per-step latency are printed side by side, with the
ratio flood/alone per mode.

Run: .venv/bin/python benchmarks/fair_share.py [--quick] [--model default] [--tokens 48] [--generations 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.node import LocalSwarm

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


class StepClock:
    """A transformers streamer that timestamps every token after the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def honest_steps(model_dir: str | None, bootstrap: str, *, tokens: int, generations: int) -> list[float]:
    """Per-step latencies (s) of `generations` greedy generations; the first step (prefill) is left out."""
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[bootstrap])
    steps: list[float] = []
    try:
        for _ in range(generations):
            clock = StepClock()
            model.generate(PROMPT, max_new_tokens=tokens, do_sample=False, streamer=clock)
            steps += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    finally:
        model.close()
    return steps


def summary(steps: list[float]) -> dict:
    ordered = sorted(steps)
    return {
        "steps": len(steps),
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2),
    }


def run_mode(mode: str, model_dir: str | None, hidden: int, args: argparse.Namespace) -> dict:
    server_args = ["--blocks", f"0:{args.blocks}", "--rebalance-period", "0"]
    if mode == "off":
        server_args.append("--no-fair-share")
    with LocalSwarm(model_dir, threads=args.threads) as swarm:
        server = swarm.add_server(server_args)
        alone = honest_steps(model_dir, swarm.bootstrap_address, tokens=args.tokens, generations=args.generations)
        flooder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fair_share_flooder",
                "--server",
                server.info["address"],
                "--hidden",
                str(hidden),
                "--sessions",
                str(args.flood_sessions),
                "--max-length",
                str(args.flood_max_length),
                "--duration",
                "600",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert flooder.stdout is not None
            ready = json.loads(flooder.stdout.readline())["ready"]
            time.sleep(1.0)  # let the flood reach full speed
            flooded = honest_steps(model_dir, swarm.bootstrap_address, tokens=args.tokens, generations=args.generations)
            out, _ = flooder.communicate(timeout=60)
            done = json.loads(out.strip().splitlines()[-1])["done"]
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.wait(10)
    return {
        "alone": summary(alone),
        "flood": summary(flooded),
        "flood_over_alone_median": round(statistics.median(flooded) / statistics.median(alone), 2),
        "flooder": {
            "opened_at_start": ready["opened"],
            "opened": done["opened"],
            "steps": done["steps"],
            "refusals": done["refusals"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, short generations (about a minute)")
    parser.add_argument("--model", default=None, help="'default' for the default model (else a tiny random one)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--flood-sessions", type=int, default=16)
    parser.add_argument("--flood-max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.generations = 24, 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fair-share-bench-") as tmp:
        if args.model == "default":
            from petalnode.compute import load_model_info

            info = load_model_info(None)
            model_dir, hidden, args.blocks = None, info.hidden_size, info.num_blocks
        else:
            from tests.tiny_models import build_tiny_model

            model_dir, hidden, args.blocks = str(build_tiny_model(Path(tmp) / "tiny", num_layers=6)), 64, 6
        started = time.perf_counter()
        results = {mode: run_mode(mode, model_dir, hidden, args) for mode in ("on", "off")}
    print(
        json.dumps(
            {
                "benchmark": "fair_share",
                "model": args.model or "tiny-llama-6x64",
                "tokens": args.tokens,
                "generations": args.generations,
                "flood_sessions": args.flood_sessions,
                "flood_max_length": args.flood_max_length,
                "median_ms": {
                    mode: {"alone": r["alone"]["median_ms"], "flood": r["flood"]["median_ms"]}
                    for mode, r in results.items()
                },
                "modes": results,
                "wall_s": round(time.perf_counter() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

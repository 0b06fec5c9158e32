"""What output verification catches and what it costs, on a loopback swarm of the default model; prints JSON.

The swarm: a bootstrap, an honest server on blocks 0-14, two honest servers on 15-29, and one corrupting server
on 0-14 (the test-only `tests.corrupting_server`) announcing 100000 steps/s, so every client routes through it.
Blocks 0-14 thus have one liar among two servers; when they disagree, no third server hosts those blocks and the
client's own copy of the blocks decides (`LocalReferee`). Servers compute in fp32, the client too.

For each corruption kind and each mode (off, sample, full), `--trials` generations, each by a fresh client (no
ban carries over) of `--new-tokens` greedy tokens after a different ~60-token prompt:
- exact_share: generations whose tokens equal local transformers' (fp32, greedy) on the same prompt;
- detection: median of the position where the liar was first caught, and of the delay after its first wrong one;
- server_cpu_ratio: the servers' CPU time (utime + stime of their processes) per generation, median, over the
  same with verification off, for the kind "honest" (the corrupting server never lies): what verification costs.
Corruption kinds: honest; noise (1% of the output's RMS from the first step); zeros; skip (returns its input, as
if it skipped its blocks); late (the same noise, only after 12 steps of each session); long (the same noise, only
at positions >= 64: long contexts).

Run: .venv/bin/python benchmarks/integrity.py [--quick] [--trials 5] [--new-tokens 24] [--kinds noise,zeros]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PETALNODE_DTYPE", "fp32")  # before petalnode starts processes: exact comparisons

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.compute import load_model_info
from petalnode.identity import PeerAddress
from petalnode.node import LocalSwarm, SwarmProcess

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "Peer-to-peer systems let many ordinary machines cooperate on a task none of them could do alone. Each peer "
    "hosts a contiguous range of transformer blocks and a distributed hash table tells clients who hosts which "
    "blocks. A client that cannot trust strangers re-checks their work on other servers, bans the ones that lie "
    "and rolls its session back to the last position it checked, so its output stays exactly what an honest "
    "swarm would give. The cost of that safety is measured here, side by side with the same swarm unchecked. "
)
FIRST_WRONG_STEP = 12
LONG_FROM = 64
KINDS: dict[str, list[str]] = {
    "honest": ["--kind", "noise", "--after-steps", str(10**9)],
    "noise": ["--kind", "noise", "--noise", "0.01"],
    "zeros": ["--kind", "zeros"],
    "skip": ["--kind", "skip"],
    "late": ["--kind", "noise", "--noise", "0.01", "--after-steps", str(FIRST_WRONG_STEP)],
    "long": ["--kind", "noise", "--noise", "0.01", "--from-position", str(LONG_FROM)],
}


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _start_liar(swarm: LocalSwarm, corruption: list[str], index: int) -> SwarmProcess:
    ready, log = swarm.workdir / f"liar-{index}.ready", swarm.workdir / f"liar-{index}.log"
    command = [sys.executable, "-m", "tests.corrupting_server", *corruption, "--claim-throughput", "100000", "--",
               "--bootstrap", swarm.bootstrap_address, "--listen", "127.0.0.1:0", "--blocks", "0:15",
               "--threads", "1", "--ready-file", str(ready)]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=ROOT)
    liar = SwarmProcess("liar", process, ready, log)
    liar.wait_ready(time.monotonic() + 180)
    return liar


def _first_wrong_position(kind: str, prompt_length: int) -> int | None:
    if kind == "honest":
        return None
    if kind == "late":  # step 1 is the prefill; step k > 1 computes position prompt_length + k - 2
        return prompt_length + FIRST_WRONG_STEP - 1
    if kind == "long":
        return LONG_FROM
    return 0


def _trial(bootstrap: str, path: Path, ids: torch.Tensor, new_tokens: int, verify: str,
           pids: list[int]) -> dict:
    model = AutoDistributedModelForCausalLM.from_pretrained(None, bootstrap=[bootstrap], verify=verify)
    try:
        cpu_before = _cpu_s(pids)
        started = time.perf_counter()
        with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
            output = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0)
            stats = session.session.verify_stats
        elapsed = time.perf_counter() - started
        cpu = _cpu_s(pids) - cpu_before
        banned = {str(p) for p in model.chain.client.bans.banned()}
    finally:
        model.close()
    return {"output": output, "seconds": elapsed, "server_cpu_s": cpu, "banned": banned,
            "stats": None if stats is None else stats.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 trials, 16 tokens")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--modes", default="off,sample,full")
    args = parser.parse_args()
    trials, new_tokens = (2, 16) if args.quick else (args.trials, args.new_tokens)
    kinds, modes = args.kinds.split(","), args.modes.split(",")
    torch.set_num_threads(1)
    info = load_model_info(None)
    path = Path(info.source.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    words = TEXT.split()
    prompts = [tokenizer(" ".join(words[i * 3:]) , return_tensors="pt").input_ids[:, :60] for i in range(trials)]
    reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    references = [reference_model.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=0) for p in prompts]
    del reference_model
    results: dict[str, dict] = {}
    with LocalSwarm(None, spans=[(0, 15), (15, 30), (15, 30)], threads=1) as swarm:
        for index, kind in enumerate(kinds):
            liar = _start_liar(swarm, KINDS[kind], index)
            liar_id = str(PeerAddress.parse(liar.info["address"]).peer_id)
            pids = [s.process.pid for s in swarm.servers] + [liar.process.pid]
            try:
                for mode in modes:
                    runs = []
                    for trial in range(trials):
                        run = _trial(swarm.bootstrap_address, path, prompts[trial], new_tokens, mode, pids)
                        run["exact"] = torch.equal(run.pop("output"), references[trial])
                        run["liar_banned"] = liar_id in run.pop("banned")
                        runs.append(run)
                    results.setdefault(kind, {})[mode] = _summary(kind, runs, prompts[0].shape[1])
                    print(json.dumps({kind: {mode: results[kind][mode]}}), file=sys.stderr, flush=True)
            finally:
                liar.stop()
                liar.process.wait(30)
    honest = results.get("honest", {})
    if "off" in honest:
        for mode in modes:
            if mode in honest:
                honest[mode]["server_cpu_ratio_vs_off"] = round(
                    honest[mode]["server_cpu_s_median"] / honest["off"]["server_cpu_s_median"], 3)
    print(json.dumps({"model": info.source.name, "trials": trials, "new_tokens": new_tokens,
                      "layout": "liar 0-14 (claims 100000 steps/s), honest 0-14, honest 15-29 x2; fp32",
                      "results": results}, indent=2))


def _summary(kind: str, runs: list[dict], prompt_length: int) -> dict:
    detected = [r["stats"]["first_detection_position"] for r in runs
                if r["stats"] and r["stats"]["first_detection_position"] is not None]
    first_wrong = _first_wrong_position(kind, prompt_length)
    summary: dict[str, object] = {
        "exact_share": sum(r["exact"] for r in runs) / len(runs),
        "liar_banned_share": sum(r["liar_banned"] for r in runs) / len(runs),
        "server_cpu_s_median": round(statistics.median(r["server_cpu_s"] for r in runs), 3),
        "seconds_median": round(statistics.median(r["seconds"] for r in runs), 3),
    }
    if detected:
        summary["first_detection_position_median"] = statistics.median(detected)
        if first_wrong is not None:
            summary["detection_delay_positions_median"] = statistics.median(d - first_wrong for d in detected)
    stats = [r["stats"] for r in runs if r["stats"]]
    if stats:
        for name in ("checks", "rollbacks", "referee_runs", "max_unverified_steps"):
            summary[f"{name}_median"] = statistics.median(s[name] for s in stats)
    return summary


if __name__ == "__main__":
    main()

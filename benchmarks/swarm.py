"""Local transformers vs the same model through a loopback swarm of 3 servers (10 blocks each); prints JSON.

Measured side by side in one run, interleaved (local, swarm, local, swarm, ...) so machine noise hits both:
- decode tokens/s: median over runs of (new tokens - 1) / (time from first to last token), greedy;
- time to first token for a 16-token and a 512-token prompt (prefill + one token), median over runs;
- ratios swarm / local (decode) and swarm - local (TTFT overhead).

Thread settings: the client process (and the local reference) use --threads torch threads; each server process
uses --server-threads. Hops run one after another, so at any moment only one process computes.

Run: .venv/bin/python benchmarks/swarm.py [--runs 3] [--new-tokens 64] [--threads 2] [--server-threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.compute import load_model_info
from petalnode.node import LocalSwarm

TEXT = (
    "Peer-to-peer systems let many ordinary machines cooperate on a task none of them could do alone. "
    "Each peer hosts a contiguous range of transformer blocks and a distributed hash table tells clients "
    "who hosts which blocks. "
)


class _Clock:
    """A streamer that timestamps every put(): the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _run(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of one greedy generation."""
    clock = _Clock()
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                   pad_token_id=0)
    token_times = clock.times[1:]
    ttft = token_times[0] - started
    decode = (len(token_times) - 1) / (token_times[-1] - token_times[0])
    return ttft, decode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=2)
    # fp32 compares like with like (the local model is fp32); "auto" is what `petalnode join` picks on this CPU
    # (bf16 where it measures clearly faster, e.g. with AVX512-BF16).
    parser.add_argument("--server-dtype", default="fp32", choices=["fp32", "bf16", "auto"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = load_model_info(None)
    tokenizer = AutoTokenizer.from_pretrained(info.source.path)
    all_ids = tokenizer(TEXT * 40, return_tensors="pt").input_ids
    prompts = {16: all_ids[:, :16], 512: all_ids[:, :512]}
    local = AutoModelForCausalLM.from_pretrained(info.source.path, dtype=torch.float32)
    results: dict[str, dict[str, list[float]]] = {
        name: {"decode_tokens_per_s": [], "ttft_16_s": [], "ttft_512_s": []} for name in ("local", "swarm")
    }
    started = time.perf_counter()
    with LocalSwarm(None, spans=[(0, 10), (10, 20), (20, 30)], threads=args.server_threads,
                    extra_args=["--rebalance-period", "0", "--dtype", args.server_dtype]) as swarm:
        # Our own processes, as `petalnode generate` without --bootstrap: not verified.
        remote = AutoDistributedModelForCausalLM.from_pretrained(None, bootstrap=[swarm.bootstrap_address],
                                                                 verify="off")
        try:
            _run(remote, prompts[16], 4)  # warm-up: connections, RTT probes, first allocations
            _run(local, prompts[16], 4)
            for _ in range(args.runs):
                for name, model in (("local", local), ("swarm", remote)):
                    ttft16, decode = _run(model, prompts[16], args.new_tokens)
                    ttft512, _ = _run(model, prompts[512], 2)
                    results[name]["decode_tokens_per_s"].append(decode)
                    results[name]["ttft_16_s"].append(ttft16)
                    results[name]["ttft_512_s"].append(ttft512)
        finally:
            remote.close()
    medians = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    print(json.dumps({
        "benchmark": "swarm",
        "model": info.source.name,
        "servers": "3 processes on 127.0.0.1, blocks 0-9, 10-19, 20-29, TCP (encrypted), raw hidden states",
        "server_dtype": args.server_dtype,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "threads": {"client_and_local": args.threads, "each_server": args.server_threads,
                    "cores": os.cpu_count()},
        "median": medians,
        "all_runs": results,
        "decode_ratio_swarm_over_local": medians["swarm"]["decode_tokens_per_s"]
        / medians["local"]["decode_tokens_per_s"],
        "ttft_16_overhead_s": medians["swarm"]["ttft_16_s"] - medians["local"]["ttft_16_s"],
        "ttft_512_overhead_s": medians["swarm"]["ttft_512_s"] - medians["local"]["ttft_512_s"],
        "machine": platform.processor() or platform.machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

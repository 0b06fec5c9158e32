"""Training throughput: prompt tuning through a loopback swarm of 3 servers vs local autograd; prints JSON.

One training step = forward of a batch with a trainable prompt prepended, causal-LM loss, backward (the frozen
blocks' backward runs on the servers, which recompute their forward), optimizer step. Measured side by side in
one run, interleaved (local, swarm, local, swarm, ...) so machine noise hits both; medians over --runs.

- local: plain transformers, the same model and dtype (fp32), the prompt prepended through `inputs_embeds`, torch
  autograd with frozen weights (gradients only for the prompt);
- swarm: `DistributedModelForCausalLM(tuning_mode=...)` through 3 server processes on 127.0.0.1 (blocks 0-9,
  10-19, 20-29), TCP with encryption, raw fp32 hidden states.

Tokens/s counts input positions (batch x sequence, prompt positions excluded). The gradients of both are also
compared (max abs difference), so a fast but wrong path cannot look good.

Run: .venv/bin/python benchmarks/training.py [--runs 5] [--batch 4] [--seq 64] [--mode ptune]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from petalnode.client import DistributedModelForCausalLM
from petalnode.compute import load_model_info
from petalnode.node import LocalSwarm


def _local_step(model, prompt: torch.nn.Parameter, optimizer, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    embeds = torch.cat([prompt[None].expand(ids.shape[0], -1, -1), model.get_input_embeddings()(ids)], 1)
    logits = model(inputs_embeds=embeds).logits[:, prompt.shape[0]:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def _swarm_step(model, optimizer, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--mode", default="ptune", choices=["ptune"])  # local baseline has no deep prompts
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = load_model_info(None)
    ids = torch.randint(10, info.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    local = AutoModelForCausalLM.from_pretrained(info.source.path, dtype=torch.float32, attn_implementation="sdpa")
    local.requires_grad_(False)
    started = time.perf_counter()
    times: dict[str, list[float]] = {"local": [], "swarm": []}
    with LocalSwarm(None, spans=[(0, 10), (10, 20), (20, 30)], threads=args.server_threads,
                    extra_args=["--rebalance-period", "0", "--dtype", "fp32"]) as swarm:
        remote = DistributedModelForCausalLM.from_pretrained(
            None, bootstrap=[swarm.bootstrap_address], tuning_mode=args.mode, pre_seq_len=args.pre_seq_len,
            verify="off")
        try:
            prompt = torch.nn.Parameter(remote.prompt_tuning.prompt_embeddings.detach().clone())
            # Same starting point; gradient check on the first (warm-up) step, before either optimizer moves.
            remote_params = [p for p in remote.parameters() if p.requires_grad]
            local_opt = torch.optim.SGD([prompt], lr=0.0)
            remote_opt = torch.optim.SGD(remote_params, lr=0.0)
            _local_step(local, prompt, local_opt, ids)
            _swarm_step(remote, remote_opt, ids)
            grad_diff = (prompt.grad - remote.prompt_tuning.prompt_embeddings.grad).abs().max().item()
            grad_scale = prompt.grad.abs().max().item()
            for _ in range(args.runs):
                times["local"].append(_local_step(local, prompt, local_opt, ids))
                times["swarm"].append(_swarm_step(remote, remote_opt, ids))
        finally:
            remote.close()
    tokens = args.batch * args.seq
    median_s = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "benchmark": "training",
        "model": info.source.name,
        "step": f"{args.mode}, prompt {args.pre_seq_len}, batch {args.batch} x {args.seq} tokens, forward + "
                "backward + optimizer step",
        "servers": "3 processes on 127.0.0.1, blocks 0-9, 10-19, 20-29, TCP (encrypted), raw fp32",
        "threads": {"client_and_local": args.threads, "each_server": args.server_threads, "cores": os.cpu_count()},
        "runs": args.runs,
        "median_step_s": median_s,
        "median_tokens_per_s": {name: tokens / s for name, s in median_s.items()},
        "ratio_swarm_over_local_tokens_per_s": median_s["local"] / median_s["swarm"],
        "prompt_grad_max_abs_diff": grad_diff,
        "prompt_grad_max_abs": grad_scale,
        "all_step_s": times,
        "machine": platform.processor() or platform.machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

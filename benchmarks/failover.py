"""Kill -9 a server at each position of the chain mid-generation, many times; prints JSON.

The default model runs through three spans of ten blocks on a loopback swarm, each span with a spare server. For
every trial a 64-token greedy generation is interrupted after 16 tokens by SIGKILL of the server at the chosen
position (first, middle, last); the output is compared with the fault-free output, and the time the failing step
took (detection + reroute + replay) is recorded. A replacement spare is started after each kill.

Run: .venv/bin/python benchmarks/failover.py [--trials 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.compute import load_model_info
from petalnode.node import LocalSwarm
from tests.integration.test_failover import FAIL_AT_TOKEN, NEW_TOKENS, SPANS, _FailAt, _process_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = load_model_info(None)
    tokenizer = AutoTokenizer.from_pretrained(info.source.path)
    ids = tokenizer("Once upon a time, in a small village,", return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(info.source.path, dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    results: dict[str, dict] = {}
    started = time.perf_counter()
    with LocalSwarm(None, spans=SPANS + SPANS, threads=args.threads,
                    extra_args=["--rebalance-period", "0", "--dtype", "fp32"]) as swarm:  # as the reference
        for position, name in enumerate(("first", "middle", "last")):
            identical, reroutes, failing_step_s, normal_step_s = 0, [], [], []
            for _ in range(args.trials):
                def kill(session, position=position) -> None:
                    victim = _process_of(swarm, session.session.hops[position].peer_id)
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(10)

                model = AutoDistributedModelForCausalLM.from_pretrained(None, bootstrap=[swarm.bootstrap_address],
                                                                        verify="off")
                try:
                    streamer = _FailAt(model, FAIL_AT_TOKEN, kill)
                    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
                        reroutes.append(session.reroutes)
                finally:
                    model.close()
                identical += int(torch.equal(out, expected))
                steps = streamer.step_times[2:]  # skip the prompt and the prefill
                failing_step_s.append(steps[FAIL_AT_TOKEN - 1])
                normal_step_s.append(statistics.median(steps))
                start, end = SPANS[position]
                swarm.add_server(["--blocks", f"{start}:{end}"])
            results[name] = {
                "trials": args.trials, "identical_to_fault_free": identical,
                "reroutes_per_generation": statistics.mean(reroutes),
                "failing_step_s_median": statistics.median(failing_step_s),
                "failing_step_s_max": max(failing_step_s),
                "normal_step_s_median": statistics.median(normal_step_s),
            }
    print(json.dumps({"benchmark": "failover", "model": info.source.name, "new_tokens": NEW_TOKENS,
                      "kill_after_token": FAIL_AT_TOKEN, "positions": results,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()

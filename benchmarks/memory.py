"""Peak RSS of a server process holding 10 of 30 blocks, vs the client head and the whole model; prints JSON.

Weights are memory-mapped by safetensors, so every case reads all of its weights once (as serving does) before
peak RSS is taken. Each configuration runs in a fresh subprocess (peak RSS is per process), side by side in one run:
- `blocks 10:20`: a server span (what `petalnode join --blocks 10:20` loads);
- `client head`: embeddings, final norm, LM head;
- `all 30 blocks + head`: petalnode loading everything;
- `transformers full model`: plain AutoModelForCausalLM.from_pretrained, the reference.

Run: .venv/bin/python benchmarks/memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = {
    "baseline (imports only)": "pass",
    "blocks 10:20": "from petalnode.compute import load_block_span as L; touch(L(info, 10, 20))",
    "client head": "from petalnode.compute import load_client_head as L; touch(L(info))",
    "all 30 blocks + head": "from petalnode.compute import load_block_span as L, load_client_head as H; "
                            "touch(L(info, 0, 30)); touch(H(info))",
    "transformers full model": "from transformers import AutoModelForCausalLM as A; "
                               "touch(A.from_pretrained(info.source.path, dtype=torch.float32))",
}

TEMPLATE = """
import json, resource, torch, transformers
from petalnode.compute import load_model_info
info = load_model_info(None)
kept = []
def touch(module):
    # Weights are memory-mapped; read every byte, as serving does, so they count in RSS.
    for p in module.state_dict().values():
        p.float().sum()
    kept.append(module)
{body}
print(json.dumps({{"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "bytes_loaded": info.reader.bytes_loaded}}))
"""


def main() -> None:
    results = {}
    for name, body in CASES.items():
        out = subprocess.run([sys.executable, "-c", TEMPLATE.format(body=body)], capture_output=True, text=True,
                             check=True, timeout=600)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["baseline (imports only)"]["peak_rss_mib"]
    for value in results.values():
        value["above_baseline_mib"] = round(value["peak_rss_mib"] - base, 1)
        value["peak_rss_mib"] = round(value["peak_rss_mib"], 1)
    full = results["all 30 blocks + head"]["above_baseline_mib"]
    print(json.dumps({
        "benchmark": "memory",
        "results": results,
        "server_10_of_30_vs_all_ratio": round(results["blocks 10:20"]["above_baseline_mib"] / full, 3),
    }, indent=2))


if __name__ == "__main__":
    main()

"""How far apart two honest servers' outputs for the same blocks can be: the tolerance of output verification.

A verifying client compares a hop's outputs (computed token by token, as decoding does) with a shadow server's
(computed in multi-token catch-up steps, or as one prefill after a replay), possibly in another dtype. This runs
a span of the default model (in process, the server's own span code) both ways on a real text and prints, per
dtype pair, the largest per-position relative L2 difference (`petalnode.node._verification.relative_errors`),
next to the tolerance the client uses and to what the corruptions of benchmarks/integrity.py look like.

Run: .venv/bin/python benchmarks/verify_tolerance.py [--blocks 0:10] [--positions 96]
"""

from __future__ import annotations

import argparse
import json

import torch

from petalnode.client import LocalBlockChain
from petalnode.compute import load_client_head, load_model_info
from petalnode.node._verification import relative_errors, tolerance

TEXT = ("Peer-to-peer systems let many ordinary machines cooperate on a task none of them could do alone. Each "
        "peer hosts a contiguous range of transformer blocks and a distributed hash table tells clients who hosts "
        "which blocks. A client that cannot trust strangers re-checks their work on other servers. ") * 4


def _run(chain: LocalBlockChain, hidden: torch.Tensor, *, prefill: int, chunk: int) -> torch.Tensor:
    """Outputs for every position: a prefill of `prefill` positions, then steps of `chunk` positions."""
    session = chain.open_session(hidden.shape[1])
    try:
        outs = [session.step(hidden[:, :prefill], start_position=0)]
        for start in range(prefill, hidden.shape[1], chunk):
            outs.append(session.step(hidden[:, start : start + chunk], start_position=start))
        return torch.cat(outs, dim=1)
    finally:
        session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="0:10")
    parser.add_argument("--positions", type=int, default=96)
    args = parser.parse_args()
    start, end = (int(x) for x in args.blocks.split(":"))
    info = load_model_info(None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.source.path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, : args.positions]
    head = load_client_head(info, dtype=torch.float32)
    with torch.no_grad():
        hidden = head.embed(ids).float()
    ways = {"decode": dict(prefill=8, chunk=1), "catch_up_8": dict(prefill=8, chunk=8),
            "prefill": dict(prefill=ids.shape[1], chunk=1)}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        chain = LocalBlockChain(info, spans=[(start, end)], dtype=dtype)
        with torch.no_grad():
            for way, kw in ways.items():
                outputs[name, way] = _run(chain, hidden.to(dtype), **kw).float()
        chain.close()
    pairs = {
        "fp32 decode vs fp32 catch_up_8": (("fp32", "decode"), ("fp32", "catch_up_8")),
        "fp32 decode vs fp32 prefill": (("fp32", "decode"), ("fp32", "prefill")),
        "bf16 decode vs bf16 catch_up_8": (("bf16", "decode"), ("bf16", "catch_up_8")),
        "bf16 decode vs bf16 prefill": (("bf16", "decode"), ("bf16", "prefill")),
        "fp32 decode vs bf16 catch_up_8": (("fp32", "decode"), ("bf16", "catch_up_8")),
        "bf16 decode vs fp32 prefill": (("bf16", "decode"), ("fp32", "prefill")),
    }
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    report: dict[str, object] = {"model": info.source.name, "blocks": [start, end], "positions": ids.shape[1]}
    rows = {}
    for label, (a, b) in pairs.items():
        errors = relative_errors(outputs[a], outputs[b])
        rows[label] = {"max": float(errors.max()), "median": float(errors.median()),
                       "tolerance": tolerance(dtypes[a[0]], dtypes[b[0]])}
    report["honest_pairs"] = rows
    reference = outputs["fp32", "decode"]
    rms = reference.pow(2).mean().sqrt()
    generator = torch.Generator().manual_seed(0)
    corruptions = {
        "noise_1e-2_rms": reference + 1e-2 * rms * torch.randn(reference.shape, generator=generator),
        "noise_1e-3_rms": reference + 1e-3 * rms * torch.randn(reference.shape, generator=generator),
        "zeros": torch.zeros_like(reference),
        "input_passed_through (skipped blocks)": hidden.float(),
    }
    report["corruptions_vs_fp32"] = {name: float(relative_errors(bad, reference).min())
                                     for name, bad in corruptions.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

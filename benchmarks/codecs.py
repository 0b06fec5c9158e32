"""Codec benchmark on real hidden states of the default model; prints JSON.

1. bytes per hidden-state vector relative to fp32, encode/decode throughput and error for every codec
   (measured by `codec_speed.measure_codecs` on the output of block 15 for a 128-token prompt);
2. greedy agreement: 10 prompts x 32 new tokens through 3 spans of 10 blocks, every hop's activations
   (client -> span 1 -> span 2 -> span 3 -> client) passing through each lossy codec, compared with fp32 hops.

Run: .venv/bin/python benchmarks/codecs.py [--threads N] [--prompts K] [--tokens T]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec_speed import measure_codecs

from petalnode.client import AutoDistributedModelForCausalLM, LocalBlockChain, even_spans
from petalnode.codecs import TensorCodec, decode_tensor, encode_tensor
from petalnode.compute import load_block_span, load_client_head, load_model_info

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "Machine learning is a field of",
    "The first president of the United States was",
    "In 1969, astronauts landed on",
]


class _CodecHops:
    """Wrap a chain so every hop's activations go through `codec` (encode -> bytes-ready dict -> decode)."""

    def __init__(self, chain: LocalBlockChain, codec: TensorCodec, zstd: bool) -> None:
        self.chain, self.codec, self.zstd = chain, codec, zstd

    def _hop(self, hidden: torch.Tensor) -> torch.Tensor:
        return decode_tensor(encode_tensor(hidden.contiguous(), self.codec, zstd=self.zstd)).to(hidden.dtype)

    def open_session(self, max_length: int, *, batch_size: int = 1):
        inner = self.chain.open_session(max_length, batch_size=batch_size)
        hop = self._hop

        class Session:
            @property
            def position(self) -> int:
                return inner.position

            def step(self, hidden, *, start_position=None):
                for session in inner._sessions:
                    hidden = session.step(hop(hidden), start_position=start_position)
                return hop(hidden)

            def close(self) -> None:
                inner.close()

        return Session()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """A stateless pass with the same lossy hops (generate uses sessions; this keeps the contract whole)."""
        positions = torch.arange(hidden.shape[1])[None]
        for span in self.chain.spans:
            hidden = span.forward_span(self._hop(hidden), None, positions)
        return self._hop(hidden)

    def close(self) -> None:
        self.chain.close()


def greedy_agreement(info, tokenizer, codec: TensorCodec | None, prompts: list[str], new_tokens: int, reference):
    spans = even_spans(info.num_blocks, 3)
    chain = LocalBlockChain(info, spans=spans)
    model_chain = chain if codec is None else _CodecHops(chain, codec, zstd=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(info.source, chain=model_chain)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.eos_token_id)
        outputs.append(out[0, ids.shape[1]:].tolist())
    if reference is None:
        return outputs, None
    identical = sum(a == b for a, b in zip(outputs, reference, strict=True))
    positions = sum(min(len(a), len(b)) for a, b in zip(outputs, reference, strict=True))
    same_positions = 0
    for a, b in zip(outputs, reference, strict=True):
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same_positions += 1
    return outputs, {
        "sequences_identical": identical,
        "sequences": len(prompts),
        "sequence_agreement_rate": identical / len(prompts),
        "token_agreement_before_first_divergence": same_positions / positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    info = load_model_info(None)
    tokenizer = AutoTokenizer.from_pretrained(info.source.path)
    # Real activations: the input of block 15 (output of blocks 0-14) for a 128-token prompt.
    text = " ".join(PROMPTS) * 4
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    head = load_client_head(info)
    span = load_block_span(info, 0, 15)
    with torch.inference_mode():
        hidden = span.forward_span(head.embed(ids), None, torch.arange(ids.shape[1])[None]).contiguous()
    started = time.perf_counter()
    codecs = measure_codecs(hidden.clone())
    prompts = PROMPTS[: args.prompts]
    reference, _ = greedy_agreement(info, tokenizer, None, prompts, args.tokens, None)
    agreement = {}
    for codec in (TensorCodec.FP16, TensorCodec.BF16, TensorCodec.INT8):
        _, agreement[codec.value] = greedy_agreement(info, tokenizer, codec, prompts, args.tokens, reference)
    print(json.dumps({
        "benchmark": "codecs",
        "model": info.source.name,
        "hidden_states": {"shape": list(hidden.shape), "source": "output of blocks 0-14, 128-token prompt",
                          "absmax": hidden.abs().max().item(), "std": hidden.std().item()},
        "codecs": codecs,
        "greedy_agreement_vs_fp32_hops": {"prompts": len(prompts), "new_tokens": args.tokens, "hops": 4,
                                          **agreement},
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

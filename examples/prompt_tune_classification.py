"""Prompt-tune the default model through a local swarm to classify the sentiment of short reviews.

    .venv/bin/python examples/prompt_tune_classification.py            # a 3-server local swarm (processes)
    .venv/bin/python examples/prompt_tune_classification.py --in-process  # all blocks in this process

The client trains only a prompt of `--pre-seq-len` embeddings and a linear head; the frozen transformer blocks run
on the servers, which compute the backward pass too. The task ships with the project: reviews generated from
templates, with held-out sentiment words that never appear in training, so held-out accuracy measures what the
tuned prompt and head learned, not memorised words. Prints the loss as it trains and accuracy before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Iterator

import torch
from transformers import AutoTokenizer

from petalnode.client import DistributedModelForSequenceClassification, even_spans

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "brilliant",
            "amazing", "enjoyable", "charming", "beautiful"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "dull", "disappointing", "poor", "bad",
            "tedious", "painful", "weak"]
TEMPLATES = ["The movie was {}.", "What a {} film.", "I found the plot {}.", "The acting was {} from start to end.",
             "Honestly, a {} experience.", "Overall the show felt {}."]
HELD_OUT_WORDS = 4  # per class


def make_dataset(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) reviews; held-out ones use sentiment words never seen in training."""
    rng = random.Random(seed)
    train, test = [], []
    for label, words in ((1, POSITIVE), (0, NEGATIVE)):
        words = words[:]
        rng.shuffle(words)
        for i, word in enumerate(words):
            target = test if i < HELD_OUT_WORDS else train
            target += [(template.format(word), label) for template in TEMPLATES]
    rng.shuffle(train)
    return train, test


def batches(data: list[tuple[str, int]], size: int, rng: random.Random) -> Iterator[list[tuple[str, int]]]:
    while True:
        order = data[:]
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield order[i : i + size]


def encode(tokenizer, batch: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    enc = tokenizer([text for text, _ in batch], return_tensors="pt", padding=True)  # right padding
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "labels": torch.tensor([label for _, label in batch])}


def accuracy(model, tokenizer, data: list[tuple[str, int]], batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            inputs = encode(tokenizer, data[i : i + batch_size])
            labels = inputs.pop("labels")
            correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model directory (default: the embedded model)")
    parser.add_argument("--bootstrap", default=None, help="an existing swarm (default: start a local one)")
    parser.add_argument("--in-process", action="store_true", help="run every block in this process")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--tuning-mode", default="ptune", choices=["ptune", "deep_ptune"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    with contextlib.ExitStack() as stack:
        options: dict = {"tuning_mode": args.tuning_mode, "pre_seq_len": args.pre_seq_len, "num_labels": 2}
        if args.in_process:
            options["spans"] = even_spans(_num_blocks(args.model), 3)
        else:
            bootstrap = args.bootstrap
            if bootstrap is None:
                from petalnode.node import LocalSwarm

                blocks = _num_blocks(args.model)
                print(f"starting a local swarm: 3 servers over {blocks} blocks ...", flush=True)
                swarm = stack.enter_context(LocalSwarm(args.model, spans=even_spans(blocks, 3)))
                bootstrap = swarm.bootstrap_address
            options["bootstrap"] = [bootstrap]
        model = DistributedModelForSequenceClassification.from_pretrained(args.model, **options)
        stack.callback(model.close)
        tokenizer = AutoTokenizer.from_pretrained(model.model_info.source.path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

        train, test = make_dataset(args.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        print(f"{len(train)} training and {len(test)} held-out reviews; training "
              f"{sum(p.numel() for p in trainable)} parameters ({args.tuning_mode}, {args.pre_seq_len} prompt "
              "positions + a linear head); the blocks stay frozen", flush=True)
        before = accuracy(model, tokenizer, test, args.batch_size)
        print(f"held-out accuracy before training: {before:.1%}", flush=True)

        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
        rng = random.Random(args.seed)
        started = time.monotonic()
        model.train()
        for step, batch in zip(range(1, args.steps + 1), batches(train, args.batch_size, rng), strict=False):
            loss = model(**encode(tokenizer, batch)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {step:3d}/{args.steps}  loss {loss.item():.4f}  ({time.monotonic() - started:.0f} s)",
                  flush=True)
        model.eval()
        after = accuracy(model, tokenizer, test, args.batch_size)
        print(f"held-out accuracy after training: {after:.1%} (before: {before:.1%}, chance: 50%)", flush=True)
    return 0


def _num_blocks(model: str | None) -> int:
    from petalnode.compute import load_model_info

    return load_model_info(model).num_blocks


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning logic without sockets: deep prompts in spans and sessions, span backward, the tuned client model."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petalnode.client import (
    DistributedModelForCausalLM,
    DistributedModelForSequenceClassification,
    PromptTuning,
    even_spans,
)
from petalnode.compute import SessionManager, load_block_span, load_model_info, span_backward, span_forward
from petalnode.errors import BadRequestError, ConfigError
from petalnode.node._executor import PRIORITY_BULK, PRIORITY_INFERENCE, ComputeExecutor
from petalnode.node._remote_autograd import batch_chunks


@pytest.fixture(scope="module")
def span(tiny_model_dir: Path):
    return load_block_span(load_model_info(tiny_model_dir), 1, 4)


def _inputs(batch: int = 2, length: int = 6, prefix: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, length, 64, generator=g), torch.randn(3, 1, prefix, 64, generator=g)


def test_deep_prompts_are_added_to_each_blocks_input_at_the_first_positions(span) -> None:
    hidden, prompts = _inputs()
    positions = torch.arange(hidden.shape[1])[None]
    expected = hidden
    with torch.no_grad():
        for index in range(len(span.layers)):
            single = span.subspan(span.start + index, span.start + index + 1)
            expected = expected.clone()
            expected[:, :3] += prompts[index]
            expected = single.forward_span(expected, None, positions)
        torch.testing.assert_close(span_forward(span, hidden, prompts), expected, rtol=0, atol=0)
        # Zero prompts are exactly no prompts.
        assert torch.equal(span_forward(span, hidden, torch.zeros_like(prompts)), span_forward(span, hidden))


def test_a_session_applies_deep_prompts_at_absolute_positions_across_chunks(span, tiny_model_dir) -> None:
    hidden, prompts = _inputs(batch=1, length=7, prefix=4)
    info = load_model_info(tiny_model_dir)
    manager = SessionManager(span, cache_budget_bytes=1 << 24, kv_bytes_per_token_per_block=
                             info.kv_bytes_per_token_per_block(torch.float32), hidden_size=64, dtype=torch.float32)
    session = manager.open(16, prompts=prompts)
    # Chunks of 2, 3 and 2 tokens: the prompt boundary (4) falls inside the second chunk.
    outputs = [session.step(hidden[:, a:b]) for a, b in ((0, 2), (2, 5), (5, 7))]
    torch.testing.assert_close(torch.cat(outputs, 1), span_forward(span, hidden, prompts), rtol=1e-5, atol=1e-5)


def test_span_backward_equals_autograd_of_the_forward(span) -> None:
    hidden, prompts = _inputs()
    grad_output = torch.randn_like(hidden)
    h, p = hidden.clone().requires_grad_(), prompts.clone().requires_grad_()
    out = span.forward_span(h, None, torch.arange(hidden.shape[1])[None], p)
    (out * grad_output).sum().backward()
    grad_hidden, grad_prompts = span_backward(span, hidden, grad_output, prompts)
    torch.testing.assert_close(grad_hidden, h.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_prompts, p.grad, rtol=0, atol=0)
    assert grad_prompts.abs().sum() > 0
    assert span_backward(span, hidden, grad_output)[1] is None
    assert all(param.grad is None for param in span.parameters())  # frozen weights, no gradient kept


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def test_shallow_prompt_tuning_equals_transformers_with_the_prompt_prepended(tiny_model_dir, reference) -> None:
    torch.manual_seed(0)
    ours = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, spans=even_spans(6, 2), tuning_mode="ptune",
                                                       pre_seq_len=4)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    prompt = ours.prompt_tuning.prompt_embeddings.detach()[None]
    embeds = torch.cat([prompt, reference.get_input_embeddings()(ids)], 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(inputs_embeds=embeds).logits[:, 4:], rtol=1e-5,
                                   atol=1e-5)
    # Generation with the tuned prompt: the session prepends it once, and tokens match transformers'.
    new = ours.generate(ids, max_new_tokens=8, do_sample=False)
    expected = reference.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
    assert torch.equal(new[:, ids.shape[1]:], expected)


def test_deep_prompt_generation_equals_full_recomputation(tiny_model_dir) -> None:
    torch.manual_seed(0)
    ours = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, spans=even_spans(6, 3),
                                                       tuning_mode="deep_ptune", pre_seq_len=3)
    with torch.no_grad():
        ours.prompt_tuning.deep_prompts.normal_(0, 1.0)
    ids = torch.tensor([[5, 17, 42]])
    generated = ours.generate(ids, max_new_tokens=6, do_sample=False)
    # Greedy by hand, recomputing the whole sequence (no cache) at every step.
    sequence = ids
    with torch.no_grad():
        for _ in range(6):
            next_token = ours(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], 1)
    assert torch.equal(generated, sequence)


def test_prompt_tuning_options_and_padding_are_checked(tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match="tuning_mode"):
        PromptTuning("lora", 4, 64, 6)
    with pytest.raises(ConfigError, match="pre_seq_len"):
        PromptTuning("ptune", 0, 64, 6)
    model = DistributedModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(BadRequestError, match="right-padded"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ConfigError, match="adapters are served by swarm servers"):
        model.chain.forward(torch.zeros(1, 2, 64), adapter="x")


def test_batch_chunks_cover_the_batch_within_the_limit() -> None:
    assert batch_chunks(5, 3, 7) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert batch_chunks(2, 100, 8192) == [slice(0, 2)]
    with pytest.raises(BadRequestError, match="exceeds"):
        batch_chunks(1, 9, 8)


async def test_inference_steps_overtake_queued_bulk_work() -> None:
    executor = ComputeExecutor()
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = asyncio.ensure_future(executor.run(gate.wait, priority=PRIORITY_BULK))
        await asyncio.sleep(0.05)  # the worker is now busy with the blocker
        bulk = [asyncio.ensure_future(executor.run(lambda i=i: order.append(f"bulk{i}"), priority=PRIORITY_BULK))
                for i in range(3)]
        await asyncio.sleep(0.01)
        step = asyncio.ensure_future(executor.run(lambda: order.append("step"), priority=PRIORITY_INFERENCE))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, step, *bulk), 10)
        assert order == ["step", "bulk0", "bulk1", "bulk2"]
    finally:
        executor.close()

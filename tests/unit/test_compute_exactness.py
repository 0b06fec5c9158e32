"""Span-by-span execution through sessions must reproduce plain transformers exactly (fp32)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from petalnode.compute import SessionManager, load_block_span, load_client_head, load_model_info


def _split(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _open_chain(model_dir: Path, parts: int, max_length: int = 128):
    info = load_model_info(model_dir)
    head = load_client_head(info)
    sessions = []
    for start, end in _split(info.num_blocks, parts):
        span = load_block_span(info, start, end)
        manager = SessionManager(
            span, cache_budget_bytes=1 << 30, hidden_size=info.hidden_size, dtype=torch.float32,
            kv_bytes_per_token_per_block=info.kv_bytes_per_token_per_block(torch.float32),
        )
        sessions.append(manager.open(max_length))
    return head, sessions


def _chain_step(head, sessions, input_ids: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
    hidden = head.embed(input_ids)
    for session in sessions:
        hidden = session.step(hidden, start_position=start_position)
    return head.logits(hidden)


def _greedy_chain(head, sessions, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = [_chain_step(head, sessions, prompt)]
    tokens = prompt
    for _ in range(steps):
        next_token = logits[-1][:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], 1)
        logits.append(_chain_step(head, sessions, next_token))
    return tokens, torch.cat(logits, 1)


def _reference(model_dir: Path, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Plain transformers: prefill the prompt, then one cached step per generated token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = [model(tokens[:, :prompt_len], past_key_values=cache, use_cache=True).logits]
        for i in range(prompt_len, tokens.shape[1]):
            out.append(model(tokens[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_spans_match_transformers(tiny_model_factory, family: str, tied: bool) -> None:
    model_dir = tiny_model_factory(family, tie_word_embeddings=tied)
    head, sessions = _open_chain(model_dir, parts=3)
    prompt = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.inference_mode():
        tokens, logits = _greedy_chain(head, sessions, prompt, steps=20)
    reference = _reference(model_dir, tokens, prompt.shape[1])
    # Same operations in the same order: bit-identical.
    assert torch.equal(logits, reference[:, : logits.shape[1]])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=2)
    assert torch.equal(tokens, expected)


def test_prefill_matches_full_forward(tiny_model_dir: Path) -> None:
    head, sessions = _open_chain(tiny_model_dir, parts=2)
    ids = torch.randint(3, 380, (2, 33), generator=torch.Generator().manual_seed(1))
    head2, sessions2 = head, [s for s in sessions]
    for session in sessions2:
        session.batch_size = 2
    with torch.inference_mode():
        ours = _chain_step(head2, sessions2, ids)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        theirs = model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_rollback_regenerates_same_tokens(tiny_model_dir: Path) -> None:
    head, sessions = _open_chain(tiny_model_dir, parts=3)
    prompt = torch.tensor([[11, 12, 13, 14]])
    with torch.inference_mode():
        tokens, _logits = _greedy_chain(head, sessions, prompt, steps=12)
        # Roll back 5 steps: the cache forgets them and regeneration retraces the same path.
        rollback_to = tokens.shape[1] - 1 - 5
        for session in sessions:
            session.rollback(rollback_to)
            assert session.position == rollback_to
        regenerated = tokens[:, : rollback_to + 1]
        step_logits = _chain_step(head, sessions, regenerated[:, -1:])
        for _ in range(5):
            next_token = step_logits[:, -1].argmax(-1, keepdim=True)
            regenerated = torch.cat([regenerated, next_token], 1)
            step_logits = _chain_step(head, sessions, next_token)
    assert torch.equal(regenerated, tokens)


def test_start_position_rolls_back_implicitly(tiny_model_dir: Path) -> None:
    """A step naming an earlier start position (a client replaying after a hiccup) overwrites the tail."""
    head, sessions = _open_chain(tiny_model_dir, parts=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        first = _chain_step(head, sessions, ids)
        _chain_step(head, sessions, torch.tensor([[100]]))
        again = _chain_step(head, sessions, ids[:, 2:], start_position=2)
    # Same positions, different chunking (3 new tokens over 2 cached vs 5 at once): equal up to op order.
    assert (again - first[:, 2:]).abs().max().item() <= 1e-5
    assert sessions[0].position == 5


@pytest.mark.slow
def test_default_model_three_spans_match_transformers(default_model_dir: Path) -> None:
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    head, sessions = _open_chain(default_model_dir, parts=3)
    assert [(s.span.start, s.span.end) for s in sessions] == [(0, 10), (10, 20), (20, 30)]
    with torch.inference_mode():
        tokens, logits = _greedy_chain(head, sessions, prompt, steps=20)
        # Rollback 5 steps on the real model, regenerate, same tokens.
        cut = tokens.shape[1] - 6
        for session in sessions:
            session.rollback(cut)
        redo = tokens[:, : cut + 1]
        step = _chain_step(head, sessions, redo[:, -1:])
        for _ in range(5):
            next_token = step[:, -1].argmax(-1, keepdim=True)
            redo = torch.cat([redo, next_token], 1)
            step = _chain_step(head, sessions, next_token)
    reference = _reference(default_model_dir, tokens, prompt.shape[1])
    assert torch.equal(logits, reference[:, : logits.shape[1]])
    assert torch.equal(redo, tokens)
    assert tokenizer.decode(tokens[0, prompt.shape[1] :]).startswith(" Paris")

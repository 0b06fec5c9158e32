"""The stand-in compute: exact, chunking-independent, and sensitive to every block, position and past token."""

from __future__ import annotations

import torch

from petalnode.compute import SessionManager
from simulations._standin import StandInSpan, next_token, prompt_hidden, reference_generation


def run_steps(span: StandInSpan, chunks: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    cache = span.new_cache()
    outs = []
    for chunk, start in zip(chunks, positions, strict=True):
        outs.append(span.forward_span(chunk, cache, torch.arange(start, start + chunk.shape[1])[None]))
    return torch.cat(outs, dim=1)


def test_chunking_and_split_spans_do_not_change_the_output() -> None:
    hidden = prompt_hidden(list(range(10)), 8)
    whole = run_steps(StandInSpan(0, 6), [hidden], [0])
    stepwise = run_steps(StandInSpan(0, 6), [hidden[:, i : i + 1] for i in range(10)], list(range(10)))
    assert torch.equal(whole, stepwise)
    first = run_steps(StandInSpan(0, 2), [hidden], [0])
    assert torch.equal(run_steps(StandInSpan(2, 6), [first], [0]), whole)
    assert whole.dtype == torch.float32 and float(whole.max()) < 2**24


def test_a_skipped_block_a_wrong_position_or_a_lost_token_changes_the_output() -> None:
    hidden = prompt_hidden([5, 6, 7, 8], 8)
    good = run_steps(StandInSpan(0, 4), [hidden[:, :3], hidden[:, 3:]], [0, 3])
    skipped = run_steps(StandInSpan(1, 4), [hidden[:, :3], hidden[:, 3:]], [0, 3])
    shifted = run_steps(StandInSpan(0, 4), [hidden[:, :3], hidden[:, 3:]], [0, 4])
    lost = run_steps(StandInSpan(0, 4), [hidden[:, 1:3], hidden[:, 3:]], [1, 3])
    for bad in (skipped, shifted):
        assert not torch.equal(bad[:, -1], good[:, -1])
    assert not torch.equal(lost[:, -1], good[:, -1])


def test_session_rollback_crops_the_stand_in_cache() -> None:
    span = StandInSpan(0, 3)
    sessions = SessionManager(span, cache_budget_bytes=10**9, kv_bytes_per_token_per_block=1, hidden_size=8,
                              dtype=torch.float32)
    session = sessions.open(32)
    hidden = prompt_hidden([1, 2, 3, 4], 8)
    first = session.step(hidden)
    session.step(prompt_hidden([9], 8), start_position=2)  # roll back two positions and diverge
    again = session.step(hidden[:, 2:], start_position=2)  # roll back again and redo the original
    assert torch.equal(again, first[:, 2:])


def test_reference_generation_is_deterministic_and_prompt_dependent() -> None:
    a = reference_generation(6, 8, [1, 2, 3], 10)
    assert a == reference_generation(6, 8, [1, 2, 3], 10)
    assert a != reference_generation(6, 8, [1, 2, 4], 10)
    assert len(a) == 10 and len(set(a)) > 1
    assert next_token(torch.zeros(1, 8)) == 0


def test_reference_tokens_are_pinned() -> None:
    # Golden values: the stand-in's arithmetic is a contract (runs and reports are comparable across versions).
    assert reference_generation(8, 8, [1, 2, 3], 12) == [2433, 1453, 2138, 2278, 3074, 3749, 3037, 1430, 3639, 487,
                                                         1443, 3072]

"""The client model drives transformers' own generate() and must match a plain local model token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from petalnode.client import AutoDistributedModelForCausalLM, even_spans
from petalnode.errors import BadRequestError, InvalidStateError


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path):
    ours = AutoDistributedModelForCausalLM.from_pretrained(tiny_model_dir, spans=even_spans(6, 3))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return ours, reference


PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


def test_greedy_tokens_match(models) -> None:
    ours, reference = models
    a = ours.generate(PROMPT, max_new_tokens=24, do_sample=False)
    b = reference.generate(PROMPT, max_new_tokens=24, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0.9, top_k=20), dict(temperature=1.3, top_p=0.8), dict(repetition_penalty=1.3, top_k=50)],
)
def test_seeded_sampling_matches(models, options) -> None:
    ours, reference = models
    torch.manual_seed(123)
    a = ours.generate(PROMPT, max_new_tokens=16, do_sample=True, **options)
    torch.manual_seed(123)
    b = reference.generate(PROMPT, max_new_tokens=16, do_sample=True, **options)
    assert torch.equal(a, b)


def test_forward_logits_match(models) -> None:
    ours, reference = models
    ids = torch.randint(3, 380, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5


def test_multi_turn_session_continues_the_cache(models) -> None:
    ours, reference = models
    second = torch.tensor([[11, 12, 13]])
    with ours.inference_session(max_length=64):
        first_out = ours.generate(PROMPT, max_new_tokens=5, do_sample=False)
        second_out = ours.generate(second, max_new_tokens=5, do_sample=False)
    history = torch.cat([first_out, second], 1)
    expected = reference.generate(history, max_new_tokens=5, do_sample=False)
    assert torch.equal(second_out[:, second.shape[1]:], expected[:, history.shape[1]:])


@pytest.mark.parametrize("whole_history", [False, True])
def test_multi_turn_sessions_equal_transformers_on_the_concatenated_history(models, whole_history: bool) -> None:
    # transformers' generate never feeds the token it sampled last: the session must feed it before the next turn
    # (Petals' last_token_id). Scores (every step's logits) are compared, not only tokens: a missing token does not
    # always change a tiny model's greedy choice, but it always changes the logits.
    ours, reference = models
    turns = [PROMPT, torch.tensor([[11, 12, 13]]), torch.tensor([[200, 31]]), torch.tensor([[7]])]
    history = torch.zeros(1, 0, dtype=torch.long)
    options = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with ours.inference_session(max_length=64):
        for turn in turns:
            context = torch.cat([history, turn], 1)
            got = ours.generate(context if whole_history else turn, **options)
            want = reference.generate(context, **options)
            assert torch.equal(got.sequences[:, -4:], want.sequences[:, -4:])
            for a, b in zip(got.scores, want.scores, strict=True):
                assert (a - b).abs().max().item() <= 1e-4
            history = want.sequences


@pytest.mark.parametrize("in_session", [False, True])
def test_prompt_lookup_drafts_give_the_same_greedy_tokens(models, in_session: bool) -> None:
    # transformers' own assisted generation: drafted tokens are verified in one multi-token step, the rejected ones
    # cropped from "the cache", which must roll the chain's sessions back (and the session needs room for drafts).
    ours, reference = models
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 5, 17, 42, 99, 3]])
    want = reference.generate(ids, max_new_tokens=24, do_sample=False)
    if in_session:
        with ours.inference_session(max_length=64):
            got = ours.generate(ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
    else:
        got = ours.generate(ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(got, want)


def test_stopping_criteria_and_streamer_are_honoured(models) -> None:
    ours, _ = models

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT.shape[1] + 3, dtype=torch.bool)

    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            seen.append(None)

    out = ours.generate(PROMPT, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([StopAfter()]),
                        streamer=Streamer())
    assert out.shape[1] == PROMPT.shape[1] + 3
    assert seen[-1] is None and len(seen) == 1 + 3 + 1  # prompt, 3 tokens, end


def test_padded_batches_are_refused_clearly(models) -> None:
    ours, _ = models
    with pytest.raises(BadRequestError, match="padded"):
        ours(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_nested_sessions_are_refused(models) -> None:
    ours, _ = models
    with ours.inference_session(max_length=8), pytest.raises(InvalidStateError):
        with ours.inference_session(max_length=8):
            pass

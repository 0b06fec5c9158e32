"""A real swarm: a bootstrap and servers as separate `petalnode` processes on loopback, clients in this process."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.node import LocalSwarm

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


@pytest.fixture(scope="module")
def tiny_swarm(tiny_model_dir: Path):
    """Three servers joining one by one, each choosing its 2 of 6 blocks automatically."""
    swarm = LocalSwarm(str(tiny_model_dir), threads=1)
    swarm.start()
    try:
        for _ in range(3):
            swarm.add_server(["--num-blocks", "2"])
        yield swarm
    finally:
        swarm.stop()


def test_automatic_placement_tiles_the_model(tiny_swarm: LocalSwarm) -> None:
    ranges = sorted((s.info["start"], s.info["end"]) for s in tiny_swarm.servers)
    assert ranges == [(0, 2), (2, 4), (4, 6)]


def test_greedy_and_seeded_sampling_match_local_transformers(tiny_swarm: LocalSwarm, tiny_model_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model_dir, bootstrap=[tiny_swarm.bootstrap_address])
    try:
        ours = model.generate(PROMPT, max_new_tokens=16, do_sample=False)
        assert torch.equal(ours, reference.generate(PROMPT, max_new_tokens=16, do_sample=False))
        torch.manual_seed(5)
        sampled = model.generate(PROMPT, max_new_tokens=16, do_sample=True, temperature=1.2, top_k=40, top_p=0.95)
        torch.manual_seed(5)
        expected = reference.generate(PROMPT, max_new_tokens=16, do_sample=True, temperature=1.2, top_k=40,
                                      top_p=0.95)
        assert torch.equal(sampled, expected)
    finally:
        model.close()


def test_two_clients_at_once_both_get_correct_output(tiny_swarm: LocalSwarm, tiny_model_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[200, 100, 50, 25, 12, 6]])]
    expected = [reference.generate(p, max_new_tokens=20, do_sample=False) for p in prompts]
    results: list[torch.Tensor | BaseException | None] = [None, None]

    def run(i: int) -> None:
        try:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                tiny_model_dir, bootstrap=[tiny_swarm.bootstrap_address]
            )
            try:
                results[i] = model.generate(prompts[i], max_new_tokens=20, do_sample=False)
            finally:
                model.close()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got, want in zip(results, expected, strict=True):
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(got, want)


@pytest.mark.slow
def test_default_model_through_three_servers_matches_transformers(default_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with LocalSwarm(None, spans=[(0, 10), (10, 20), (20, 30)], threads=1) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(None, bootstrap=[swarm.bootstrap_address])
        try:
            ours = model.generate(ids, max_new_tokens=20, do_sample=False)
        finally:
            model.close()
    reference = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours, expected)
    assert tokenizer.decode(ours[0, ids.shape[1]:]).startswith(" Paris")


def test_prompt_lookup_through_the_swarm_equals_plain_greedy_and_bans_nobody(tiny_swarm: LocalSwarm,
                                                                           tiny_model_dir: Path) -> None:
    # transformers' own assisted generation through the library model: drafts are verified in multi-token steps
    # and the rejected ones rolled back on the servers; no server is blamed for the client's drafts.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 5, 17, 42, 99, 3]])
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model_dir, bootstrap=[tiny_swarm.bootstrap_address])
    try:
        got = model.generate(ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
        assert torch.equal(got, reference.generate(ids, max_new_tokens=24, do_sample=False))
        assert model.chain.client.bans.banned() == set()
    finally:
        model.close()

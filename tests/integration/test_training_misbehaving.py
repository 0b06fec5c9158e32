"""Training passes treat a server that answers garbage as failed: banned, routed around, gradients still exact.

In-process nodes on loopback (a bootstrap and two servers of a tiny llama, all blocks each). The "evil" server is
the only one the client knows when the pass starts; it replies with NaNs in the forward or in the backward pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from petalnode.client import DistributedModelForCausalLM
from petalnode.node import Node, ServeOptions, _swarm_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.parametrize("phase", ["forward", "backward"])
async def test_a_server_replying_nans_in_training_is_routed_around(tiny_model_dir: Path, phase: str,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(_swarm_client, "SWARM_VIEW_MAX_AGE_S", 600.0)  # the client keeps its first view
    bootstrap = Node()
    await bootstrap.start()
    evil = Node(bootstrap=[bootstrap.address], serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 6)))
    await evil.start()
    honest = None
    span = evil.hosted.span
    honest_forward = span.forward_span
    misbehave = asyncio.Event()

    def corrupt(hidden, cache, positions, prompts=None):
        out = honest_forward(hidden, cache, positions, prompts)
        wrong_phase = torch.is_grad_enabled() if phase == "backward" else not torch.is_grad_enabled()
        return out * float("nan") if misbehave.is_set() and wrong_phase else out

    span.forward_span = corrupt
    torch.manual_seed(0)
    remote = await asyncio.to_thread(DistributedModelForCausalLM.from_pretrained, tiny_model_dir,
                                     bootstrap=[str(bootstrap.address)], tuning_mode="deep_ptune", pre_seq_len=2)
    local = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        with torch.no_grad():
            remote.prompt_tuning.deep_prompts.normal_()
        local.load_state_dict(remote.state_dict())
        ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7], [8, 9, 10, 11, 12, 13, 14]])
        await asyncio.to_thread(lambda: remote(input_ids=ids).logits)  # the client now knows only the evil server
        honest = Node(bootstrap=[bootstrap.address], serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 6)))
        await honest.start()
        misbehave.set()

        def step() -> None:
            remote(input_ids=ids, labels=ids).loss.backward()

        await asyncio.to_thread(step)
        local(input_ids=ids, labels=ids).loss.backward()
        for name, param in local.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(dict(remote.named_parameters())[name].grad, param.grad, rtol=1e-5,
                                           atol=1e-6, msg=name)
        assert evil.identity.peer_id in remote.chain.client.bans.banned()
    finally:
        await asyncio.to_thread(remote.close)
        for node in (honest, evil, bootstrap):
            if node is not None:
                await node.aclose()

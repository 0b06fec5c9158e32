"""Training passes are spot-checked too: a server whose forward or backward replies are plausible but wrong (scaled
by 1.5, no NaN to give it away) is caught by a second server, the client's own copy of the blocks decides, the
liar is banned and the gradients equal local ones. In-process nodes on loopback (a bootstrap and two servers of a
tiny llama, all blocks each)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from petalnode.client import DistributedModelForCausalLM
from petalnode.node import Node, ServeOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.mark.parametrize("phase", ["forward", "backward"])
async def test_a_server_lying_in_training_is_caught_and_the_gradients_are_exact(tiny_model_dir: Path,
                                                                                phase: str) -> None:
    bootstrap = Node()
    await bootstrap.start()
    servers = {}
    for name in ("liar", "honest"):
        options = ServeOptions(model=str(tiny_model_dir), blocks=(0, 6))
        servers[name] = Node(bootstrap=[bootstrap.address], serve=options)
        await servers[name].start()
    span = servers["liar"].hosted.span
    honest_forward = span.forward_span

    def lie(hidden, cache, positions, prompts=None):  # type: ignore[no-untyped-def]
        out = honest_forward(hidden, cache, positions, prompts)
        in_phase = torch.is_grad_enabled() if phase == "backward" else not torch.is_grad_enabled()
        return out * 1.5 if in_phase else out

    span.forward_span = lie
    torch.manual_seed(0)
    remote = await asyncio.to_thread(DistributedModelForCausalLM.from_pretrained, tiny_model_dir,
                                     bootstrap=[str(bootstrap.address)], tuning_mode="deep_ptune", pre_seq_len=2,
                                     verify="full")
    local = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        with torch.no_grad():
            remote.prompt_tuning.deep_prompts.normal_()
        local.load_state_dict(remote.state_dict())
        ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7], [8, 9, 10, 11, 12, 13, 14]])

        def step() -> None:
            for _ in range(2):  # a second pass runs with the liar banned
                remote.zero_grad()
                remote(input_ids=ids, labels=ids).loss.backward()

        await asyncio.to_thread(step)
        local(input_ids=ids, labels=ids).loss.backward()
        grads = {name: p.grad for name, p in remote.named_parameters() if p.requires_grad}
        client = remote.chain.client
        for name, param in local.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert client.bans.banned() == {servers["liar"].identity.peer_id}
        assert client.pass_verifier.stats.liars_banned == 1
    finally:
        await asyncio.to_thread(remote.close)
        for node in (*servers.values(), bootstrap):
            await node.aclose()

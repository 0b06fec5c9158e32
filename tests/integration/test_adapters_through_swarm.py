"""A client asking for a LoRA adapter is routed only through servers that have it and gets the adapted model.

In-process nodes on loopback: blocks 0-2 and 3-5 on two servers with the adapter, and one fast server with all
blocks but no adapter. The reference is PEFT on plain transformers, with the same adapter files.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from petalnode.client import DistributedModelForCausalLM
from petalnode.node import Node, ServeOptions
from tests.tiny_models import build_lora_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


async def test_outputs_generation_and_gradients_with_an_adapter_equal_peft(tiny_model_dir: Path, tmp_path) -> None:
    adapter_dir = build_lora_adapter(tmp_path / "chat", tiny_model_dir, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"),
        adapter_dir)
    reference.eval()

    bootstrap = Node()
    await bootstrap.start()
    servers = []
    for blocks, adapters in (((0, 3), (str(adapter_dir),)), ((3, 6), (str(adapter_dir),)), ((0, 6), ())):
        server = Node(bootstrap=[bootstrap.address],
                      serve=ServeOptions(model=str(tiny_model_dir), blocks=blocks, adapters=adapters))
        await server.start()
        servers.append(server)
    with_adapter = {servers[0].identity.peer_id, servers[1].identity.peer_id}
    models = []
    try:
        def connect(**options) -> DistributedModelForCausalLM:
            model = DistributedModelForCausalLM.from_pretrained(tiny_model_dir, bootstrap=[str(bootstrap.address)],
                                                                **options)
            models.append(model)
            return model

        adapted = await asyncio.to_thread(connect, adapter="chat")
        plain = await asyncio.to_thread(connect)
        with torch.no_grad():
            expected = reference(PROMPT).logits
            assert (expected - base(PROMPT).logits).abs().max() > 1e-2  # the adapter really changes the model
            logits = await asyncio.to_thread(lambda: adapted(PROMPT).logits)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            plain_logits = await asyncio.to_thread(lambda: plain(PROMPT).logits)
            torch.testing.assert_close(plain_logits, base(PROMPT).logits, rtol=1e-5, atol=1e-5)

        # Generation: sessions are opened with the adapter, and only on servers that have it.
        generated = await asyncio.to_thread(adapted.generate, PROMPT, max_new_tokens=12, do_sample=False)
        assert torch.equal(generated, reference.generate(input_ids=PROMPT, max_new_tokens=12, do_sample=False))

        def route_of_a_session() -> set:
            with adapted.inference_session(max_length=32) as session:
                adapted.generate(PROMPT, max_new_tokens=2, do_sample=False)
                return {hop.peer_id for hop in session.session.hops}

        assert await asyncio.to_thread(route_of_a_session) <= with_adapter

        # Fine-tuning a prompt on top of the adapted model: gradients equal PEFT + autograd.
        tuned = await asyncio.to_thread(connect, adapter="chat", tuning_mode="ptune", pre_seq_len=2)
        prompt = torch.nn.Parameter(tuned.prompt_tuning.prompt_embeddings.detach().clone())
        await asyncio.to_thread(lambda: tuned(input_ids=PROMPT, labels=PROMPT).loss.backward())
        embeds = torch.cat([prompt[None], reference.get_input_embeddings()(PROMPT)], 1)
        ref_logits = reference(inputs_embeds=embeds).logits[:, 2:]
        torch.nn.functional.cross_entropy(ref_logits[0, :-1], PROMPT[0, 1:]).backward()
        torch.testing.assert_close(tuned.prompt_tuning.prompt_embeddings.grad, prompt.grad, rtol=1e-5, atol=1e-6)
    finally:
        for model in models:
            await asyncio.to_thread(model.close)
        for node in (*servers, bootstrap):
            await node.aclose()

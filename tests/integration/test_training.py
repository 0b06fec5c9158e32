"""Fine-tuning through a real swarm: server processes on loopback, gradients checked against local autograd.

A tiny llama runs as three server processes (blocks 0-1, 2-3, 4-5). The same model with the same trainable
parameters also runs in-process (`LocalBlockChain` with the same spans), where plain torch autograd computes the
reference gradients. Distributed forward/backward must give the same loss and gradients (fp32, tight tolerance).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from petalnode.client import DistributedModelForCausalLM, DistributedModelForSequenceClassification
from petalnode.errors import BadRequestError
from petalnode.identity import PeerAddress
from petalnode.node import LocalSwarm, RemoteBlockChain, _remote_autograd
from petalnode.node._protocol import BackwardRequest, ForwardRequest, ForwardResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SPANS = [(0, 2), (2, 4), (4, 6)]
PRE_SEQ_LEN = 3
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path):
    with LocalSwarm(str(tiny_model_dir), spans=SPANS, threads=1,
                    extra_args=["--rebalance-period", "0", "--dtype", "fp32"]) as swarm:
        yield swarm


def _pair(cls, tiny_model_dir: Path, swarm: LocalSwarm, **options):
    """The same trainable model twice: blocks on the swarm, and blocks in this process."""
    torch.manual_seed(0)
    remote = cls.from_pretrained(tiny_model_dir, bootstrap=[swarm.bootstrap_address], **options)
    local = cls.from_pretrained(tiny_model_dir, spans=SPANS, **options)
    with torch.no_grad():
        for param in remote.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)  # nonzero deep prompts too, so their effect on the forward is checked
        local.load_state_dict(remote.state_dict())
    return remote, local


def _trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _batch(vocab: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_through_the_swarm_equal_local_autograd(tiny_model_dir, swarm, mode) -> None:
    remote, local = _pair(DistributedModelForCausalLM, tiny_model_dir, swarm, tuning_mode=mode,
                          pre_seq_len=PRE_SEQ_LEN)
    try:
        ids = _batch(remote.config.vocab_size)
        losses = []
        for model in (remote, local):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], **TOLERANCE)
        remote_grads, local_grads = _trainable_grads(remote), _trainable_grads(local)
        assert set(remote_grads) == ({"prompt_tuning.prompt_embeddings"} | (
            {"prompt_tuning.deep_prompts"} if mode == "deep_ptune" else set()))
        for name, grad in local_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(remote_grads[name], grad, **TOLERANCE, msg=name)
        # Frozen weights never get gradients (and never left the servers).
        assert all(p.grad is None for p in remote.head.parameters())
    finally:
        remote.close()


def test_classification_head_and_prompts_train_through_the_swarm(tiny_model_dir, swarm) -> None:
    remote, local = _pair(DistributedModelForSequenceClassification, tiny_model_dir, swarm, num_labels=3,
                          tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN)
    try:
        ids = _batch(remote.config.vocab_size, batch=3)
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])  # right padding
        labels = torch.tensor([0, 2, 1])
        outputs = [model(input_ids=ids, attention_mask=mask, labels=labels) for model in (remote, local)]
        for out in outputs:
            out.loss.backward()
        torch.testing.assert_close(outputs[0].logits, outputs[1].logits, **TOLERANCE)
        remote_grads, local_grads = _trainable_grads(remote), _trainable_grads(local)
        assert set(remote_grads) == {"score.weight", "prompt_tuning.prompt_embeddings", "prompt_tuning.deep_prompts"}
        for name, grad in local_grads.items():
            torch.testing.assert_close(remote_grads[name], grad, **TOLERANCE, msg=name)
        # Padding is exact: a row's logits do not depend on what follows its last real token.
        garbage = ids.clone()
        garbage[1, 5:] = 7
        with torch.no_grad():
            again = remote(input_ids=garbage, attention_mask=mask).logits
        torch.testing.assert_close(again, outputs[0].logits.detach(), **TOLERANCE)
    finally:
        remote.close()


def test_a_large_batch_is_split_into_requests_that_pipeline(tiny_model_dir, swarm, monkeypatch) -> None:
    monkeypatch.setattr(_remote_autograd, "MAX_PASS_TOKENS", 10)  # at most one 8-position row per request
    remote, local = _pair(DistributedModelForCausalLM, tiny_model_dir, swarm, tuning_mode="ptune",
                          pre_seq_len=PRE_SEQ_LEN)
    try:
        ids = _batch(remote.config.vocab_size, batch=4, length=5)
        for model in (remote, local):
            model(input_ids=ids, labels=ids).loss.backward()
        torch.testing.assert_close(_trainable_grads(remote)["prompt_tuning.prompt_embeddings"],
                                   _trainable_grads(local)["prompt_tuning.prompt_embeddings"], **TOLERANCE)
        with pytest.raises(BadRequestError, match="exceeds the 10 a request may carry"):
            remote(input_ids=_batch(remote.config.vocab_size, batch=1, length=9))
    finally:
        remote.close()


def test_servers_reject_bad_training_requests_and_keep_serving(tiny_model_dir, swarm) -> None:
    chain = RemoteBlockChain.connect(_info(tiny_model_dir), bootstrap=[swarm.bootstrap_address])
    try:
        client = chain.client
        address = PeerAddress.parse(swarm.servers[1].info["address"])
        rpc = client._require_rpc()
        model, hidden = client.model, torch.randn(2, 5, 64)

        def call(verb: str, request) -> object:
            return chain.run(rpc.call(address, verb, request))

        bad = {
            "shaped like the hidden states": ("backward", BackwardRequest(
                model=model, start_block=2, end_block=4, hidden=hidden, grad_output=torch.randn(2, 4, 64))),
            "unknown adapter": ("forward", ForwardRequest(
                model=model, start_block=2, end_block=4, hidden=hidden, adapter="no-such-lora")),
            "at most 8192 positions": ("forward", ForwardRequest(
                model=model, start_block=2, end_block=4, hidden=torch.zeros(3, 4096, 64))),
            "deep prompts must be": ("backward", BackwardRequest(
                model=model, start_block=2, end_block=4, hidden=hidden, grad_output=hidden,
                prompts=torch.zeros(1, 1, 2, 64))),
            "not inside the hosted": ("backward", BackwardRequest(
                model=model, start_block=0, end_block=4, hidden=hidden, grad_output=hidden)),
            "non-finite": ("backward", BackwardRequest(
                model=model, start_block=2, end_block=4, hidden=hidden, grad_output=torch.full((2, 5, 64), torch.nan))),
        }
        for match, (verb, request) in bad.items():
            with pytest.raises(BadRequestError, match=match):
                call(verb, request)
        reply = call("forward", ForwardRequest(model=model, start_block=2, end_block=4, hidden=hidden))
        assert isinstance(reply, ForwardResult) and reply.hidden.shape == hidden.shape
    finally:
        chain.close()


def test_a_server_killed_between_forward_and_backward(tiny_model_dir, swarm, caplog) -> None:
    """Blocks 2-3 have one server during the forward; it is killed -9 and a new one started before backward."""
    remote, local = _pair(DistributedModelForCausalLM, tiny_model_dir, swarm, tuning_mode="deep_ptune",
                          pre_seq_len=PRE_SEQ_LEN)
    try:
        ids = _batch(remote.config.vocab_size)
        local(input_ids=ids, labels=ids).loss.backward()
        loss = remote(input_ids=ids, labels=ids).loss
        swarm.add_server(["--blocks", "2:4"])
        victim = swarm.servers[1]
        victim.kill()
        victim.process.wait(10)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="petalnode.node._swarm_client"):
            loss.backward()
        assert time.monotonic() - started < 60
        assert any("backward through" in r.getMessage() for r in caplog.records)
        remote_grads, local_grads = _trainable_grads(remote), _trainable_grads(local)
        for name, grad in local_grads.items():
            torch.testing.assert_close(remote_grads[name], grad, **TOLERANCE, msg=name)
    finally:
        remote.close()


def _info(model_dir: Path):
    from petalnode.compute import load_model_info

    return load_model_info(model_dir)

"""Spot-checked outputs with real processes: a bootstrap, two honest servers and one corrupting server (the
test-only `tests.corrupting_server`, announcing 100000 steps/s so every client routes through it) on the same
blocks of a tiny model; clients in this process. With verification on, the output equals local transformers' and
the liar ends up banned; without it (the control) the output is wrong."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.identity import PeerAddress
from petalnode.node import LocalSwarm, SwarmProcess

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
NEW_TOKENS = 20


def start_corrupting_server(swarm: LocalSwarm, model_dir: Path, corruption: list[str]) -> SwarmProcess:
    ready = swarm.workdir / "liar.ready"
    log = swarm.workdir / "liar.log"
    command = [sys.executable, "-m", "tests.corrupting_server", *corruption, "--claim-throughput", "100000", "--",
               "--bootstrap", swarm.bootstrap_address, "--listen", "127.0.0.1:0", "--blocks", "0:6",
               "--model", str(model_dir), "--threads", "1", "--ready-file", str(ready)]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=Path(__file__).resolve().parents[2])
    server = SwarmProcess("liar", process, ready, log)
    swarm.servers.append(server)  # stopped with the swarm
    server.wait_ready(time.monotonic() + 120)
    return server


@pytest.fixture(scope="module")
def swarm_with_liar(tiny_model_dir: Path):
    swarm = LocalSwarm(str(tiny_model_dir), threads=1)
    swarm.start()
    try:
        for _ in range(2):
            swarm.add_server(["--blocks", "0:6"], wait=False)
        # Honest for its first 3 steps, then noise as large as the outputs themselves.
        liar = start_corrupting_server(swarm, tiny_model_dir, ["--kind", "noise", "--noise", "1.0",
                                                               "--after-steps", "3"])
        for server in swarm.servers:
            server.wait_ready(time.monotonic() + 120)
        yield swarm, str(PeerAddress.parse(liar.info["address"]).peer_id)
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


def _generate(swarm: LocalSwarm, model_dir: Path, verify: str) -> tuple[torch.Tensor, set[str], object]:
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[swarm.bootstrap_address],
                                                            verify=verify)
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            output = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            stats = session.session.verify_stats
        banned = {str(p) for p in model.chain.client.bans.banned()}
        return output, banned, stats
    finally:
        model.close()


def test_without_verification_the_liar_corrupts_the_output(swarm_with_liar, tiny_model_dir, reference) -> None:
    swarm, _liar = swarm_with_liar
    output, banned, _ = _generate(swarm, tiny_model_dir, "off")
    assert not torch.equal(output, reference)
    assert banned == set()


@pytest.mark.parametrize("verify", ["sample", "full"])
def test_verification_bans_the_liar_and_the_output_is_exact(swarm_with_liar, tiny_model_dir, reference,
                                                            verify: str) -> None:
    swarm, liar = swarm_with_liar
    output, banned, stats = _generate(swarm, tiny_model_dir, verify)
    assert torch.equal(output, reference)
    assert liar in banned
    assert stats.liars_banned >= 1
    if verify == "full":
        assert stats.rollbacks == 0 and stats.max_unverified_steps == 0

"""Spot-checked outputs with real processes (the test version of benchmarks/integrity.py): a bootstrap, two honest
servers and one corrupting server (the test-only `tests.corrupting_server`, announcing 100000 steps/s so clients
route through it) on the same blocks of a tiny model; clients in this process. For every kind of corruption, with
verification on (sample and full) the output equals local transformers' and the liar ends up banned; without it
(the control) the output is wrong."""

from __future__ import annotations

import itertools
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

_LIARS = itertools.count()
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
NEW_TOKENS = 20


def start_corrupting_server(swarm: LocalSwarm, model_dir: Path, corruption: list[str]) -> SwarmProcess:
    index = next(_LIARS)  # a fresh ready file each time: an old one would be read at once
    ready = swarm.workdir / f"liar-{index}.ready"
    log = swarm.workdir / f"liar-{index}.log"
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


KINDS = {  # as in benchmarks/integrity.py, scaled to a 20-token generation
    "noise": ["--kind", "noise", "--noise", "0.01"],
    "zeros": ["--kind", "zeros"],
    "skip": ["--kind", "skip"],
    "late": ["--kind", "noise", "--noise", "0.01", "--after-steps", "12"],
    "long": ["--kind", "noise", "--noise", "0.01", "--from-position", "16"],
}


@pytest.fixture(scope="module")
def honest_swarm(tiny_model_dir: Path):
    swarm = LocalSwarm(str(tiny_model_dir), spans=[(0, 6), (0, 6)], threads=1)
    swarm.start()
    try:
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture
def liar(honest_swarm: LocalSwarm, tiny_model_dir: Path, request: pytest.FixtureRequest):
    server = start_corrupting_server(honest_swarm, tiny_model_dir, KINDS[request.param])
    peer_id = PeerAddress.parse(server.info["address"]).peer_id
    try:
        _wait_until_listed(honest_swarm, tiny_model_dir, peer_id)
        yield str(peer_id)
    finally:
        server.stop()
        server.process.wait(30)
        honest_swarm.servers.remove(server)


def _wait_until_listed(swarm: LocalSwarm, model_dir: Path, peer_id: object) -> None:
    """Until the DHT lists the new server (a client started before that would not know it)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[swarm.bootstrap_address],
                                                            verify="off")
    try:
        deadline = time.monotonic() + 60
        while peer_id not in model.chain.swarm().servers:
            assert time.monotonic() < deadline, "the corrupting server never showed up in the DHT"
            time.sleep(0.5)
    finally:
        model.close()


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


@pytest.mark.parametrize("liar", ["skip"], indirect=True)
def test_without_verification_the_liar_corrupts_the_output(honest_swarm, liar, tiny_model_dir, reference) -> None:
    output, banned, _ = _generate(honest_swarm, tiny_model_dir, "off")
    assert not torch.equal(output, reference)
    assert banned == set()


# The suite keeps the subtlest kinds: small noise only after 12 steps, and only at long positions (each liar is a
# process to start); benchmarks/integrity.py runs all of them, noise, zeros and skip included.
@pytest.mark.parametrize("liar", ["late", "long"], indirect=True)
def test_verification_bans_the_liar_and_the_output_is_exact(honest_swarm, liar, tiny_model_dir, reference) -> None:
    for verify in ("sample", "full"):
        output, banned, stats = _generate(honest_swarm, tiny_model_dir, verify)
        assert torch.equal(output, reference), verify
        assert liar in banned, verify
        assert stats.liars_banned >= 1
        if verify == "full":
            assert stats.rollbacks == 0 and stats.max_unverified_steps == 0

"""Fair shares with real processes: a flooding client (its own OS process and peer id) grabs sessions and steps as
fast as the server answers, while another client's generation runs through the same server over real sockets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.node import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
# The tiny model's server caches 4096 tokens; 8 sessions of 1024 would take all of it (and then some).
FLOOD_SESSIONS = 8
FLOOD_MAX_LENGTH = 1024


class Flooder:
    """The flooding client process (tests/fair_share_flooder.py); stops when its stdin closes."""

    def __init__(self, server_address: str, hidden: int, *, sessions: int = FLOOD_SESSIONS) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fair_share_flooder",
                "--server",
                server_address,
                "--hidden",
                str(hidden),
                "--sessions",
                str(sessions),
                "--max-length",
                str(FLOOD_MAX_LENGTH),
                "--duration",
                "150",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the flooder exited before it was ready (code {self.process.wait(10)})"
        self.ready = json.loads(line)["ready"]

    def stop(self) -> dict:
        out, _ = self.process.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])["done"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def swarm_with(tiny_model_dir: Path) -> Iterator:
    swarms: list[LocalSwarm] = []

    def start(*server_args: str) -> tuple[LocalSwarm, str]:
        swarm = LocalSwarm(str(tiny_model_dir), threads=1)
        swarms.append(swarm)
        swarm.start()
        server = swarm.add_server(["--blocks", "0:6", *server_args])
        return swarm, server.info["address"]

    yield start
    for swarm in swarms:
        swarm.stop()


def _generate(swarm: LocalSwarm, model_dir: Path) -> tuple[torch.Tensor, float]:
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[swarm.bootstrap_address])
    try:
        started = time.monotonic()
        out = model.generate(PROMPT, max_new_tokens=16, do_sample=False)
        return out, time.monotonic() - started
    finally:
        model.close()


def test_a_flooding_peer_gets_busy_while_another_clients_generation_completes(swarm_with, tiny_model_dir: Path) -> None:
    swarm, address = swarm_with()
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).generate(
        PROMPT, max_new_tokens=16, do_sample=False
    )
    flooder = Flooder(address, hidden=64)
    try:
        # Half of the 4096-token cache: two sessions of 1024, and every further open is "busy", naming the limit.
        assert flooder.ready["opened"] == 2, flooder.ready
        assert flooder.ready["refusals"] == {"busy": FLOOD_SESSIONS - 2}, flooder.ready
        assert "over its share of 2048 (50% of this server's 4096)" in flooder.ready["samples"]["busy"]
        out, took_s = _generate(swarm, tiny_model_dir)
        assert torch.equal(out, expected)
        done = flooder.stop()
    finally:
        flooder.kill()
    # The flood ran all along: its sessions stepped flat out and its extra opens kept being refused.
    assert done["steps"] > 10, done
    assert done["refusals"].get("busy", 0) > FLOOD_SESSIONS - 2, done
    print(f"honest generation of 16 tokens under the flood: {took_s:.2f} s; flooder: {done}")


def test_without_fair_shares_the_same_flood_starves_the_other_client(swarm_with) -> None:
    """The control: the flooder takes the whole cache, and another peer cannot even open a session. (A whole
    generation against this server fails too, but only after the client's retries, about 70 s here.)"""
    _, address = swarm_with("--no-fair-share")
    flooder = Flooder(address, hidden=64)
    try:
        assert flooder.ready["opened"] == 4, flooder.ready
        assert flooder.ready["refusals"] == {"out_of_cache_memory": FLOOD_SESSIONS - 4}, flooder.ready
        other = Flooder(address, hidden=64, sessions=1)
        try:
            assert other.ready["opened"] == 0 and other.ready["refusals"] == {"out_of_cache_memory": 1}, other.ready
        finally:
            other.kill()
    finally:
        flooder.kill()

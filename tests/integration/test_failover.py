"""Failover with real processes: kill -9 or stall a server mid-generation; start with blocks missing.

The default model runs through three spans of ten blocks, each span with a spare server. Greedy output must equal
the fault-free output every time, whichever position of the chain fails.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.node import LocalSwarm, SwarmProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPANS = [(0, 10), (10, 20), (20, 30)]
NEW_TOKENS = 64
FAIL_AT_TOKEN = 16


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer("Once upon a time, in a small village,", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    return ids, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def swarm(default_model_dir: Path):
    # Each span twice, and the middle one a third time: the kill tests each take one server of a different span,
    # and the stall test then still finds a spare for the middle (cheaper than restarting servers between tests).
    with LocalSwarm(None, spans=SPANS + SPANS + [SPANS[1]], threads=1,
                    extra_args=["--rebalance-period", "0"]) as swarm:
        yield swarm


def _process_of(swarm: LocalSwarm, peer_id) -> SwarmProcess:
    return next(s for s in swarm.servers if s.info["address"].endswith(str(peer_id)) and s.process.poll() is None)


class _FailAt:
    """A generate() streamer that runs `action(session)` once, after the given number of new tokens."""

    def __init__(self, model, at_token: int, action) -> None:
        self.model, self.at_token, self.action = model, at_token, action
        self.seen = -1  # the first put() is the prompt
        self.step_times: list[float] = []
        self._last = time.monotonic()

    def put(self, value) -> None:
        now = time.monotonic()
        self.step_times.append(now - self._last)
        self._last = now
        self.seen += 1
        if self.seen == self.at_token:
            self.action(self.model._active.session)

    def end(self) -> None:
        pass


def _generate_with_failure(swarm: LocalSwarm, ids: torch.Tensor, action) -> tuple[torch.Tensor, _FailAt, int]:
    model = AutoDistributedModelForCausalLM.from_pretrained(None, bootstrap=[swarm.bootstrap_address])
    try:
        streamer = _FailAt(model, FAIL_AT_TOKEN, action)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
            reroutes = session.reroutes
        return out, streamer, reroutes
    finally:
        model.close()


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
def test_kill_9_mid_generation_gives_identical_output(swarm: LocalSwarm, reference, position: int) -> None:
    ids, expected = reference
    killed: list[SwarmProcess] = []

    def kill(session) -> None:
        victim = _process_of(swarm, session.session.hops[position].peer_id)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        killed.append(victim)

    out, _, reroutes = _generate_with_failure(swarm, ids, kill)
    assert killed and killed[0].process.returncode == -signal.SIGKILL
    assert reroutes >= 1
    assert torch.equal(out, expected)


def test_stalled_server_is_bypassed_within_the_heartbeat_bound(swarm: LocalSwarm, reference) -> None:
    ids, expected = reference
    stopped: list[SwarmProcess] = []

    def stall(session) -> None:
        victim = _process_of(swarm, session.session.hops[1].peer_id)
        os.kill(victim.process.pid, signal.SIGSTOP)  # alive, socket open, silent
        stopped.append(victim)

    try:
        out, streamer, reroutes = _generate_with_failure(swarm, ids, stall)
    finally:
        for victim in stopped:
            os.kill(victim.process.pid, signal.SIGCONT)
            victim.kill()
    assert stopped and reroutes >= 1
    assert torch.equal(out, expected)
    # Heartbeat timeout is 5 s; detection, rerouting and replaying 23 positions fit in 12 s on this machine.
    assert max(streamer.step_times) < 12.0, streamer.step_times


def test_generation_waits_for_missing_blocks_then_proceeds(default_model_dir: Path, reference) -> None:
    ids, expected = reference
    with LocalSwarm(None, spans=SPANS[:2], threads=1) as swarm:
        result: dict[str, object] = {}

        def run() -> None:
            try:
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    None, bootstrap=[swarm.bootstrap_address], wait_for_blocks_s=120
                )
                try:
                    result["out"] = model.generate(ids, max_new_tokens=8, do_sample=False)
                finally:
                    model.close()
            except BaseException as e:
                result["error"] = e

        client = threading.Thread(target=run)
        client.start()
        time.sleep(3)
        assert client.is_alive(), result  # waiting, not failed
        swarm.add_server(["--blocks", "20:30"])
        client.join(120)
        assert not client.is_alive()
        assert "error" not in result, result
        assert torch.equal(result["out"], expected[:, : ids.shape[1] + 8])

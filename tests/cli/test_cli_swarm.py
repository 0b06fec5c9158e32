"""`petalnode status`, `join`, `bootstrap` and swarm `generate` as a user runs them, including every error."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from petalnode.compute import load_model_info
from petalnode.identity import Identity
from petalnode.node import LocalSwarm

pytestmark = pytest.mark.integration


def _petalnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PETALNODE_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "petalnode.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def half_swarm(tiny_model_dir: Path):
    """A swarm serving only blocks 0-2 of the 6-block tiny model."""
    with LocalSwarm(str(tiny_model_dir), spans=[(0, 3)], threads=1, extra_args=["--public-name", "alice"]) as swarm:
        yield swarm


def test_status_shows_servers_and_the_missing_blocks(half_swarm: LocalSwarm, tiny_model_dir: Path) -> None:
    result = _petalnode("status", "--bootstrap", half_swarm.bootstrap_address, "--model", str(tiny_model_dir))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    digest = load_model_info(tiny_model_dir).span_digest(0, 6).hex()[:12]  # the model's identity, short form
    assert lines[0] == f"model {tiny_model_dir.name} (digest {digest}): 6 blocks, 1 servers"
    assert lines[1].split()[:7] == ["blocks", "peer", "state", "digest", "steps/s/block", "cache", "tokens"]
    row = lines[2].split()
    assert row[0] == "0-2" and row[2] == "online" and "alice" in row
    assert row[3] == load_model_info(tiny_model_dir).span_digest(0, 3).hex()[:12]  # the server's span, same weights
    assert f"NOT SERVABLE: blocks 3-5 of {tiny_model_dir.name} have no online server" in result.stdout
    assert "--blocks 3:6" in result.stdout


def test_generate_waits_then_says_which_blocks_are_missing(half_swarm: LocalSwarm, tiny_model_dir: Path) -> None:
    result = _petalnode("generate", "hello", "--bootstrap", half_swarm.bootstrap_address, "--model",
                        str(tiny_model_dir), "--wait-for-blocks", "2")
    assert result.returncode == 2
    assert "waiting for servers: blocks 3-5" in result.stderr
    assert "blocks 3-5 of" in result.stderr and "petalnode join" in result.stderr and "--blocks 3:6" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_of_a_complete_swarm_says_servable(half_swarm: LocalSwarm, tiny_model_dir: Path) -> None:
    server = half_swarm.add_server(["--blocks", "3:6"])
    try:
        result = _petalnode("status", "--bootstrap", half_swarm.bootstrap_address, "--model", str(tiny_model_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "servable: every block has at least one online server" in result.stdout
        gen = _petalnode("generate", "The capital of France is", "--bootstrap", half_swarm.bootstrap_address,
                         "--model", str(tiny_model_dir), "--max-new-tokens", "5")
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.startswith("The capital of France is") and "5 tokens" in gen.stderr
    finally:
        server.stop()
        server.process.wait(20)
    assert server.process.returncode == 0  # SIGTERM: announced offline and exited cleanly


def _dead_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}/{Identity.generate().peer_id}"


ERROR_CASES = [
    (("status", "--bootstrap", "DEAD"), "no peers reachable at the bootstrap address"),
    (("join", "--bootstrap", "DEAD", "--model", "TINY"), "no peers reachable at the bootstrap address"),
    (("join", "--bootstrap", "BOOT", "--model", "no-such-model"), "not available on this machine"),
    (("join", "--bootstrap", "BOOT", "--model", "TINY", "--vram", "lots"), "not a memory size"),
    (("join", "--bootstrap", "BOOT", "--model", "TINY", "--vram", "64K"), "cannot hold even one block"),
    (("join", "--bootstrap", "BOOT", "--model", "TINY", "--vram", "72M", "--num-blocks", "6"),
     "raise --vram or host fewer blocks"),
    (("join", "--bootstrap", "BOOT", "--model", "TINY", "--blocks", "4:9"), "outside the model"),
    (("join", "--bootstrap", "BOOT", "--model", "TINY", "--blocks", "x"), "not a block range"),
    (("join", "--bootstrap", "not-an-address", "--model", "TINY"), "not a peer address"),
    (("bootstrap", "--listen", "nowhere"), "--listen must be HOST:PORT"),
]


@pytest.fixture(scope="module")
def error_results(half_swarm: LocalSwarm, tiny_model_dir: Path) -> list[subprocess.CompletedProcess[str]]:
    """Every error case as a real process, several at once (each spends most of its time importing torch)."""
    table = {"DEAD": _dead_address(), "BOOT": half_swarm.bootstrap_address, "TINY": str(tiny_model_dir)}
    commands = []
    for args, _ in ERROR_CASES:
        command = [table.get(a, a) for a in args]
        if command[0] == "join":
            command += ["--listen", "127.0.0.1:0"]
        commands.append(command)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda command: _petalnode(*command), commands))


@pytest.mark.parametrize("case", range(len(ERROR_CASES)), ids=[m for _, m in ERROR_CASES])
def test_user_errors_say_what_to_do(case: int, error_results) -> None:
    result = error_results[case]
    assert result.returncode == 2, result.stdout + result.stderr
    assert ERROR_CASES[case][1] in result.stderr
    assert "Traceback" not in result.stderr

"""NAT traversal on a real NAT bed (network namespaces, nftables masquerade, WAN input drop; see _bed.py).

One bed per module: a public peer (`petalnode bootstrap`: STUN, signaling, relay with a bandwidth cap) on the fake
Internet, a server behind NAT A (`petalnode join` with no NAT flags), and a client run per case behind NAT B:
  (1) both NATs ordinary: a direct data channel via server-reflexive candidates;
  (2) NAT B symmetric (`masquerade fully-random`): direct fails, the public peer's relay carries the generation;
  (3) a lossy, rate-limited uplink at A (nftables random UDP drops + tc tbf): generation still completes.
Each case checks that the swarm's greedy tokens equal local transformers'. Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.natbed._bed import PUBLIC_IP, BedUnavailable, NatBed, check_available

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
PROMPT = [5, 6, 7, 8, 9]
NEW_TOKENS = 8
# The public peer's relay cap: ample for a tiny model's hidden states.
RELAY_BYTES_PER_S = 1_000_000
START_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 90.0


def _read_json_line(process: subprocess.Popen, timeout_s: float, what: str) -> dict:
    """The first JSON line `process` prints, within `timeout_s` (its stderr is kept for the failure message)."""
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if line.startswith("{"):
                return json.loads(line)
            if not line and process.poll() is not None:
                break
    raise AssertionError(f"{what} gave no result within {timeout_s} s (exit code {process.poll()})")


def _wait_ready(path: Path, what: str) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{what} was not ready within {START_TIMEOUT_S} s (see {path.parent})")


def _python(role: str, **options: object) -> list[str]:
    return [sys.executable, "-m", "tests.natbed._peer", role, json.dumps(options)]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory):
    try:
        check_available()
    except BedUnavailable as e:
        pytest.skip(str(e))
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("natbed-model"), num_layers=4)
    logs = tmp_path_factory.mktemp("natbed-logs")
    with NatBed.create() as bed:
        cli = [sys.executable, "-m", "petalnode.cli"]
        bed.spawn("wan", [*cli, "bootstrap", "--listen", f"{PUBLIC_IP}:0", "--relay-bandwidth",
                          str(RELAY_BYTES_PER_S), "--ready-file", str(logs / "public.json")],
                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(logs / "public.log", "w"))
        bootstrap = _wait_ready(logs / "public.json", "petalnode bootstrap")["address"]
        bed.spawn("ha", [*cli, "join", "--bootstrap", bootstrap, "--model", str(model), "--blocks", "0:4",
                         "--threads", "1", "--rebalance-period", "0", "--ready-file", str(logs / "server.json")],
                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(logs / "server.log", "w"))
        server_address = _wait_ready(logs / "server.json", "petalnode join behind NAT A")["address"]
        yield {"bed": bed, "model": model, "bootstrap": bootstrap, "server": server_address, "logs": logs}


def _generate(bed: dict) -> dict:
    process = bed["bed"].spawn("hb", _python("client", bootstrap=bed["bootstrap"], model=str(bed["model"]),
                                             prompt=PROMPT, new_tokens=NEW_TOKENS),
                               cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=open(bed["logs"] / f"client-{time.monotonic_ns()}.log", "w"))
    try:
        return _read_json_line(process, CLIENT_TIMEOUT_S, "the client behind NAT B")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _reference(model_dir: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def test_server_behind_nat_announces_webrtc_via_the_public_peer(bed: dict) -> None:
    address = bed["server"]
    assert address.startswith(f"webrtc://{PUBLIC_IP}:"), address
    assert address.split("/")[2] == bed["bootstrap"].split("/")[2]  # the relay's host:port


def test_case1_ordinary_nats_connect_directly_via_srflx(bed: dict) -> None:
    result = _generate(bed)
    assert result["tokens"] == _reference(bed["model"])
    [path] = result["paths"].values()
    assert "relay" not in path and ("srflx" in path or "prflx" in path), path
    print("case 1 path:", path, "seconds:", result["seconds"])


def test_case2_symmetric_nat_falls_back_to_the_relay(bed: dict) -> None:
    bed["bed"].set_nat("b", symmetric=True)
    try:
        result = _generate(bed)
    finally:
        bed["bed"].set_nat("b")
    assert result["tokens"] == _reference(bed["model"])
    [path] = result["paths"].values()
    assert path == f"relayed via {bed['bootstrap'].split('/')[2]}", path
    print("case 2 path:", path, "seconds:", result["seconds"])


def test_case3_lossy_slow_link_still_generates_correctly(bed: dict) -> None:
    bed["bed"].set_nat("a", loss_percent=5)
    bed["bed"].set_rate("a", "2mbit")
    try:
        result = _generate(bed)
    finally:
        bed["bed"].set_rate("a", None)
        bed["bed"].set_nat("a")
    assert result["tokens"] == _reference(bed["model"])
    print("case 3 path:", next(iter(result["paths"].values())), "seconds:", result["seconds"])

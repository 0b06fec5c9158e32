"""Which model is this? A server serving a same-named directory with other weights is never used (issue 13).

Real processes on loopback: honest servers on blocks 0-2 and 3-5 of a tiny model, and a server on all of 0-5
loaded from a directory of the same name whose block 2 differs. A route through the one whole-model server is
cheaper (one hop instead of two), so a client that does not check identity uses it and gets other tokens; the
client that checks (the default) never does, and its greedy tokens equal local transformers'.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.compute._digest_cache import CACHE_FILE_NAME
from petalnode.errors import ConfigError, NoRouteError
from petalnode.identity import PeerAddress
from petalnode.node import LocalSwarm
from petalnode.node._local_swarm import STARTUP_TIMEOUT_S

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
NEW_TOKENS = 12
CHANGED_BLOCK = "model.layers.2."


def _same_named_copy(source: Path, parent: Path, *, change: bool) -> Path:
    """`parent/<source's name>`: a copy of the model, with block 2's projections replaced when `change`."""
    target = parent / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(CACHE_FILE_NAME))
    if change:
        path = target / "model.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
        generator = torch.Generator().manual_seed(13)
        for name in [n for n in tensors if n.startswith(CHANGED_BLOCK) and n.endswith("proj.weight")]:
            t = tensors[name]  # retrained, in effect: same shapes, other values (strong enough to change tokens)
            tensors[name] = torch.randn(t.shape, generator=generator) * float(t.std()) * 4
        save_file(tensors, str(path), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def mixed_swarm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    ours = _same_named_copy(tiny_model_dir, tmp_path_factory.mktemp("ours"), change=False)
    theirs = _same_named_copy(tiny_model_dir, tmp_path_factory.mktemp("theirs"), change=True)
    swarm = LocalSwarm(None, threads=1)  # each server names its own --model directory
    swarm.start()
    try:
        honest = [swarm.add_server(["--model", str(ours), "--blocks", span], wait=False) for span in ("0:3", "3:6")]
        other = swarm.add_server(["--model", str(theirs), "--blocks", "0:6"], wait=False)
        for server in (*honest, other):
            server.wait_ready(time.monotonic() + STARTUP_TIMEOUT_S)
        yield swarm, ours, honest, other
    finally:
        swarm.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "petalnode.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PETALNODE_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)


def _peer(server) -> object:
    return PeerAddress.parse(server.info["address"]).peer_id


def _generate(model_dir: Path, bootstrap: str, **options: object) -> tuple[torch.Tensor, set]:
    """Greedy tokens through the swarm and the peers of the route that produced them."""
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[bootstrap], **options)
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            used = {hop.peer_id for hop in session.session.hops}
        return tokens, used
    finally:
        model.close()


def test_a_server_with_other_weights_under_the_same_name_is_never_used(mixed_swarm, tiny_model_dir: Path) -> None:
    swarm, ours, honest, other = mixed_swarm
    assert ours.name == tiny_model_dir.name  # the same name: only the weights tell them apart
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).generate(
        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    # The control: without the identity check (and without output verification, which would catch it later) the
    # one-hop route through the other weights wins, and the output is not the model's (this is what happened
    # before, and shows the check below can fail).
    unchecked, used = _generate(ours, swarm.bootstrap_address, span_digest=None, verify="off")
    assert used == {_peer(other)}
    assert not torch.equal(unchecked, expected)
    for attempt in range(2):  # new sessions, new route choices (the client's routes are jittered)
        tokens, used = _generate(ours, swarm.bootstrap_address, seed=attempt, verify="off")
        assert used == {_peer(s) for s in honest}, attempt
        assert torch.equal(tokens, expected), attempt
    # With the library's defaults (identity check and sampled verification) as well.
    tokens, used = _generate(ours, swarm.bootstrap_address, seed=7)
    assert used == {_peer(s) for s in honest} and torch.equal(tokens, expected)


def test_a_client_without_block_weights_checks_servers_against_pinned_digests(
        mixed_swarm, tiny_model_dir: Path, tmp_path: Path) -> None:
    swarm, ours, honest, _ = mixed_swarm
    head_only = tmp_path / ours.name  # the same name; config, tokenizer and the client's own tensors only
    shutil.copytree(ours, head_only, ignore=shutil.ignore_patterns(CACHE_FILE_NAME, "*.safetensors"))
    with safe_open(str(ours / "model.safetensors"), framework="pt") as handle:
        save_file({n: handle.get_tensor(n) for n in handle.keys() if not n.startswith("model.layers.")},
                  str(head_only / "model.safetensors"), metadata=handle.metadata())
    with pytest.raises(ConfigError, match=r"has no tensors for block 0.*petalnode digest"):
        _generate(head_only, swarm.bootstrap_address)
    pins = _cli("digest", "--model", str(ours)).stdout  # on a machine with the full copy
    (tmp_path / "pins.json").write_text(pins)
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).generate(
        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens, used = _generate(head_only, swarm.bootstrap_address, pinned_digests=tmp_path / "pins.json")
    assert used == {_peer(s) for s in honest}
    assert torch.equal(tokens, expected)
    # `status` from the same copy: the other weights are marked with the pins, and unchecked without them.
    status = _cli("status", "--bootstrap", swarm.bootstrap_address, "--model", str(head_only),
                  "--pinned-digests", str(tmp_path / "pins.json"))
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split()[3] for line in status.stdout.splitlines()[2:5]}
    assert rows["0-5"].startswith("OTHER:") and not rows["0-2"].startswith("OTHER")
    assert "online server with these weights" in status.stdout
    unchecked = _cli("status", "--bootstrap", swarm.bootstrap_address, "--model", str(head_only))
    assert "weights not checked" in unchecked.stderr and "OTHER" not in unchecked.stdout


def test_no_route_says_the_only_server_left_has_other_weights(mixed_swarm) -> None:
    swarm, ours, honest, _ = mixed_swarm
    first = honest[0]
    first.stop()  # SIGTERM: announces OFFLINE, so blocks 0-2 are left to the server with other weights
    first.process.wait(20)
    with pytest.raises(NoRouteError, match=r"blocks 0-2 of .* have no server \(servers there: .*1 server with "
                                           r"other weights"):
        _generate(ours, swarm.bootstrap_address, wait_for_blocks_s=1)

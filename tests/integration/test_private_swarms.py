"""Private swarms (`--swarm-key`) as real `petalnode` processes on loopback: outsiders get nothing, and two swarms
of the same model on one machine never mix, even when their nodes are handed each other's bootstrap address."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.dht import DHTNode
from petalnode.errors import DHTError, SwarmKeyMismatchError
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.node import LocalSwarm, SwarmClient
from petalnode.swarm_key import SwarmKey
from petalnode.transport import TcpTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])


def _petalnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PETALNODE_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "petalnode.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _peer(process) -> PeerId:
    peer_id = PeerAddress.parse(process.info["address"]).peer_id
    assert peer_id is not None
    return peer_id


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    made = _petalnode("swarm-key", str(folder / "a.key"))  # the way a user creates one
    assert made.returncode == 0 and "fingerprint" in made.stderr, made.stderr
    assert _petalnode("swarm-key", str(folder / "a.key")).returncode == 2  # never overwritten
    SwarmKey.generate().save(folder / "b.key")
    return folder / "a.key", folder / "b.key"


@pytest.fixture(scope="module")
def two_swarms(tiny_model_dir: Path, keys: tuple[Path, Path]):
    """Swarms A and B of the same tiny model (6 blocks), one full server each; B's server is also handed A's
    bootstrap address (as a misconfigured or curious node would be)."""
    with (
        LocalSwarm(str(tiny_model_dir), spans=[(0, 6)], threads=1, swarm_key=keys[0]) as a,
        LocalSwarm(
            str(tiny_model_dir),
            spans=[(0, 6)],
            threads=1,
            swarm_key=keys[1],
            extra_args=["--bootstrap", a.bootstrap_address],
        ) as b,
    ):
        yield a, b


def test_each_client_routes_only_through_its_own_swarm(two_swarms, tiny_model_dir: Path, keys) -> None:
    a, b = two_swarms
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).generate(
        PROMPT, max_new_tokens=8, do_sample=False
    )
    both = [a.bootstrap_address, b.bootstrap_address]
    for swarm, key, other in ((a, keys[0], b), (b, keys[1], a)):
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model_dir, bootstrap=both, swarm_key=key)
        try:
            assert torch.equal(model.generate(PROMPT, max_new_tokens=8, do_sample=False), expected)
            seen = set(model.chain.swarm().servers)
            used = set(model.chain.client.rtt)  # every server the client probed for routing
        finally:
            model.close()
        own = {_peer(s) for s in swarm.servers}
        assert seen == own and used and used <= own
        assert not seen & {_peer(s) for s in other.servers}


def test_status_with_each_key_lists_only_that_swarms_servers(two_swarms, tiny_model_dir: Path, keys) -> None:
    a, b = two_swarms
    result = _petalnode(
        "status",
        "--bootstrap",
        a.bootstrap_address,
        "--bootstrap",
        b.bootstrap_address,
        "--model",
        str(tiny_model_dir),
        "--swarm-key",
        str(keys[1]),
    )
    assert result.returncode == 0, result.stderr
    assert "6 blocks, 1 servers" in result.stdout
    assert str(_peer(b.servers[0]))[:12] in result.stdout and str(_peer(a.servers[0]))[:12] not in result.stdout


def test_an_outsider_cannot_join_read_announce_or_open_sessions(two_swarms, tiny_model_dir: Path) -> None:
    a, _ = two_swarms
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Read: the CLI status gets no answer from any member. Join and announce: a server cannot even bootstrap.
        status = pool.submit(_petalnode, "status", "--bootstrap", a.bootstrap_address, "--model", str(tiny_model_dir))
        join = pool.submit(
            _petalnode,
            "join",
            "--bootstrap",
            a.bootstrap_address,
            "--model",
            str(tiny_model_dir),
            "--blocks",
            "0:6",
            "--listen",
            "127.0.0.1:0",
            "--no-nat-traversal",
        )
        asyncio.run(_outsider_checks(a, tiny_model_dir))
        status_result, join_result = status.result(), join.result()
    assert status_result.returncode == 2 and "no peers reachable" in status_result.stderr
    assert "--swarm-key" in status_result.stderr
    assert join_result.returncode == 2 and "no peers reachable" in join_result.stderr


async def _outsider_checks(a: LocalSwarm, tiny_model_dir: Path) -> None:
    boot = PeerAddress.parse(a.bootstrap_address)
    async with DHTNode(Identity.generate()) as dht:
        with pytest.raises(DHTError):
            await dht.bootstrap([(boot.host, boot.port)])
        # Write: a record stored "at" the bootstrap's port never lands (the datagram is dropped unread).
        dht.protocol.router.add_contact(_kademlia_node(boot))
        assert await dht.store(f"{tiny_model_dir.name}.0", b"forged") <= 1  # only ourselves
    with pytest.raises(DHTError):
        async with SwarmClient(tiny_model_dir.name, 6, [a.bootstrap_address]):
            pass
    # Sessions: a direct TCP dial to a member server fails its handshake, so no RPC (and no session) is possible.
    server = PeerAddress.parse(a.servers[0].info["address"])
    async with TcpTransport(Identity.generate()) as transport:
        with pytest.raises(SwarmKeyMismatchError):
            await transport.dial(server, connect_timeout_s=5)


def _kademlia_node(address: PeerAddress):
    from kademlia.node import Node

    assert address.peer_id is not None
    return Node(address.peer_id.raw, address.host, address.port)


def test_a_bad_key_file_is_a_clear_error(tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    SwarmKey.generate().save(loose)
    loose.chmod(0o644)
    result = _petalnode("bootstrap", "--listen", "127.0.0.1:0", "--swarm-key", str(loose))
    assert result.returncode == 2 and "chmod 600" in result.stderr and "Traceback" not in result.stderr
    result = _petalnode("status", "--bootstrap", "tcp://127.0.0.1:9", "--swarm-key", str(tmp_path / "none.key"))
    assert result.returncode == 2 and "petalnode swarm-key" in result.stderr and "Traceback" not in result.stderr

"""Private-swarm DHT: every datagram sealed under the swarm key; outsiders cannot read, answer or inject."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from petalnode.dht import DHTNode, Record, dht_key
from petalnode.dht._sealing import DatagramSealer
from petalnode.dht._wire import KIND_REQUEST, MAX_DATAGRAM_BYTES, pack_body, parse_datagram
from petalnode.errors import CodecError, DHTError
from petalnode.identity import Identity
from petalnode.swarm_key import SwarmKey
from petalnode.transport import MemoryNetwork

pytestmark = pytest.mark.timeout(30)
RPC_TIMEOUT_S = 0.2
KEY = SwarmKey(bytes(range(32)))


def node(network: MemoryNetwork, name: str, **kwargs: object) -> DHTNode:
    return DHTNode(
        Identity.from_seed(name.encode()),
        endpoint_factory=network.create_datagram_endpoint,
        rpc_timeout_s=RPC_TIMEOUT_S,
        **kwargs,
    )


def tap(dht: DHTNode) -> list[bytes]:
    """Record every datagram `dht` puts on the wire."""
    sent: list[bytes] = []
    transport = dht.protocol.transport
    original = transport.sendto

    def sendto(data: bytes, addr: object = None) -> None:
        sent.append(bytes(data))
        original(data, addr)

    transport.sendto = sendto
    return sent


def test_sealer_round_trips_and_refuses_other_keys_and_bad_sizes() -> None:
    sealer = DatagramSealer(KEY)
    datagram = b"\x00" + os.urandom(20) + pack_body(["ping", [None]])
    sealed = sealer.seal(datagram)
    assert sealed != sealer.seal(datagram)  # fresh nonce each time
    assert sealer.open(sealed, MAX_DATAGRAM_BYTES) == datagram
    with pytest.raises(CodecError, match="not sealed under our swarm key"):
        DatagramSealer(SwarmKey(bytes(32))).open(sealed, MAX_DATAGRAM_BYTES)
    with pytest.raises(CodecError, match="not sealed under our swarm key"):
        sealer.open(datagram, MAX_DATAGRAM_BYTES)  # a public node's plain datagram
    with pytest.raises(CodecError):
        sealer.open(b"x" * 20, MAX_DATAGRAM_BYTES)
    with pytest.raises(CodecError):
        sealer.open(b"x" * (MAX_DATAGRAM_BYTES + 29), MAX_DATAGRAM_BYTES)


async def test_keyed_nodes_work_together_and_their_datagrams_are_unreadable() -> None:
    network = MemoryNetwork()
    a, b = node(network, "a", swarm_key=KEY), node(network, "b", swarm_key=KEY)
    await a.start(listen=("a", 1))
    await b.start(listen=("b", 1), bootstrap=[("a", 1)])
    try:
        sent = tap(b)
        assert await b.store("model.0", b"secret-announcement") == 2
        assert (await a.get("model.0"))[b.peer_id].value == b"secret-announcement"
        assert sent and all(b"secret-announcement" not in d for d in sent)
        for datagram in sent:
            with pytest.raises(CodecError):
                parse_datagram(datagram)  # not rpcudp framing: an onlooker learns nothing
        assert a.protocol.outsider_dropped == 0 and b.protocol.outsider_dropped == 0
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("outsider_key", [None, SwarmKey(bytes(32))], ids=["no key", "other key"])
async def test_an_outsider_cannot_join_read_or_store_and_is_counted(outsider_key: SwarmKey | None) -> None:
    network = MemoryNetwork()
    member = node(network, "member", swarm_key=KEY)
    await member.start(listen=("member", 1))
    outsider = node(network, "outsider", swarm_key=outsider_key)
    await outsider.start(listen=("outsider", 1))
    try:
        await member.store("model.0", b"v")
        with pytest.raises(DHTError, match="no DHT bootstrap node answered"):
            await outsider.bootstrap([("member", 1)])
        assert member.protocol.outsider_dropped >= 1
        # A hand-made STORE of a validly signed record, as a public node would send it: dropped unread.
        record = Record.create(
            outsider.identity, key=dht_key("model.0"), value=b"forged", expires_at=time.time() + 60, seq=1
        )
        datagram = (
            bytes([KIND_REQUEST])
            + os.urandom(20)
            + pack_body(["store", [outsider.peer_id.raw, record.key, [record.to_wire()]]])
        )
        before = member.protocol.outsider_dropped
        outsider.protocol.transport.sendto(datagram, ("member", 1))
        await network_settle()
        assert member.protocol.outsider_dropped == before + 1
        assert outsider.peer_id not in await member.get("model.0")
        assert outsider.peer_id.raw not in {c.id for c in member.protocol.router.contacts()}
        # Control: the very same datagram sealed under the swarm key is stored, so the key is the only barrier.
        outsider.protocol.transport.sendto(DatagramSealer(KEY).seal(datagram), ("member", 1))
        await network_settle()
        assert (await member.get("model.0"))[outsider.peer_id].value == b"forged"
    finally:
        await member.aclose()
        await outsider.aclose()


async def network_settle() -> None:
    await asyncio.sleep(0.05)  # the memory network delivers after its (tiny) link latency


async def test_public_nodes_send_plain_rpcudp_datagrams() -> None:
    # The public swarm's wire is unchanged: what a keyless node sends still parses as rpcudp framing.
    network = MemoryNetwork()
    a, b = node(network, "a"), node(network, "b")
    await a.start(listen=("a", 1))
    await b.start(listen=("b", 1), bootstrap=[("a", 1)])
    try:
        sent = tap(b)
        await b.store("k", b"v")
        assert sent and all(parse_datagram(d).kind in (0, 1) for d in sent)
    finally:
        await a.aclose()
        await b.aclose()

"""Hypothesis fuzzing of DHT datagrams and replies: the node survives every input and keeps answering."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petalnode.dht import DHTNode, Record, dht_key
from petalnode.dht._wire import KIND_REQUEST, KIND_RESPONSE
from petalnode.errors import DHTError, RemoteProtocolError
from petalnode.identity import Identity
from petalnode.transport import MemoryNetwork

pytestmark = pytest.mark.timeout(120)
SETTINGS = settings(max_examples=1000, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

WRITER = Identity.from_seed(b"fuzz-writer")
KEY = dht_key("fuzz.0")
VALID_RECORD = Record.create(WRITER, key=KEY, value=b"ok", expires_at=4_000_000_000.0, seq=1).to_wire()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.binary(max_size=40),
    st.text(max_size=20), st.sampled_from([KEY, bytes(20), WRITER.public_key]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=30)
names = st.sampled_from(["ping", "store", "find_node", "find_value", "stun", "__init__", "rpc_ping", ""])


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, byte in flips:
        if out:
            out[position % len(out)] = byte
    return bytes(out)


valid_bodies = st.sampled_from([
    ["ping", [bytes(20)]],
    ["find_node", [bytes(20), KEY]],
    ["find_value", [None, KEY, None, None]],
    ["find_value", [None, KEY, None, [bytes(8), bytes(64)]]],
    ["store", [bytes(20), KEY, [VALID_RECORD]]],
    ["find_node", [bytes(20), KEY, b"extra"]],
    ["store", [None, KEY, [VALID_RECORD] * 70]],
])

datagrams = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda kind, body: bytes([kind]) + os.urandom(20) + msgpack.packb(body),
              st.sampled_from([KIND_REQUEST, KIND_RESPONSE, 2]), st.one_of(valid_bodies, values)),
    st.builds(lambda name, args: bytes([KIND_REQUEST]) + os.urandom(20) + msgpack.packb([name, args]),
              names, st.lists(values, max_size=5)),
    st.builds(lambda body, flips: mutate(bytes([KIND_REQUEST]) + bytes(20) + msgpack.packb(body), flips),
              valid_bodies, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)),
)


async def test_fuzzed_datagrams_never_hurt_the_node() -> None:
    network = MemoryNetwork()
    victim = DHTNode(Identity.from_seed(b"victim"), endpoint_factory=network.create_datagram_endpoint,
                     rpc_timeout_s=0.3)
    friend = DHTNode(Identity.from_seed(b"friend"), endpoint_factory=network.create_datagram_endpoint,
                     rpc_timeout_s=0.3)
    await victim.start(listen=("victim", 1))
    await friend.start(listen=("friend", 1), bootstrap=[("victim", 1)])
    try:
        protocol = victim.protocol
        dropped_before = protocol.dropped
        seen = [0]

        @SETTINGS
        @given(data=datagrams, port=st.integers(1, 65535))
        def feed(data: bytes, port: int) -> None:
            seen[0] += 1
            protocol.datagram_received(data, ("attacker", port))  # must never raise

        feed()
        assert seen[0] >= 1000
        assert protocol.dropped > dropped_before  # the hostile inputs were counted, not silently served
        assert protocol.internal_errors == 0  # and every one was refused on purpose, not by a crash in our code
        assert not protocol.transport.is_closing()
        await asyncio.sleep(0.05)  # let any queued replies to "attacker" drain
        # Still serving: a friend's store and lookup succeed, and the victim does lookups itself.
        assert await friend.store("after-fuzz", b"alive") == 2
        assert set(await victim.get("after-fuzz")) == {friend.peer_id}
        assert victim.storage.records(KEY) in ([], [Record.from_wire(VALID_RECORD)])
    finally:
        await victim.aclose()
        await friend.aclose()


async def test_fuzzed_replies_are_refused_with_protocol_errors_only() -> None:
    network = MemoryNetwork()
    node = DHTNode(Identity.from_seed(b"reader"), endpoint_factory=network.create_datagram_endpoint)
    await node.start(listen=("reader", 1))
    try:
        protocol = node.protocol
        replies = st.one_of(values, st.lists(st.tuples(st.binary(min_size=20, max_size=20), scalars, scalars)),
                            st.fixed_dictionaries({"records": st.lists(values, max_size=3), "next": values,
                                                   "nodes": st.lists(values, max_size=3)}))

        @SETTINGS
        @given(body=replies)
        def parse(body: object) -> None:
            for parser in (protocol._parse_contacts, lambda b: protocol._parse_value_page(b, KEY)):
                try:
                    parsed = parser(body)
                except (RemoteProtocolError, DHTError):
                    continue
                # Whatever gets through is safe to hand to kademlia and to a socket.
                contacts = parsed if isinstance(parsed, list) else parsed[1]
                for node_id, host, port in contacts:
                    assert len(node_id) == 20 and isinstance(host, str) and host and 0 < port < 65536

        parse()
        # The reply that used to close kademlia's socket for good is refused.
        with pytest.raises(RemoteProtocolError):
            protocol._parse_contacts([[bytes(20), None, None]])
    finally:
        await node.aclose()

"""Hypothesis fuzzing of every wire message of the transport and RPC layers, offline and against a live node."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petalnode.codecs import Message, register_message
from petalnode.errors import CodecError, HandshakeError, PetalnodeError, RemoteProtocolError
from petalnode.identity import Identity
from petalnode.rpc import RPC, CallContext
from petalnode.rpc import _rpc_wire as wire
from petalnode.transport import ConnectionConfig, MemoryNetwork
from petalnode.transport import _handshake as hs


@register_message
class Ping(Message):
    KIND: ClassVar[str] = "test.fuzz.ping"
    n: int = 0


VALID_ENVELOPES = [
    wire.encode_call("echo", b"\x80"),
    wire.encode_open("chat"),
    wire.encode_result(b"body"),
    wire.encode_error("busy", "try later"),
    wire.encode_msg(b""),
    wire.PING,
]


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for position, value in flips:
        if buf:
            buf[position % len(buf)] = value
    return bytes(buf[: max(0, len(buf) - cut)])


mutations = st.tuples(
    st.sampled_from(VALID_ENVELOPES),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
    st.integers(0, 3),
)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.binary(max_size=80), mutations.map(lambda m: mutate(*m))))
def test_envelope_parser_survives(data: bytes) -> None:
    try:
        envelope = wire.parse_envelope(data)
    except RemoteProtocolError:
        return
    assert isinstance(envelope.kind, wire.EnvelopeKind)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_handshake_messages_survive(data: bytes) -> None:
    try:
        hs.parse_hello(data)
    except HandshakeError:
        pass
    with pytest.raises(HandshakeError):  # random bytes never prove an identity
        hs.verify_proof(data, hs.Role.INITIATOR, bytes(32))
    opener = hs.RecordOpener(bytes(32), max_plaintext_bytes=64)
    try:
        length = opener.record_length(data[:4].ljust(4, b"\x00"))
        opener.open(data[:4], data[4 : 4 + length])
    except RemoteProtocolError:
        pass


class LiveNode:
    """One RPC server on a memory network, driven from a synchronous Hypothesis test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self.net = MemoryNetwork()
        config = ConnectionConfig(keepalive_interval_s=None, chunk_bytes=4096, window_bytes=65536)
        self.server = RPC(self.net.transport(Identity.from_seed(b"s"), host="s", config=config), call_timeout_s=2)
        self.client = RPC(self.net.transport(Identity.from_seed(b"c"), host="c", config=config), call_timeout_s=2)

        async def ping(request: Message, context: CallContext) -> Message:
            assert isinstance(request, Ping)
            return Ping(n=request.n + 1)

        self.server.add_unary_handler("ping", ping, request_type=Ping)
        self.address = (await self.server.listen()).address
        self.connection = await self.client.connect(self.address)

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(asyncio.wait_for(coro, 5))

    def close(self) -> None:
        async def stop() -> None:
            await self.client.aclose()
            await self.server.aclose()

        self.loop.run_until_complete(stop())
        self.loop.close()


@pytest.fixture(scope="module")
def live() -> LiveNode:
    node = LiveNode()
    yield node  # type: ignore[misc]
    node.close()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.one_of(st.binary(max_size=300), mutations.map(lambda m: mutate(*m))), max_size=3))
def test_live_node_survives_garbage_streams(live: LiveNode, messages: list[bytes]) -> None:
    async def attack() -> None:
        stream = await live.connection.open_stream()
        try:
            for message in messages:
                await stream.send(message)
            await stream.send_eof()
            try:
                async with asyncio.timeout(0.5):
                    reply = await stream.receive()
                wire.parse_envelope(reply)  # whatever comes back is a well-formed envelope (an ERROR)
            except (PetalnodeError, TimeoutError):
                pass
        finally:
            await stream.reset("done")

    live.run(attack())
    reply = live.run(live.client.call(live.address, "ping", Ping(n=1), expected=Ping))
    assert reply == Ping(n=2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=200), st.builds(lambda n: Ping(n=n), st.integers()).map(lambda p: b"")))
def test_live_node_answers_bad_bodies_with_bad_request(live: LiveNode, body: bytes) -> None:
    async def attack() -> bytes:
        stream = await live.connection.open_stream()
        await stream.send(wire.encode_call("ping", body))
        await stream.send_eof()
        reply = await stream.receive()
        await stream.aclose()
        return reply

    envelope = wire.parse_envelope(live.run(attack()))
    assert envelope.kind in (wire.EnvelopeKind.ERROR, wire.EnvelopeKind.RESULT)
    if envelope.kind is wire.EnvelopeKind.ERROR:
        assert envelope.code == "bad_request"
    else:
        from petalnode.codecs import decode_message

        try:
            decode_message(envelope.body, expected=Ping)
        except CodecError:
            pytest.fail("a RESULT must carry a valid reply")

"""The in-memory stream transport and the shared multiplexer (chunking, flow control, close semantics)."""

from __future__ import annotations

import asyncio
import os

import pytest

from petalnode.errors import (
    ClosedResourceError,
    ConfigError,
    ConnectionClosedError,
    ConnectTimeoutError,
    LocalProtocolError,
    PeerIdMismatchError,
    RemoteProtocolError,
    TransportError,
)
from petalnode.identity import Identity
from petalnode.transport import Connection, ConnectionConfig, EndOfStreamError, LinkConfig, MemoryNetwork, Stream

SMALL = ConnectionConfig(chunk_bytes=4096, window_bytes=16384, max_message_bytes=1 << 20, max_streams=4)


class Server:
    """Accepts connections and echoes every message on every stream, upper-cased... no: reversed."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, connection: Connection) -> None:
        self.connections.append(connection)
        while True:
            try:
                stream = await connection.accept_stream()
            except ConnectionClosedError:
                return
            task = asyncio.create_task(self.echo(stream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def echo(self, stream: Stream) -> None:
        try:
            while True:
                await stream.send((await stream.receive())[::-1])
        except EndOfStreamError:
            await stream.aclose()
        except ConnectionClosedError:
            pass


async def make_pair(net: MemoryNetwork, config: ConnectionConfig | None = None):  # type: ignore[no-untyped-def]
    a = net.transport(Identity.from_seed(b"a"), host="a", config=config)
    b = net.transport(Identity.from_seed(b"b"), host="b", config=config)
    server = Server()
    listener = await b.listen(server.handle)
    return a, b, server, listener


async def test_echo_many_streams_and_big_message() -> None:
    net = MemoryNetwork(LinkConfig(latency_s=0.001))
    a, b, _, listener = await make_pair(net)
    async with a, b:
        assert listener.address.scheme == "memory" and listener.address.peer_id == b.local_peer_id
        conn = await a.dial(listener.address)
        assert conn.remote_peer_id == b.local_peer_id and conn.local_peer_id == a.local_peer_id
        big = os.urandom(9 * 1024 * 1024 + 7)

        async def one(payload: bytes) -> None:
            stream = await conn.open_stream()
            await stream.send(payload)
            assert await stream.receive() == payload[::-1]
            await stream.send(b"")
            assert await stream.receive() == b""
            await stream.send_eof()
            with pytest.raises(EndOfStreamError):
                await stream.receive()
            await stream.aclose()

        async with asyncio.timeout(10):
            await asyncio.gather(one(big), *(one(bytes([i]) * (i * 1000)) for i in range(1, 8)))


async def test_slow_receiver_backpressures_sender() -> None:
    net = MemoryNetwork()
    a = net.transport(Identity.from_seed(b"a"), host="a", config=SMALL)
    b = net.transport(Identity.from_seed(b"b"), host="b", config=SMALL)
    accepted: asyncio.Queue[Stream] = asyncio.Queue()

    async def handle(connection: Connection) -> None:
        await accepted.put(await connection.accept_stream())

    async with a, b:
        listener = await b.listen(handle)
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        await stream.send(b"x")
        remote = await accepted.get()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await stream.send(b"y" * 1000)
                sent += 1000

        task = asyncio.create_task(flood())
        await asyncio.sleep(0.05)
        # The receiver read nothing, so no more than its window (plus one message in flight) was sent.
        assert SMALL.window_bytes - 1000 <= sent <= SMALL.window_bytes + 1000
        assert await remote.receive() == b"x"
        for _ in range(40):
            assert await remote.receive() == b"y" * 1000
        await asyncio.sleep(0.02)
        assert sent >= 30_000
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_message_limits() -> None:
    net = MemoryNetwork()
    small_receiver = ConnectionConfig(chunk_bytes=4096, window_bytes=16384, max_message_bytes=10_000)
    big_sender = ConnectionConfig(chunk_bytes=4096, window_bytes=16384, max_message_bytes=1 << 20)
    a = net.transport(Identity.from_seed(b"a"), host="a", config=big_sender)
    b = net.transport(Identity.from_seed(b"b"), host="b", config=small_receiver)
    server = Server()
    async with a, b:
        listener = await b.listen(server.handle)
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        with pytest.raises(LocalProtocolError):
            await stream.send(b"z" * (big_sender.max_message_bytes + 1))
        await stream.send(b"ok")
        assert await stream.receive() == b"ko"
        # Over the receiver's limit: the receiver resets the stream, the connection survives.
        with pytest.raises(ConnectionClosedError, match="exceeds"):
            await stream.send(b"z" * 50_000)
            await stream.receive()
        other = await conn.open_stream()
        await other.send(b"still")
        assert await other.receive() == b"llits"


async def test_too_many_streams_are_reset_not_fatal() -> None:
    net = MemoryNetwork()
    a, b, _, listener = await make_pair(net, SMALL)
    async with a, b:
        conn = await a.dial(listener.address)
        streams = [await conn.open_stream() for _ in range(SMALL.max_streams + 1)]
        for s in streams[:-1]:
            await s.send(b"ab")
            assert await s.receive() == b"ba"
        with pytest.raises(ConnectionClosedError, match="too many streams"):
            await streams[-1].send(b"ab")
            await streams[-1].receive()
        await streams[0].aclose()
        await streams[0].aclose()
        with pytest.raises(ClosedResourceError):
            await streams[0].send(b"x")


async def test_reset_reaches_peer() -> None:
    net = MemoryNetwork()
    a = net.transport(Identity.from_seed(b"a"), host="a")
    b = net.transport(Identity.from_seed(b"b"), host="b")
    accepted: asyncio.Queue[Stream] = asyncio.Queue()

    async def handle(connection: Connection) -> None:
        await accepted.put(await connection.accept_stream())

    async with a, b:
        listener = await b.listen(handle)
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        await stream.send(b"hi")
        remote = await accepted.get()
        await stream.reset("changed my mind")
        async with asyncio.timeout(1):
            assert await remote.receive() == b"hi"
            with pytest.raises(ConnectionClosedError, match="changed my mind"):
                await remote.receive()


async def test_dial_errors() -> None:
    net = MemoryNetwork(LinkConfig(latency_s=0.01))
    a, b, _, listener = await make_pair(net)
    async with a, b:
        wrong = listener.address.with_peer_id(a.local_peer_id)
        with pytest.raises(PeerIdMismatchError):
            await a.dial(wrong)
        with pytest.raises(TransportError, match="refused"):
            await a.dial(listener.address.__class__("memory", "b", 1, None))
        net.partition("b")
        with pytest.raises(ConnectTimeoutError):
            await a.dial(listener.address, connect_timeout_s=0.1)
        net.heal("b")
        conn = await a.dial(listener.address, connect_timeout_s=1)
        assert not conn.closed
        await listener.aclose()
        with pytest.raises(TransportError, match="refused"):
            await a.dial(listener.address)


async def test_kill_drops_connections_on_both_sides() -> None:
    net = MemoryNetwork(LinkConfig(latency_s=0.005))
    a, b, server, listener = await make_pair(net)
    async with a, b:
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        await stream.send(b"abc")
        assert await stream.receive() == b"cba"
        net.kill("b")
        async with asyncio.timeout(1):
            with pytest.raises(ConnectionClosedError):
                await stream.receive()
            await conn.wait_closed()
            await server.connections[0].wait_closed()
        with pytest.raises(ConnectionClosedError):
            await conn.open_stream()
        with pytest.raises(TransportError):
            await a.dial(listener.address)


async def test_partition_stalls_then_keepalive_drops_connection() -> None:
    config = ConnectionConfig(keepalive_interval_s=0.05, keepalive_timeout_s=0.2)
    net = MemoryNetwork()
    a, b, _, listener = await make_pair(net, config)
    async with a, b:
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        net.partition("b")
        await stream.send(b"held")
        await asyncio.sleep(0.1)
        net.heal("b")  # frames held during a short partition arrive after it heals
        async with asyncio.timeout(1):
            assert await stream.receive() == b"dleh"
        net.partition("b")
        async with asyncio.timeout(2):
            await conn.wait_closed()
        with pytest.raises(ConnectionClosedError, match="silent"):
            await stream.receive()


async def test_keepalive_probes_only_quiet_connections() -> None:
    config = ConnectionConfig(keepalive_interval_s=0.2, keepalive_timeout_s=1.0)
    net = MemoryNetwork(LinkConfig(latency_s=0.001))
    a, b, server, listener = await make_pair(net, config)
    async with a, b:
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        for _ in range(30):  # busy both ways (echo) ten times per interval for 3 intervals: no probes at all
            await stream.send(b"x")
            assert await stream.receive() == b"x"
            await asyncio.sleep(0.02)
        remote = server.connections[0]
        assert conn.pings_sent == 0 and remote.pings_sent == 0  # type: ignore[attr-defined]
        await asyncio.sleep(2.0)  # idle for 10 intervals: one side's probe keeps both sides content
        pings = conn.pings_sent + remote.pings_sent  # type: ignore[attr-defined]
        assert 4 <= pings <= 12, pings  # two per interval (20) without the quiet check
        assert not conn.closed and not remote.closed


async def test_the_dialler_closes_a_connection_idle_for_idle_timeout() -> None:
    config = ConnectionConfig(keepalive_interval_s=0.05, keepalive_timeout_s=1.0, idle_timeout_s=0.3)
    net = MemoryNetwork()
    a, b, server, listener = await make_pair(net, config)
    async with a, b:
        conn = await a.dial(listener.address)
        stream = await conn.open_stream()
        await stream.send(b"ab")
        assert await stream.receive() == b"ba"
        await asyncio.sleep(0.6)  # a stream is open (a session between steps): never idle
        assert not conn.closed
        await stream.send_eof()
        with pytest.raises(EndOfStreamError):
            await stream.receive()
        await asyncio.sleep(0.15)
        assert not conn.closed  # idle, but not for long yet
        async with asyncio.timeout(1):
            await conn.wait_closed()  # closed by its dialler...
            await server.connections[0].wait_closed()  # ...which the other side sees at once
        again = await a.dial(listener.address)  # a new call simply dials again
        assert not again.closed
    with pytest.raises(ConfigError):
        ConnectionConfig(keepalive_interval_s=None, idle_timeout_s=1.0)


async def test_remote_protocol_violation_closes_only_that_connection() -> None:
    net = MemoryNetwork()
    a, b, server, listener = await make_pair(net)
    async with a, b:
        bad = await a.dial(listener.address)
        good = await a.dial(listener.address)
        bad._channel.write_frame(b"\xff\x00\x00\x00\x00\x01garbage")  # type: ignore[attr-defined]
        async with asyncio.timeout(1):
            await server.connections[0].wait_closed()
        stream = await good.open_stream()
        await stream.send(b"fine")
        assert await stream.receive() == b"enif"
        third = await a.dial(listener.address)
        assert not third.closed
    with pytest.raises(RemoteProtocolError):
        from petalnode.transport._frames import parse_frame

        parse_frame(b"\xff\x00\x00\x00\x00\x01")

"""RPC over the in-memory transport: typed errors, timeouts, streams with heartbeats, the connection pool."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

import petalnode.transport as transport_pkg
from petalnode.codecs import Message, register_message
from petalnode.errors import (
    BadRequestError,
    BusyError,
    ConnectionClosedError,
    InternalError,
    OutOfCacheMemoryError,
    RPCTimeoutError,
    TransportError,
    UnknownSessionError,
)
from petalnode.identity import Identity, PeerAddress
from petalnode.rpc import RPC, CallContext, RPCStream
from petalnode.transport import ConnectionConfig, EndOfStreamError, LinkConfig, MemoryNetwork
from simulations._virtual_loop import run


@register_message
class Echo(Message):
    KIND: ClassVar[str] = "test.rpc.echo"
    text: str = ""
    delay_s: float = 0.0


@register_message
class Fail(Message):
    KIND: ClassVar[str] = "test.rpc.fail"
    code: str = ""


class EchoService:
    """A server with explicit rpc_<verb> handlers, and the matching call_<verb> client stubs."""

    def __init__(self, rpc: RPC) -> None:
        self.rpc = rpc
        self.cancelled = asyncio.Event()
        rpc.add_unary_handler("echo", self.rpc_echo, request_type=Echo)
        rpc.add_unary_handler("fail", self.rpc_fail, request_type=Fail)
        rpc.add_stream_handler("chat", self.rpc_chat, request_type=Echo)

    async def rpc_echo(self, request: Message, context: CallContext) -> Message:
        assert isinstance(request, Echo)
        try:
            await asyncio.sleep(request.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Echo(text=request.text.upper())

    async def rpc_fail(self, request: Message, context: CallContext) -> Message:
        assert isinstance(request, Fail)
        errors = {"busy": BusyError, "oom": OutOfCacheMemoryError, "session": UnknownSessionError}
        if request.code in errors:
            raise errors[request.code](f"because {request.code}")
        if request.code == "bad_reply":
            return "not a message"  # type: ignore[return-value]
        raise ZeroDivisionError("a bug")

    async def rpc_chat(self, stream: RPCStream, context: CallContext) -> None:
        while True:
            try:
                message = await stream.receive()
            except EndOfStreamError:
                return
            assert isinstance(message, Echo)
            if message.text == "quit-busy":
                raise BusyError("too many sessions")
            if message.text == "flood":
                for i in range(20):
                    await stream.send(Echo(text=str(i)))
                continue
            await stream.send(Echo(text=message.text[::-1]))

    @staticmethod
    async def call_echo(rpc: RPC, peer: PeerAddress, text: str, **kwargs: float) -> str:
        reply = await rpc.call(peer, "echo", Echo(text=text, **kwargs), expected=Echo)
        assert isinstance(reply, Echo)
        return reply.text


async def setup(net: MemoryNetwork, **rpc_options: float):  # type: ignore[no-untyped-def]
    config = ConnectionConfig(keepalive_interval_s=None)
    server_rpc = RPC(net.transport(Identity.from_seed(b"server"), host="server", config=config), **rpc_options)
    client_rpc = RPC(net.transport(Identity.from_seed(b"client"), host="client", config=config), **rpc_options)
    service = EchoService(server_rpc)
    listener = await server_rpc.listen()
    return server_rpc, client_rpc, service, listener.address


def test_exports_match_public_names() -> None:
    public = {n for n in vars(transport_pkg) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if type(getattr(transport_pkg, n)).__name__ == "module"}
    assert set(transport_pkg.__all__) == public - modules


async def test_unary_calls_and_typed_errors() -> None:
    server, client, _, address = await setup(MemoryNetwork(LinkConfig(latency_s=0.001)))
    async with server, client:
        assert await EchoService.call_echo(client, address, "hi") == "HI"
        for code, cls in [("busy", BusyError), ("oom", OutOfCacheMemoryError), ("session", UnknownSessionError)]:
            with pytest.raises(cls, match=f"because {code}"):
                await client.call(address, "fail", Fail(code=code))
        with pytest.raises(InternalError) as info:
            await client.call(address, "fail", Fail(code="crash"))
        assert "ZeroDivision" not in str(info.value)  # details stay in the server's log
        with pytest.raises(InternalError):
            await client.call(address, "fail", Fail(code="bad_reply"))
        with pytest.raises(BadRequestError, match="unknown"):
            await client.call(address, "nope", Echo())
        with pytest.raises(BadRequestError, match="bad request"):
            await client.call(address, "echo", Fail(code="x"))  # the wrong message type for the verb
        # after all that the server still serves, on the same pooled connection
        assert await EchoService.call_echo(client, address, "again") == "AGAIN"
        assert len({id(c) for c in client._pool.values()}) == 1


def test_timeout_cancels_server_handler() -> None:
    # Virtual time (simulations/_virtual_loop.py): the 0.2 s timeout costs no wall-clock time and is exact.
    async def scenario() -> None:
        server, client, service, address = await setup(MemoryNetwork())
        async with server, client:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(RPCTimeoutError):
                await client.call(address, "echo", Echo(text="slow", delay_s=10), timeout_s=0.2)
            assert 0.2 <= loop.time() - start < 0.25
            async with asyncio.timeout(1):
                await service.cancelled.wait()
            assert await EchoService.call_echo(client, address, "fast") == "FAST"

    run(scenario())


async def test_pool_dials_once_and_redials_dead_connections() -> None:
    net = MemoryNetwork(LinkConfig(latency_s=0.01))
    server, client, _, address = await setup(net)
    async with server, client:
        replies = await asyncio.gather(*(EchoService.call_echo(client, address, str(i)) for i in range(10)))
        assert replies == [str(i) for i in range(10)]
        first = await client.connect(address)
        assert len(client.transport._connections) == 1  # type: ignore[attr-defined]
        await first.aclose()
        assert await EchoService.call_echo(client, address, "x") == "X"
        assert (await client.connect(address)) is not first


async def test_server_can_call_back_over_the_incoming_connection() -> None:
    server, client, _, address = await setup(MemoryNetwork())
    EchoService(client)  # the client serves too
    async with server, client:
        await EchoService.call_echo(client, address, "hello")
        back = server._pool[client.transport.local_peer_id]
        reply = await server.call(back, "echo", Echo(text="from server"), expected=Echo)
        assert reply == Echo(text="FROM SERVER")


async def test_stream_round_trips_errors_and_end() -> None:
    server, client, _, address = await setup(MemoryNetwork(LinkConfig(latency_s=0.001)))
    async with server, client:
        async with await client.open_stream(address, "chat", expected=Echo) as stream:
            for text in ["abc", "", "xyz" * 1000]:
                await stream.send(Echo(text=text))
                assert await stream.receive(timeout_s=1) == Echo(text=text[::-1])
            with pytest.raises(RPCTimeoutError):
                await stream.receive(timeout_s=0.05)
            await stream.send(Echo(text="quit-busy"))
            with pytest.raises(BusyError, match="too many sessions"):
                await stream.receive(timeout_s=1)
            with pytest.raises(BusyError):
                await stream.receive(timeout_s=1)
        refused = await client.open_stream(address, "nope")
        with pytest.raises(BadRequestError, match="unknown"):
            await refused.receive(timeout_s=1)
        await refused.aclose()


def test_heartbeat_notices_a_dead_peer_but_not_a_slow_reader() -> None:
    # Virtual time: the sleeps below are loop time, not wall-clock time, and the bounds hold exactly.
    async def scenario() -> None:
        net = MemoryNetwork()
        server, client, _, address = await setup(net, heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)
        async with server, client:
            stream = await client.open_stream(address, "chat", expected=Echo)
            await stream.send(Echo(text="flood"))
            await asyncio.sleep(0.6)  # we do not read for twice the heartbeat timeout: still alive
            received = [await stream.receive(timeout_s=1) for _ in range(20)]
            assert received[-1] == Echo(text="19")
            await asyncio.sleep(0.5)  # idle both ways: pings keep it alive
            await stream.send(Echo(text="ok"))
            assert await stream.receive(timeout_s=1) == Echo(text="ko")
            net.partition("server")  # the peer goes silent without closing anything
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ConnectionClosedError, match="heartbeat"):
                await stream.receive(timeout_s=5)
            assert 0.3 <= loop.time() - start < 0.3 + 0.1
            await stream.aclose()
            await stream.aclose()
            net.heal("server")

    run(scenario())


async def test_killed_server_gives_connection_closed_not_hang() -> None:
    net = MemoryNetwork()
    server, client, _, address = await setup(net)
    async with server, client:
        stream = await client.open_stream(address, "chat", expected=Echo)
        await stream.send(Echo(text="a"))
        assert await stream.receive(timeout_s=1) == Echo(text="a")
        net.kill("server")
        with pytest.raises(ConnectionClosedError):
            await stream.receive(timeout_s=2)
        with pytest.raises(TransportError, match="refused"):  # the pooled connection died; the redial is refused
            await client.call(address, "echo", Echo(), timeout_s=1)

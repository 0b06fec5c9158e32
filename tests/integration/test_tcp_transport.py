"""The TCP transport over real loopback sockets, including a peer in a separate OS process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys

import pytest

from petalnode.errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    HandshakeError,
    PeerIdMismatchError,
    SwarmKeyMismatchError,
    TransportError,
)
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.swarm_key import SwarmKey
from petalnode.transport import Connection, EndOfStreamError, Stream, TcpTransport
from petalnode.transport import _handshake as hs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class EchoServer:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, connection: Connection) -> None:
        while True:
            stream = await connection.accept_stream()
            task = asyncio.create_task(self.echo(stream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def echo(self, stream: Stream) -> None:
        try:
            while True:
                await stream.send(await stream.receive())
        except EndOfStreamError:
            await stream.aclose()
        except ConnectionClosedError:
            pass


async def roundtrip(transport: TcpTransport, address: PeerAddress, payload: bytes = b"ping") -> None:
    connection = await transport.dial(address, connect_timeout_s=5)
    stream = await connection.open_stream()
    await stream.send(payload)
    assert await stream.receive() == payload
    await connection.aclose()


async def test_echo_with_a_peer_in_another_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            host, port, peer_hex = (await proc.stdout.readline()).decode().split()
        # (Not the text form: PeerId.from_text cannot parse to_text output yet; see the transport report.)
        address = PeerAddress("tcp", host, int(port), PeerId(bytes.fromhex(peer_hex)))
        async with TcpTransport(Identity.generate()) as client:
            connection = await client.dial(address)
            assert connection.remote_peer_id == address.peer_id
            stream = await connection.open_stream()
            big = os.urandom(20 * 1024 * 1024 + 3)  # many chunks, several windows
            await stream.send(big)
            assert await stream.receive() == big
            proc.send_signal(signal.SIGKILL)  # the peer dies without a goodbye
            async with asyncio.timeout(5):
                with pytest.raises(ConnectionClosedError):
                    await stream.receive()
                await connection.wait_closed()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_wrong_peer_id_is_refused_and_listener_keeps_serving() -> None:
    async with TcpTransport(Identity.generate()) as server, TcpTransport(Identity.generate()) as client:
        listener = await server.listen(EchoServer().handle)
        with pytest.raises(PeerIdMismatchError):
            await client.dial(listener.address.with_peer_id(client.local_peer_id))
        await roundtrip(client, listener.address)


async def test_bad_signature_is_refused() -> None:
    liar = Identity.from_seed(b"liar")

    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ephemeral = hs.EphemeralKey()
        writer.write(ephemeral.hello())
        peer = hs.parse_hello(await reader.readexactly(hs.HELLO_BYTES))
        th = hs.transcript_hash(peer, ephemeral.public)
        send_key, _ = hs.derive_keys(ephemeral.exchange(peer), th, hs.Role.RESPONDER)
        # A proof signed over the wrong transcript (e.g. replayed from another session).
        proof = hs.make_proof(liar, hs.Role.RESPONDER, bytes(32))
        writer.write(hs.RecordSealer(send_key).seal(proof))
        await asyncio.sleep(2)
        writer.close()

    server = await asyncio.start_server(rogue, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, TcpTransport(Identity.generate()) as client:
        with pytest.raises(HandshakeError, match="signature"):
            await client.dial(PeerAddress("tcp", "127.0.0.1", port, liar.peer_id))


async def test_silent_peer_gives_connect_timeout_and_silent_client_is_dropped() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, TcpTransport(Identity.generate()) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectTimeoutError):
            await client.dial(PeerAddress("tcp", "127.0.0.1", port), connect_timeout_s=0.3)
        assert loop.time() - start < 1.5

    async with TcpTransport(Identity.generate(), handshake_timeout_s=0.3) as node, TcpTransport(
        Identity.generate()
    ) as client:
        listener = await node.listen(EchoServer().handle)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.address.port)
        async with asyncio.timeout(3):
            hello = await reader.read()  # the node says HELLO, waits 0.3 s for ours, then hangs up
        assert hello.startswith(hs.MAGIC) and len(hello) == hs.HELLO_BYTES
        writer.close()
        await roundtrip(client, listener.address)


async def test_garbage_and_refused_connections() -> None:
    async with TcpTransport(Identity.generate()) as node, TcpTransport(Identity.generate()) as client:
        listener = await node.listen(EchoServer().handle)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.address.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100)
        async with asyncio.timeout(3):
            await reader.read()  # the node hangs up on us
        writer.close()
        await roundtrip(client, listener.address)
        await listener.aclose()
        with pytest.raises(TransportError):
            await client.dial(listener.address)


@pytest.mark.parametrize("attack", ["oversize", "tampered"])
async def test_bad_record_closes_only_that_connection(attack: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with TcpTransport(Identity.generate()) as node, TcpTransport(Identity.generate()) as client:
        listener = await node.listen(EchoServer().handle)
        victim = await client.dial(listener.address)
        bystander = await client.dial(listener.address)
        writer: asyncio.StreamWriter = victim._channel._writer  # type: ignore[attr-defined]
        if attack == "oversize":
            writer.write((100 * 1024 * 1024).to_bytes(4, "big") + b"x" * 1000)
        else:
            writer.write((64).to_bytes(4, "big") + os.urandom(64))
        async with asyncio.timeout(5):
            await victim.wait_closed()
        assert "exceeds the limit" in caplog.text if attack == "oversize" else "authentication" in caplog.text
        stream = await bystander.open_stream()
        await stream.send(b"still here")
        assert await stream.receive() == b"still here"
        await roundtrip(client, listener.address)


async def _serve_forever() -> None:
    async with TcpTransport(Identity.generate()) as transport:
        listener = await transport.listen(EchoServer().handle)
        address = listener.address
        assert address.peer_id is not None
        print(address.host, address.port, address.peer_id.raw.hex(), flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    asyncio.run(_serve_forever())


@pytest.mark.parametrize("client_key", [None, SwarmKey(bytes(32))], ids=["no key", "other key"])
async def test_private_swarm_only_key_holders_connect_and_the_listener_keeps_serving(
    client_key: SwarmKey | None, caplog: pytest.LogCaptureFixture
) -> None:
    key = SwarmKey(bytes(range(32)))
    async with (
        TcpTransport(Identity.generate(), swarm_key=key) as server,
        TcpTransport(Identity.generate(), swarm_key=client_key) as outsider,
        TcpTransport(Identity.generate(), swarm_key=key) as member,
    ):
        listener = await server.listen(EchoServer().handle)
        with caplog.at_level(logging.WARNING, logger="petalnode.transport._tcp"):
            with pytest.raises(SwarmKeyMismatchError):
                await outsider.dial(listener.address, connect_timeout_s=5)
            for _ in range(100):  # the server logs its side of the failure once its handshake task ends
                if "swarm key" in caplog.text:
                    break
                await asyncio.sleep(0.02)
        assert "does not hold our swarm key" in caplog.text
        await roundtrip(member, listener.address)
        # ... and a keyed node cannot dial into a public (or other) swarm's listener either.
        async with TcpTransport(Identity.generate(), swarm_key=client_key) as other:
            other_listener = await other.listen(EchoServer().handle)
            with pytest.raises(SwarmKeyMismatchError):
                await member.dial(other_listener.address, connect_timeout_s=5)

"""Network benchmark: RPC round trip and streaming throughput over TCP (two OS processes), in-memory, and a plain
asyncio-socket baseline (no encryption, no multiplexing, length-prefixed messages), side by side in one run;
plus the secure channel itself against TLS 1.3 (handshake time, round trip, bulk throughput: ours, ours with a
swarm key, stdlib TLS 1.3 with Ed25519 identity certificates and mutual authentication, plain), and DHT lookup
latency when benchmarks/dht_lookup.py exists. Prints one JSON object.

    .venv/bin/python benchmarks/network.py [--quick] [--channels-only]

Round trip: one small unary RPC (codec message in, codec message out), median and p99 over N calls.
Throughput: an RPC stream carrying `Blob` messages of 1 MiB / 16 MiB, pipelined, one ack at the end (MiB/s of
payload). The baseline sends the same payload sizes as u32-length-prefixed messages over a bare socket.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import importlib.util
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from petalnode.codecs import Message, register_message
from petalnode.errors import PetalnodeError
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.rpc import RPC, CallContext, RPCStream
from petalnode.swarm_key import SwarmKey
from petalnode.transport import MemoryNetwork, TcpTransport, Transport
from petalnode.transport import _handshake as hs
from petalnode.transport._tcp import _handshake as tcp_handshake

MIB = 1 << 20


@register_message
class Echo(Message):
    KIND: ClassVar[str] = "bench.echo"
    n: int = 0


@register_message
class Blob(Message):
    KIND: ClassVar[str] = "bench.blob"
    data: bytes = b""
    last: bool = False


def make_server(transport: Transport) -> RPC:
    rpc = RPC(transport)

    async def echo(request: Message, context: CallContext) -> Message:
        assert isinstance(request, Echo)
        return Echo(n=request.n + 1)

    async def sink(stream: RPCStream, context: CallContext) -> None:
        count = 0
        while True:
            message = await stream.receive()
            assert isinstance(message, Blob)
            count += 1
            if message.last:
                await stream.send(Echo(n=count))
                count = 0

    rpc.add_unary_handler("echo", echo, request_type=Echo)
    rpc.add_stream_handler("sink", sink, request_type=Blob)
    return rpc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_rpc(client: RPC, address: PeerAddress, calls: int, sizes: dict[int, int]) -> dict[str, Any]:
    for _ in range(20):  # warm up: connection, caches
        await client.call(address, "echo", Echo(n=0), expected=Echo)
    rtts = []
    for i in range(calls):
        start = time.perf_counter()
        await client.call(address, "echo", Echo(n=i), expected=Echo)
        rtts.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "rpc_rtt_median_us": round(statistics.median(rtts) * 1e6, 1),
        "rpc_rtt_p99_us": round(percentile(rtts, 0.99) * 1e6, 1),
    }
    stream = await client.open_stream(address, "sink", expected=Echo)
    for size, count in sizes.items():
        payload = os.urandom(size)
        await stream.send(Blob(data=payload[:1024], last=True))
        await stream.receive(timeout_s=30)
        start = time.perf_counter()
        for i in range(count):
            await stream.send(Blob(data=payload, last=i == count - 1))
        ack = await stream.receive(timeout_s=120)
        elapsed = time.perf_counter() - start
        assert isinstance(ack, Echo) and ack.n == count
        result[f"stream_{size // MIB}mib_mib_per_s"] = round(size * count / MIB / elapsed, 1)
    await stream.aclose()
    return result


# ---- plain asyncio baseline -------------------------------------------------------------------------------


async def plain_server() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(5)
                length, kind = int.from_bytes(header[:4], "big"), header[4]
                await reader.readexactly(length)
                if kind == 1:  # reply expected (round trip, or the last message of a batch)
                    writer.write((4).to_bytes(4, "big") + b"\x00" + b"ack!")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, limit=MIB)


async def time_round_trips_and_bulk(
    send: Callable[[bytes, bool], Awaitable[None]], calls: int, sizes: dict[int, int], *, rtt_key: str, bulk_key: str
) -> dict[str, Any]:
    """Median/p99 round trip of a small message (after 20 warm-ups), then MiB/s of each payload size pipelined
    with one reply at the end. `send(payload, reply)` returns once the reply (if asked for) is in."""
    small = os.urandom(40)
    for _ in range(20):
        await send(small, True)
    rtts = []
    for _ in range(calls):
        start = time.perf_counter()
        await send(small, True)
        rtts.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        f"{rtt_key}_median_us": round(statistics.median(rtts) * 1e6, 1),
        f"{rtt_key}_p99_us": round(percentile(rtts, 0.99) * 1e6, 1),
    }
    for size, count in sizes.items():
        payload = os.urandom(size)
        start = time.perf_counter()
        for i in range(count):
            await send(payload, i == count - 1)
        result[f"{bulk_key}_{size // MIB}mib_mib_per_s"] = round(size * count / MIB / (time.perf_counter() - start), 1)
    return result


async def measure_plain(port: int, calls: int, sizes: dict[int, int]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MIB)

    async def send(payload: bytes, reply: bool) -> None:
        writer.write(len(payload).to_bytes(4, "big") + (b"\x01" if reply else b"\x00") + payload)
        await writer.drain()
        if reply:
            await reader.readexactly(9)

    result = await time_round_trips_and_bulk(send, calls, sizes, rtt_key="rpc_rtt", bulk_key="stream")
    writer.close()
    return result


# ---- secure channels side by side: ours (SIGMA-I), ours with a swarm key, TLS 1.3, plain -------------------------
# Same framing for all four (u32 length | kind byte | payload, messages cut into 240 KiB records as our mux does),
# same asyncio streams, server in a child process; only the channel differs. Handshake time = TCP connect + the
# channel's handshake + checking the peer's id, median over fresh connections.

CHUNK_BYTES = 240 * 1024
KIND_ONE_WAY, KIND_REPLY = 0, 1
_TLS_CA_SEED = b"petalnode benchmark TLS CA (a public key pair: identities are checked after the handshake)"


def tls_context(identity: Identity, *, server: bool, folder: Path) -> ssl.SSLContext:
    """TLS 1.3 only, mutual authentication, the Ed25519 identity key as the certificate key (libp2p-style binding:
    the peer id is the hash of the certificate's public key, checked after the handshake). OpenSSL refuses unknown
    self-signed client certificates, so certificates are issued by a CA whose key is derived from a public
    constant (in a private swarm it could be derived from the swarm key, making OpenSSL check membership)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    ca_key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(_TLS_CA_SEED).digest())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "petalnode benchmark CA")])
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    validity = {"not_valid_before": now - day, "not_valid_after": now + day}
    ca_cert = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=1, **validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, None)
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id.to_text())])
    cert = x509.CertificateBuilder(issuer_name=ca_name, subject_name=name,
                                   public_key=identity.private_key.public_key(),
                                   serial_number=x509.random_serial_number(), **validity).sign(ca_key, None)
    pem = serialization.Encoding.PEM
    certfile, keyfile = folder / f"{identity.peer_id}.crt", folder / f"{identity.peer_id}.key"
    certfile.write_bytes(cert.public_bytes(pem))
    keyfile.write_bytes(identity.private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certfile, keyfile)
    context.load_verify_locations(cadata=ca_cert.public_bytes(pem).decode())
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False
    return context


def tls_peer_id(writer: asyncio.StreamWriter) -> PeerId:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    key = x509.load_der_x509_certificate(der).public_key()
    return PeerId.from_public_key(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


class StreamFrames:
    """Plain or TLS: u32-length-prefixed frames over an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def write_frame(self, frame: bytes) -> None:
        self.writer.write(len(frame).to_bytes(4, "big") + frame)

    async def drain(self) -> None:
        await self.writer.drain()

    async def receive_frame(self) -> bytes:
        length = int.from_bytes(await self.reader.readexactly(4), "big")
        return await self.reader.readexactly(length)

    async def aclose(self) -> None:
        self.writer.close()


async def channel_echo(channel: Any) -> None:
    try:
        while True:
            frame = await channel.receive_frame()
            if frame[0] == KIND_REPLY:
                channel.write_frame(bytes([KIND_ONE_WAY]) + b"ack!")
                await channel.drain()
    except (asyncio.IncompleteReadError, ConnectionError, PetalnodeError):
        await channel.aclose()


async def channel_servers(folder: Path) -> dict[str, Any]:
    """Start the four servers in this (child) process; returns what the parent needs to dial them."""
    identity = Identity.generate()
    key = SwarmKey.generate()
    servers: dict[str, Any] = {}

    def ours(swarm_key: SwarmKey | None):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            channel, _ = await tcp_handshake(reader, writer, identity, hs.Role.RESPONDER, CHUNK_BYTES + 16, swarm_key)
            await channel_echo(channel)
        return handle

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await channel_echo(StreamFrames(reader, writer))

    async def tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls_peer_id(writer)  # the server checks the client's id too (mutual authentication)
        await channel_echo(StreamFrames(reader, writer))

    context = tls_context(identity, server=True, folder=folder)
    for name, handler, ssl_context in (("plain", plain, None), ("ours", ours(None), None),
                                       ("ours_swarm_key", ours(key), None), ("tls13", tls, context)):
        server = await asyncio.start_server(handler, "127.0.0.1", 0, limit=MIB, ssl=ssl_context)
        servers[name] = server.sockets[0].getsockname()[1]
    return {"ports": servers, "peer": identity.peer_id.raw.hex(), "swarm_key": key.to_text()}


async def channel_dial(name: str, port: int, peer: PeerId, identity: Identity, key: SwarmKey,
                       tls: ssl.SSLContext) -> Any:
    if name == "plain":
        return StreamFrames(*await asyncio.open_connection("127.0.0.1", port, limit=MIB))
    if name == "tls13":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MIB, ssl=tls, server_hostname=None)
        assert tls_peer_id(writer) == peer
        return StreamFrames(reader, writer)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MIB)
    channel, remote = await tcp_handshake(reader, writer, identity, hs.Role.INITIATOR, CHUNK_BYTES + 16,
                                          key if name == "ours_swarm_key" else None)
    assert remote == peer
    return channel


async def measure_channel(name: str, port: int, peer: PeerId, identity: Identity, key: SwarmKey,
                          tls: ssl.SSLContext, handshakes: int, calls: int, sizes: dict[int, int]) -> dict[str, Any]:
    async def send(channel: Any, payload: bytes, reply: bool) -> None:
        for offset in range(0, max(len(payload), 1), CHUNK_BYTES):
            last = offset + CHUNK_BYTES >= len(payload)
            channel.write_frame(bytes([KIND_REPLY if reply and last else KIND_ONE_WAY]) +
                                payload[offset : offset + CHUNK_BYTES])
            await channel.drain()
        if reply:
            await channel.receive_frame()

    setups = []
    for _ in range(handshakes):
        start = time.perf_counter()
        channel = await channel_dial(name, port, peer, identity, key, tls)
        setups.append(time.perf_counter() - start)
        await channel.aclose()
    channel = await channel_dial(name, port, peer, identity, key, tls)
    result: dict[str, Any] = {
        "handshake_median_us": round(statistics.median(setups) * 1e6, 1),
        "handshake_p90_us": round(percentile(setups, 0.9) * 1e6, 1),
    }
    result |= await time_round_trips_and_bulk(
        lambda payload, reply: send(channel, payload, reply), calls, sizes, rtt_key="rtt", bulk_key="bulk"
    )
    if name == "tls13":
        result["tls_cipher"] = channel.writer.get_extra_info("cipher")[0]
    await channel.aclose()
    return result


async def secure_channels(quick: bool) -> dict[str, Any]:
    """Ours vs ours with a swarm key vs TLS 1.3 vs plain, in one run, with ratios to ours."""
    handshakes, calls = (50, 300) if quick else (300, 2000)
    sizes = {MIB: 32, 16 * MIB: 4} if quick else {MIB: 128, 16 * MIB: 16}
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve", "channels",
                                                stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            info = json.loads(await proc.stdout.readline())
        peer, key = PeerId(bytes.fromhex(info["peer"])), SwarmKey.from_text(info["swarm_key"])
        identity = Identity.generate()
        with tempfile.TemporaryDirectory() as folder:
            tls = tls_context(identity, server=False, folder=Path(folder))
            report: dict[str, Any] = {"handshakes": handshakes, "rtt_calls": calls,
                                      "bulk_messages": {f"{s // MIB}MiB": n for s, n in sizes.items()}}
            # Interleave rounds so a load spike from other processes hits every channel alike; keep the medians.
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in info["ports"]}
            for _ in range(3 if quick else 5):
                for name, port in info["ports"].items():
                    rounds[name].append(await measure_channel(name, port, peer, identity, key, tls,
                                                              handshakes // 3 or 1, calls // 3 or 1, sizes))
    finally:
        proc.kill()
        await proc.wait()
    for name, results in rounds.items():
        merged: dict[str, Any] = {}
        for field in results[0]:
            values = [r[field] for r in results]
            merged[field] = statistics.median(values) if isinstance(values[0], float) else values[0]
        report[name] = merged
    for name in ("plain", "ours_swarm_key", "tls13"):
        report[f"{name}_vs_ours"] = {
            field: round(report[name][field] / report["ours"][field], 2)
            for field in report["ours"] if isinstance(report["ours"][field], float) and report["ours"][field]
        }
    return report


# ---- child processes ----------------------------------------------------------------------------------------


async def serve(kind: str) -> None:
    if kind == "channels":
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(await channel_servers(Path(folder))), flush=True)
            await asyncio.Event().wait()
    if kind == "plain":
        server = await plain_server()
        print("127.0.0.1", server.sockets[0].getsockname()[1], "-", flush=True)
        await asyncio.Event().wait()
    async with TcpTransport(Identity.generate()) as transport, make_server(transport) as rpc:
        address = (await rpc.listen(host="127.0.0.1")).address
        assert address.peer_id is not None
        print(address.host, address.port, address.peer_id.raw.hex(), flush=True)
        await asyncio.Event().wait()


async def spawn(kind: str) -> tuple[asyncio.subprocess.Process, str, int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", kind, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        host, port, peer = (await proc.stdout.readline()).decode().split()
    return proc, host, int(port), peer


async def run(quick: bool) -> dict[str, Any]:
    calls = 300 if quick else 2000
    sizes = {MIB: 16, 16 * MIB: 2} if quick else {MIB: 64, 16 * MIB: 8}
    report: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "rpc_calls": calls,
        "stream_messages": {f"{s // MIB}MiB": n for s, n in sizes.items()},
    }

    proc, host, port, _ = await spawn("plain")
    try:
        report["plain_asyncio_two_processes"] = await measure_plain(port, calls, sizes)
    finally:
        proc.kill()
        await proc.wait()

    proc, host, port, peer = await spawn("tcp")
    try:
        async with TcpTransport(Identity.generate()) as transport, RPC(transport) as client:
            address = PeerAddress("tcp", host, port, PeerId(bytes.fromhex(peer)))
            report["tcp_two_processes"] = await measure_rpc(client, address, calls, sizes)
    finally:
        proc.kill()
        await proc.wait()

    network = MemoryNetwork()
    async with network.transport(Identity.generate(), host="server") as server_transport, network.transport(
        Identity.generate(), host="client"
    ) as client_transport, make_server(server_transport) as server, RPC(client_transport) as client:
        address = (await server.listen()).address
        report["memory_one_loop"] = await measure_rpc(client, address, calls, sizes)

    base = report["plain_asyncio_two_processes"]
    for name in ("tcp_two_processes", "memory_one_loop"):
        ratios = {}
        for key, value in report[name].items():
            ratios[f"{key}_vs_plain"] = round(value / base[key], 2) if base.get(key) else None
        report[f"{name}_ratios"] = ratios

    report["secure_channels"] = await secure_channels(quick)
    report["dht_lookup"] = await dht_lookups(quick)
    return report


async def dht_lookups(quick: bool) -> dict[str, Any]:
    path = Path(__file__).with_name("dht_lookup.py")
    if not path.exists():
        return {"skipped": "benchmarks/dht_lookup.py does not exist yet"}
    spec = importlib.util.spec_from_file_location("benchmarks_dht_lookup", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {}
    for nodes in (50, 200):
        try:
            results[f"{nodes}_nodes"] = await module.measure_dht_lookups(nodes)
        except Exception as e:  # report, do not lose the transport numbers
            results[f"{nodes}_nodes"] = {"error": repr(e)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and messages (for a smoke run)")
    parser.add_argument("--channels-only", action="store_true",
                        help="only the secure-channel comparison (ours, ours with a swarm key, TLS 1.3, plain)")
    parser.add_argument("--serve", choices=["tcp", "plain", "channels"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    if args.channels_only:
        print(json.dumps(asyncio.run(secure_channels(args.quick)), indent=2))
        return
    print(json.dumps(asyncio.run(run(args.quick)), indent=2))


if __name__ == "__main__":
    main()

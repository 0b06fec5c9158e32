"""Network benchmark: RPC round trip and streaming throughput over TCP (two OS processes), in-memory, and a plain
asyncio-socket baseline (no encryption, no multiplexing, length-prefixed messages), side by side in one run;
plus DHT lookup latency when benchmarks/dht_lookup.py exists. Prints one JSON object.

    .venv/bin/python benchmarks/network.py [--quick]

Round trip: one small unary RPC (codec message in, codec message out), median and p99 over N calls.
Throughput: an RPC stream carrying `Blob` messages of 1 MiB / 16 MiB, pipelined, one ack at the end (MiB/s of
payload). The baseline sends the same payload sizes as u32-length-prefixed messages over a bare socket.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from petalnode.codecs import Message, register_message
from petalnode.identity import Identity, PeerAddress, PeerId
from petalnode.rpc import RPC, CallContext, RPCStream
from petalnode.transport import MemoryNetwork, TcpTransport, Transport

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


async def measure_plain(port: int, calls: int, sizes: dict[int, int]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MIB)

    async def send(payload: bytes, reply: bool) -> None:
        writer.write(len(payload).to_bytes(4, "big") + (b"\x01" if reply else b"\x00") + payload)
        await writer.drain()
        if reply:
            await reader.readexactly(9)

    small = os.urandom(40)
    for _ in range(20):
        await send(small, True)
    rtts = []
    for _ in range(calls):
        start = time.perf_counter()
        await send(small, True)
        rtts.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "rpc_rtt_median_us": round(statistics.median(rtts) * 1e6, 1),
        "rpc_rtt_p99_us": round(percentile(rtts, 0.99) * 1e6, 1),
    }
    for size, count in sizes.items():
        payload = os.urandom(size)
        start = time.perf_counter()
        for i in range(count):
            await send(payload, i == count - 1)
        result[f"stream_{size // MIB}mib_mib_per_s"] = round(size * count / MIB / (time.perf_counter() - start), 1)
    writer.close()
    return result


# ---- child processes ----------------------------------------------------------------------------------------


async def serve(kind: str) -> None:
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
    parser.add_argument("--serve", choices=["tcp", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    print(json.dumps(asyncio.run(run(args.quick)), indent=2))


if __name__ == "__main__":
    main()

"""TCP vs WebRTC (direct, and relayed through a public peer) on loopback, side by side; prints JSON.

Micro (one process, real nodes): a public relay node, a target node announcing tcp:// and one behind "NAT"
(announcing webrtc:// via the relay), and a fresh client per connection:
- connection setup: median time of `RPC.connect` (TCP: connect + handshake; WebRTC: signed offer/answer through
  the relay over TCP, ICE, DTLS, SCTP, channel open; relayed: relay stream + end-to-end handshake);
- RPC round trip: median of unary calls with a 64-byte payload on the pooled connection;
- bulk MB/s: 240 KiB messages on one RPC stream, until the receiver acknowledges all of them.
NAT bed (--natbed, root): the same swarm behind NAT A and a client behind NAT B (tests/natbed), decoding over the
direct server-reflexive path and, with NAT B symmetric, over the public peer's relay.
Swarm (--swarm): the default model through 3 server processes (10 blocks each) over TCP and over WebRTC, both
swarms up at once and runs interleaved: decode tokens/s and time to first token (greedy, 16-token prompt), median
of --runs. --switch-interval sets Python's GIL switch interval in every process: aiortc does much more Python
per message than TCP, so with the default 5 ms a compute thread holding the GIL delays each WebRTC hop.

aioice skips loopback host candidates, so "loopback" WebRTC uses this host's own interface address (still local).
Run: .venv/bin/python benchmarks/transports.py [--swarm] [--bulk-mib 16] [--runs 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

from petalnode.codecs import Message, register_message, wire_field
from petalnode.identity import Identity, PeerAddress
from petalnode.node import NatOptions, Node, Signaling
from petalnode.rpc import RPC, CallContext, RPCStream
from petalnode.transport import RelayData

CHUNK = 240 * 1024
REPO = Path(__file__).resolve().parents[1]


@register_message
class BenchDone(Message):
    KIND: ClassVar[str] = "bench.done"
    VERSION: ClassVar[int] = 1
    received: int = wire_field(min_value=0)


def _add_bench_verbs(rpc: RPC) -> None:
    async def echo(request: Message, context: CallContext) -> Message:
        return request

    async def sink(stream: RPCStream, context: CallContext) -> None:
        received = 0
        total = None
        while total is None or received < total:
            message = await stream.receive()
            assert isinstance(message, RelayData)
            if total is None:
                total = int.from_bytes(message.data, "big")
                continue
            received += len(message.data)
        await stream.send(BenchDone(received=received))

    rpc.add_unary_handler("bench_echo", echo, request_type=RelayData)
    rpc.add_stream_handler("bench_sink", sink, request_type=RelayData)


async def _client(kind: str) -> tuple[Signaling, RPC]:
    signaling = Signaling(Identity.generate(), NatOptions(stun=False))
    signaling.webrtc.direct = kind != "webrtc_relayed"
    return signaling, RPC(signaling.transport(), call_timeout_s=60.0, connect_timeout_s=10.0)


async def _close(signaling: Signaling, rpc: RPC) -> None:
    await rpc.aclose()
    await signaling.transport().aclose()  # a fresh MultiTransport over the same members: closes them


async def _measure(kind: str, address: PeerAddress, bulk_bytes: int, setups: int, calls: int) -> dict:
    setup_s = []
    for _ in range(setups):
        signaling, rpc = await _client(kind)
        started = time.perf_counter()
        await rpc.connect(address)
        setup_s.append(time.perf_counter() - started)
        await _close(signaling, rpc)
    signaling, rpc = await _client(kind)
    try:
        payload = RelayData(data=bytes(64))
        await rpc.call(address, "bench_echo", payload)
        rtts = []
        for _ in range(calls):
            started = time.perf_counter()
            await rpc.call(address, "bench_echo", payload)
            rtts.append(time.perf_counter() - started)
        stream = await rpc.open_stream(address, "bench_sink", expected=BenchDone)
        chunk = RelayData(data=bytes(CHUNK))
        count = max(1, bulk_bytes // CHUNK)
        started = time.perf_counter()
        await stream.send(RelayData(data=(count * CHUNK).to_bytes(8, "big")))
        for _ in range(count):
            await stream.send(chunk)
        done = await stream.receive()
        bulk_s = time.perf_counter() - started
        await stream.aclose()
        assert isinstance(done, BenchDone) and done.received == count * CHUNK
        paths = list(signaling.webrtc.connection_paths().values())
    finally:
        await _close(signaling, rpc)
    return {
        "connection_setup_ms_median": round(statistics.median(setup_s) * 1000, 2),
        "rpc_round_trip_ms_median": round(statistics.median(rtts) * 1000, 3),
        "bulk_mib_per_s": round(count * CHUNK / bulk_s / 2**20, 2),
        "bulk_mib": round(count * CHUNK / 2**20, 1),
        "path": paths[0] if paths else "tcp",
    }


async def micro(bulk_mib: float, setups: int, calls: int) -> dict:
    relay = Node(nat=NatOptions(mode="public", relay_bytes_per_s=1 << 40))
    await relay.start()
    direct = Node(bootstrap=[relay.address], nat=NatOptions(mode="public"))
    behind = Node(bootstrap=[relay.address], nat=NatOptions(mode="nat"))
    try:
        await direct.start()
        await behind.start()
        for node in (direct, behind):
            _add_bench_verbs(node.rpc)
        results = {}
        for kind, address, bulk in (("tcp", direct.address, bulk_mib * 4),
                                    ("webrtc_direct", behind.address, bulk_mib),
                                    ("webrtc_relayed", behind.address, bulk_mib)):
            results[kind] = await _measure(kind, address, int(bulk * 2**20), setups, calls)
        return results
    finally:
        for node in (behind, direct, relay):
            await node.aclose()


# ---- the swarm part: server processes ---------------------------------------------------------------------------


def _serve(role: str, options: dict) -> None:
    if "switch_interval_s" in options:
        sys.setswitchinterval(options["switch_interval_s"])

    async def run() -> None:
        if role == "public":
            node = Node(nat=NatOptions(mode="public"))
        else:
            from petalnode.node import ServeOptions

            node = Node(bootstrap=[options["bootstrap"]], nat=NatOptions(mode=options["mode"]),
                        serve=ServeOptions(blocks=tuple(options["blocks"]), join_jitter_s=0, rebalance_period_s=None))
        await node.start()
        print(json.dumps({"address": str(node.address)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await node.aclose()

    asyncio.run(run())


def _spawn(role: str, threads: int, **options: object) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, __file__, "--role", role, json.dumps(options)], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("{"):
        process.kill()
        raise RuntimeError(f"{role} failed to start")
    return process, json.loads(line)["address"]


class _Clock:
    """A streamer that timestamps every put(): the prompt first, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def swarm(runs: int, new_tokens: int, threads: int, switch_interval_s: float | None) -> dict:
    """Both swarms up at once and runs interleaved (tcp, webrtc, tcp, ...) so machine noise hits both alike."""
    import torch

    from petalnode.client import AutoDistributedModelForCausalLM
    from petalnode.compute import load_model_info

    torch.set_num_threads(threads)
    info = load_model_info(None)
    ids = torch.arange(100, 116).unsqueeze(0)
    processes: list[subprocess.Popen] = []
    models: dict = {}
    signaling = Signaling(Identity.generate(), NatOptions(stun=False))
    extra = {} if switch_interval_s is None else {"switch_interval_s": switch_interval_s}
    try:
        for kind in ("tcp", "webrtc"):
            public, bootstrap = _spawn("public", 1, **extra)
            processes.append(public)
            for start in (0, 10, 20):
                server, _ = _spawn("server", threads, bootstrap=bootstrap, blocks=[start, start + 10],
                                   mode="public" if kind == "tcp" else "nat", **extra)
                processes.append(server)
            options = {"transport": signaling.transport(), "identity": signaling.identity} if kind == "webrtc" else {}
            models[kind] = AutoDistributedModelForCausalLM.from_pretrained(None, bootstrap=[bootstrap], verify="off",
                                                                          **options)
            models[kind].generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up: connections
        runs_of: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "decode": []} for k in models}
        for _ in range(runs):
            for kind, model in models.items():
                clock = _Clock()
                started = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               streamer=clock, pad_token_id=0)
                tokens = clock.times[1:]
                runs_of[kind]["ttft"].append(tokens[0] - started)
                runs_of[kind]["decode"].append((len(tokens) - 1) / (tokens[-1] - tokens[0]))
        paths = {"tcp": ["tcp"] * 3, "webrtc": list(signaling.webrtc.connection_paths().values())}
    finally:
        for model in models.values():
            model.close()
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    results: dict = {kind: {"decode_tokens_per_s_median": round(statistics.median(r["decode"]), 2),
                            "ttft_16_s_median": round(statistics.median(r["ttft"]), 3),
                            "decode_runs": [round(d, 2) for d in r["decode"]], "paths": paths[kind]}
                     for kind, r in runs_of.items()}
    results["decode_ratio_webrtc_over_tcp"] = round(
        results["webrtc"]["decode_tokens_per_s_median"] / results["tcp"]["decode_tokens_per_s_median"], 3)
    results["model"] = info.source.name
    results["new_tokens"] = new_tokens
    results["switch_interval_s"] = switch_interval_s if switch_interval_s is not None else sys.getswitchinterval()
    return results


def natbed(runs: int, new_tokens: int) -> dict:
    """The default model on 3 servers behind NAT A (`petalnode join`), a client behind NAT B: decode over the direct
    (server-reflexive) path, then with NAT B symmetric over the relay. Needs root (see tests/natbed/_bed.py)."""
    sys.path.insert(0, str(REPO))
    from tests.natbed._bed import PUBLIC_IP, NatBed, check_available

    check_available()
    cli = [sys.executable, "-m", "petalnode.cli"]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, NatBed.create() as bed:
        ready = Path(tmp)
        bed.spawn("wan", [*cli, "bootstrap", "--listen", f"{PUBLIC_IP}:0", "--ready-file", str(ready / "b.json")],
                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bootstrap = json.loads(_wait_file(ready / "b.json").read_text())["address"]
        for start in (0, 10, 20):
            bed.spawn("ha", [*cli, "join", "--bootstrap", bootstrap, "--blocks", f"{start}:{start + 10}", "--threads",
                             "1", "--rebalance-period", "0", "--ready-file", str(ready / f"s{start}.json")],
                      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for start in (0, 10, 20):
            _wait_file(ready / f"s{start}.json")
        for case, symmetric in (("direct", False), ("symmetric_nat_relayed", True)):
            bed.set_nat("b", symmetric=symmetric)
            options = {"bootstrap": bootstrap, "model": None, "prompt": list(range(100, 116)),
                       "new_tokens": new_tokens, "timed_runs": runs}
            client = bed.spawn("hb", [sys.executable, "-m", "tests.natbed._peer", "client", json.dumps(options)],
                               cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            out, _ = client.communicate(timeout=600)
            line = json.loads(next(x for x in out.splitlines() if x.startswith("{")))
            timings = line["timings"]
            results[case] = {
                "decode_tokens_per_s_median": round(statistics.median(t["decode_tokens_per_s"] for t in timings), 2),
                "ttft_16_s_median": round(statistics.median(t["ttft_s"] for t in timings), 3),
                "paths": sorted(line["paths"].values()),
            }
    return results


def _wait_file(path: Path, timeout_s: float = 300.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} did not appear within {timeout_s} s")
        time.sleep(0.2)
    return path


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        _serve(sys.argv[2], json.loads(sys.argv[3]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--bulk-mib", type=float, default=16.0, help="per WebRTC run; TCP sends 4x as much")
    parser.add_argument("--setups", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--swarm", action="store_true", help="also decode through a 3-server default-model swarm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--natbed", action="store_true", help="also decode through the NAT test bed (root)")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                        help="sys.setswitchinterval for every process (default: Python's 0.005)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    started = time.perf_counter()
    report: dict = {"benchmark": "transports", "cores": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "loopback": asyncio.run(micro(args.bulk_mib, args.setups, args.calls))}
    if args.swarm:
        report["swarm_3_servers"] = swarm(args.runs, args.new_tokens, args.threads, args.switch_interval)
    if args.natbed:
        report["natbed_3_servers_behind_nat"] = natbed(args.runs, args.new_tokens)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

# The churn simulator: a swarm of real petalnode `Node` servers and `SwarmClient`s in one process, over the
# in-memory network, under a virtual clock.
#
# Invariants:
# - Everything that decides anything is the real code: DHT (kademlia, signed records), announcements, placement,
#   routing, bans, failover and replay. Only the compute is the stand-in of `_standin.py` (exact integers whose
#   output depends on every block, position and past token), so a wrong replay is a wrong token.
# - One stable bootstrap node (DHT only) never leaves. Every other server lives an exponential lifetime, then
#   crashes (`MemoryNetwork.kill`: no goodbye, connections drop) or leaves gracefully (`Node.aclose`: OFFLINE
#   announced); a replacement arrives after an exponential delay, so the population stays near its target.
# - Every generation is bounded in virtual time (`generation_bound_s`); running past it counts as "hung".
# - Ground truth for coverage and lookups is the simulator's bookkeeping (see `_metrics.py`).
#
# Run: python simulations/churn.py --servers 30 --clients 10 --hours 1 --mean-lifetime-min 15
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `simulations` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from petalnode import DEFAULT_TIMEOUTS, Timeouts
from petalnode.dht import ServerState
from petalnode.errors import PetalnodeError
from petalnode.identity import Identity, PeerId
from petalnode.node import Node, ServeOptions, SwarmClient
from petalnode.transport import ConnectionConfig, LinkConfig, MemoryNetwork
from simulations._metrics import (
    CoverageTracker,
    GenerationRecord,
    LookupStats,
    ServerStats,
    summarize_generations,
)
from simulations._standin import (
    VOCAB,
    StandInBackend,
    StandInModelInfo,
    next_token,
    prompt_hidden,
    reference_generation,
)
from simulations._virtual_loop import VirtualTimeLoop, run

log = logging.getLogger("simulations.churn")

MODEL = "standin-model"
PORT = 7000
BOOTSTRAP_HOST = "boot"
# Bounds on things that must end: a server's start (DHT join, lookups, jitter, loading) and shutdown steps.
SERVER_START_BOUND_S = 180.0
CLOSE_BOUND_S = 30.0
COVERAGE_TICK_S = 5.0


@dataclass
class Scenario:
    """Everything that defines a run. Times are virtual seconds."""

    servers: int = 30
    clients: int = 10
    num_blocks: int = 12
    blocks_per_server: tuple[int, int] = (3, 6)  # uniform in [lo, hi]; ignored when server_memory_gib is set
    server_memory_gib: tuple[float, float] | None = None  # uniform; placement sizes the span from memory
    stable_servers: int = 0  # of `servers`, how many never leave
    mean_lifetime_s: float = 900.0
    crash_share: float = 0.5
    mean_rejoin_delay_s: float = 30.0
    duration_s: float = 3600.0
    warmup_s: float = 120.0  # servers join over the first half of it; clients and measurements start after it
    latency_s: float = 0.02
    bandwidth_mbit_s: float | None = 100.0
    loss: float = 0.0
    partitions_per_hour: float = 0.0
    partition_s: float = 60.0
    prompt_tokens: int = 8
    new_tokens: int = 24
    mean_think_s: float = 20.0
    record_ttl_s: float = 60.0
    step_timeout_s: float = 10.0
    wait_for_blocks_s: float = 60.0
    load_s_per_block: float = 2.0
    join_jitter_s: float = 2.0
    generation_bound_s: float = 900.0
    dht_probe_period_s: float = 60.0
    dht_rpc_timeout_s: float | None = None  # None: the DHT's default
    progress_every_s: float = 0.0  # > 0: print a progress line to stderr this often (virtual seconds)
    # Real seconds after which the measured phase ends early (metrics then cover the virtual time reached); None:
    # run the whole duration. For big runs whose cost is not known in advance.
    real_time_limit_s: float | None = None
    dht_ksize: int | None = None  # Kademlia k (replication and bucket size); None: the DHT's default (20)
    rebalance_period_s: float | None = 120.0  # None: servers never move
    # A dialler closes a connection with no open stream after this long (ConnectionConfig.idle_timeout_s); None
    # keeps them (a client then ends up with a connection, and keepalive traffic, to every server it ever probed).
    connection_idle_s: float | None = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.servers < 1 or self.clients < 0 or self.num_blocks < 1:
            raise ValueError("need at least one server and one block")
        lo, hi = self.blocks_per_server
        if not 1 <= lo <= hi <= self.num_blocks:
            raise ValueError(f"blocks_per_server {lo}:{hi} must lie in 1:{self.num_blocks}")
        if not 0 <= self.crash_share <= 1 or not 0 <= self.stable_servers <= self.servers:
            raise ValueError("crash_share must be in [0, 1] and stable_servers in [0, servers]")


@dataclass(eq=False)
class _Server:
    index: int
    host: str
    node: Node
    backend: StandInBackend
    lifetime_s: float
    stable: bool
    online_at: float | None = None
    left_at: float | None = None
    partitioned: bool = False

    @property
    def covering(self) -> bool:
        return self.online_at is not None and self.left_at is None and not self.partitioned

    @property
    def span(self) -> tuple[int, int] | None:
        hosted = self.node.hosted
        return None if hosted is None else (hosted.start, hosted.end)


class ChurnSimulation:
    """One run of a `Scenario`; `await run()` returns the metrics. Must run in a `VirtualTimeLoop`."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed)
        self.info = StandInModelInfo(MODEL, scenario.num_blocks)
        self.network = MemoryNetwork(
            LinkConfig(
                latency_s=scenario.latency_s, loss=scenario.loss,
                bandwidth_bytes_per_s=scenario.bandwidth_mbit_s * 1e6 / 8 if scenario.bandwidth_mbit_s else None,
            ),
            seed=scenario.seed,
        )
        self.servers: dict[str, _Server] = {}
        self.generations: list[GenerationRecord] = []
        self.coverage = CoverageTracker(scenario.num_blocks)
        self.lookups = LookupStats()
        self.server_stats = ServerStats()
        self.loop_errors: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server_tasks: set[asyncio.Task[Any]] = set()
        self._next_server = 0
        self._clients: list[SwarmClient] = []
        self._bootstrap: Node | None = None
        self._stopping = False
        self._stop = asyncio.Event()
        self.stopped_early = False
        self.loop: VirtualTimeLoop

    # -- driving ----------------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if not isinstance(loop, VirtualTimeLoop):
            raise RuntimeError("ChurnSimulation must run in a VirtualTimeLoop (simulations._virtual_loop.run)")
        self.loop = loop
        loop.set_exception_handler(self._on_loop_error)
        counter = _WarningCounter(self.warnings)
        logging.getLogger("petalnode").addHandler(counter)
        real_start = time.perf_counter()
        s = self.scenario
        try:
            await self._start_bootstrap()
            if s.progress_every_s > 0:
                self._spawn(self._progress(real_start))
            for i in range(s.servers):
                self._spawn_server(delay_s=self.rng.uniform(0, s.warmup_s / 2), stable=i < s.stable_servers)
            await asyncio.sleep(s.warmup_s)
            self._update_coverage()
            self.coverage.begin(loop.time())
            self.end_time = loop.time() + s.duration_s
            self._spawn(self._coverage_ticks())
            if s.partitions_per_hour > 0:
                self._spawn(self._partitions())
            clients = [self._spawn(self._run_client(i)) for i in range(s.clients)]
            if s.clients and s.dht_probe_period_s > 0:
                self._spawn(self._probe_lookups())
            await self._run_measured_phase(real_start)
            self._stopping = True
            self._stop.set()
            # In-flight generations finish (each is bounded); clients start no new ones.
            await asyncio.gather(*clients, return_exceptions=True)
            ended = loop.time()
            self._update_coverage()
            result = self._summary(ended, real_start)
            await self._shutdown()
        finally:
            logging.getLogger("petalnode").removeHandler(counter)
        result["real_seconds"] = round(time.perf_counter() - real_start, 2)
        result["virtual_seconds_per_real_second"] = round(
            (s.warmup_s + result["virtual_seconds"]) / max(1e-9, result["real_seconds"]), 2)
        return result

    async def _run_measured_phase(self, real_start: float) -> None:
        s = self.scenario
        end = self.loop.time() + s.duration_s
        if s.real_time_limit_s is None:
            await asyncio.sleep(s.duration_s)
            return
        while self.loop.time() < end:
            await asyncio.sleep(min(10.0, end - self.loop.time()))
            if time.perf_counter() - real_start > s.real_time_limit_s:
                self.stopped_early = True
                log.warning("real-time limit of %.0f s reached at virtual %.0f s: ending the run early",
                            s.real_time_limit_s, self.loop.time())
                return

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        key = f"{context.get('message')}: {type(error).__name__}: {error}"[:200]
        self.loop_errors[key] += 1

    def _timeouts(self) -> Timeouts:
        """The scenario's timeouts as the one object every node and client of the run gets."""
        s = self.scenario
        timeouts = DEFAULT_TIMEOUTS.replace(step=s.step_timeout_s, wait_for_blocks=s.wait_for_blocks_s)
        if s.dht_rpc_timeout_s is not None:
            timeouts = timeouts.replace(dht_rpc=s.dht_rpc_timeout_s)
        return timeouts

    def _node_kwargs(self, identity: Identity, host: str) -> dict[str, Any]:
        dht_options: dict[str, Any] = {}
        if self.scenario.dht_ksize is not None:
            dht_options["ksize"] = self.scenario.dht_ksize
        config = ConnectionConfig(idle_timeout_s=self.scenario.connection_idle_s)
        return {
            "transport": self.network.transport(identity, host, config=config),
            "endpoint_factory": self.network.create_datagram_endpoint,
            "wall_clock": self.loop.wall_clock,
            "dht_options": dht_options,
            "timeouts": self._timeouts(),
        }

    async def _start_bootstrap(self) -> None:
        identity = Identity.from_seed(f"{self.scenario.seed}-bootstrap".encode())
        node = Node(identity, listen_host=BOOTSTRAP_HOST, listen_port=PORT, serve=None,
                    record_ttl_s=self.scenario.record_ttl_s, **self._node_kwargs(identity, BOOTSTRAP_HOST))
        await node.start()
        self._bootstrap = node

    # -- servers -----------------------------------------------------------------------------------------------
    def _spawn_server(self, *, delay_s: float, stable: bool = False) -> None:
        if self._stopping:
            return
        index = self._next_server
        self._next_server += 1
        task = self._spawn(self._run_server(index, delay_s, stable))
        self._server_tasks.add(task)
        task.add_done_callback(self._server_tasks.discard)

    def _serve_options(self, rng: random.Random) -> ServeOptions:
        s = self.scenario
        if s.server_memory_gib is not None:
            gib = rng.uniform(*s.server_memory_gib)
            return ServeOptions(model=MODEL, vram_bytes=int(gib * 1024**3), join_jitter_s=s.join_jitter_s,
                                rebalance_period_s=s.rebalance_period_s, seed=rng.randrange(2**32))
        return ServeOptions(model=MODEL, num_blocks=rng.randint(*s.blocks_per_server), join_jitter_s=s.join_jitter_s,
                            rebalance_period_s=s.rebalance_period_s, seed=rng.randrange(2**32))

    async def _run_server(self, index: int, delay_s: float, stable: bool) -> None:
        s = self.scenario
        loop = self.loop
        await asyncio.sleep(delay_s)
        if self._stopping:
            return
        rng = random.Random(f"{s.seed}-server-{index}")
        host = f"s{index}"
        identity = Identity.from_seed(f"{s.seed}-server-{index}".encode())
        backend = StandInBackend(self.info, throughput=rng.lognormvariate(math.log(100.0), 0.5),
                                 load_s_per_block=s.load_s_per_block)
        assert self._bootstrap is not None
        node = Node(identity, listen_host=host, listen_port=PORT, bootstrap=[self._bootstrap.address],
                    serve=self._serve_options(rng), record_ttl_s=s.record_ttl_s, compute=backend,
                    **self._node_kwargs(identity, host))
        server = _Server(index, host, node, backend, rng.expovariate(1 / s.mean_lifetime_s), stable)
        self.servers[host] = server
        self.server_stats.started += 1
        try:
            try:
                async with asyncio.timeout(SERVER_START_BOUND_S):
                    await node.start()
            except (PetalnodeError, TimeoutError, OSError) as e:
                self.server_stats.start_failures += 1
                self.server_stats.start_errors[f"{type(e).__name__}: {str(e)[:80]}"] += 1
                server.left_at = loop.time()
                return
            server.online_at = loop.time()
            span = server.span
            if span is not None:
                self.server_stats.blocks_hosted.append(span[1] - span[0])
            self._update_coverage()
            if stable:
                await asyncio.Event().wait()  # until the simulation cancels it
            await asyncio.sleep(server.lifetime_s)
            await self._leave(server, crash=self.rng.random() < s.crash_share)
        finally:
            if server.left_at is None:
                server.left_at = loop.time()
            self._account(server)
            if not self._stopping:
                self._spawn_server(delay_s=self.rng.expovariate(1 / s.mean_rejoin_delay_s))

    async def _leave(self, server: _Server, *, crash: bool) -> None:
        server.left_at = self.loop.time()
        self._update_coverage()
        if crash:
            self.server_stats.crashes += 1
            self.network.kill(server.host)  # connections drop now; nothing is announced
        else:
            self.server_stats.graceful_leaves += 1
        await self._close_node(server.node)

    async def _close_node(self, node: Node) -> None:
        try:
            async with asyncio.timeout(CLOSE_BOUND_S):
                await node.aclose()
        except TimeoutError:
            self.loop_errors[f"Node.aclose() took longer than {CLOSE_BOUND_S} s"] += 1

    def _account(self, server: _Server) -> None:
        if server.online_at is not None and server.left_at is not None:
            self.server_stats.server_seconds += server.left_at - server.online_at
        if server.backend.loads:
            self.server_stats.servers_that_loaded += 1
            self.server_stats.block_loads += len(server.backend.loads)

    async def _progress(self, real_start: float) -> None:
        while True:
            await asyncio.sleep(self.scenario.progress_every_s)
            online = sum(1 for srv in self.servers.values() if srv.covering)
            done = sum(1 for g in self.generations if g.outcome != "running")
            print(f"[churn] virtual {self.loop.time():.0f} s, real {time.perf_counter() - real_start:.0f} s: "
                  f"{online} servers online, {done} generations done, {len(self.loop_errors)} loop errors",
                  file=sys.stderr, flush=True)

    async def _partitions(self) -> None:
        s = self.scenario
        while True:
            await asyncio.sleep(self.rng.expovariate(s.partitions_per_hour / 3600))
            candidates = [srv for srv in self.servers.values() if srv.covering]
            if not candidates:
                continue
            server = self.rng.choice(candidates)
            self.server_stats.partitions += 1
            server.partitioned = True
            self.network.partition(server.host)
            self._update_coverage()
            self._spawn(self._heal_later(server, s.partition_s))

    async def _heal_later(self, server: _Server, after_s: float) -> None:
        await asyncio.sleep(after_s)
        self.network.heal(server.host)
        server.partitioned = False
        self._update_coverage()

    # -- ground truth --------------------------------------------------------------------------------------------
    def _true_holders(self) -> dict[PeerId, tuple[int, int]]:
        """Servers that are alive, online and reachable now, with the blocks they host."""
        holders = {}
        for server in self.servers.values():
            span = server.span
            if server.covering and span is not None:
                holders[server.node.identity.peer_id] = span
        return holders

    def _update_coverage(self) -> None:
        counts = [0] * self.scenario.num_blocks
        for start, end in self._true_holders().values():
            for block in range(start, end):
                counts[block] += 1
        self.coverage.update(self.loop.time(), counts)

    async def _coverage_ticks(self) -> None:
        while True:
            await asyncio.sleep(COVERAGE_TICK_S)
            self._update_coverage()

    async def _probe_lookups(self) -> None:
        """Periodically look the swarm up through a client's real DHT and check it against ground truth."""
        s = self.scenario
        turn = 0
        while not self._stopping:
            await asyncio.sleep(s.dht_probe_period_s)
            if not self._clients:
                continue
            client = self._clients[turn % len(self._clients)]
            turn += 1
            before = self._true_holders()
            self.lookups.lookups += 1
            try:
                async with asyncio.timeout(120):
                    view = await client.swarm()
            except (PetalnodeError, TimeoutError) as e:
                self.lookups.failed_lookups += 1
                log.debug("probe lookup failed: %s", e)
                continue
            after = self._true_holders()
            alive_throughout = {p: span for p, span in before.items() if after.get(p) == span}
            online = {p: v for p, v in view.servers.items() if v.state is ServerState.ONLINE}
            self.lookups.online_found += len(online)
            self.lookups.stale_online_found += sum(1 for p in online if p not in before and p not in after)
            for block in range(s.num_blocks):
                truth = {p for p, (a, b) in alive_throughout.items() if a <= block < b}
                if not truth:
                    continue
                found = {p for p, v in online.items() if v.start <= block < v.end} & truth
                self.lookups.block_checks += 1
                self.lookups.block_successes += bool(found)
                self.lookups.true_servers += len(truth)
                self.lookups.found_true_servers += len(found)

    # -- clients -------------------------------------------------------------------------------------------------
    async def _run_client(self, index: int) -> None:
        s = self.scenario
        host = f"c{index}"
        identity = Identity.from_seed(f"{s.seed}-client-{index}".encode())
        assert self._bootstrap is not None
        kwargs = self._node_kwargs(identity, host)
        client = SwarmClient(
            MODEL, s.num_blocks, [self._bootstrap.address], identity=identity, seed=s.seed * 1000 + index,
            listen_host=host, **kwargs,
        )
        async with asyncio.timeout(SERVER_START_BOUND_S):
            await client.start()
        self._clients.append(client)
        rng = random.Random(f"{s.seed}-client-{index}")
        try:
            for generation in range(10**9):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(rng.expovariate(1 / s.mean_think_s)):
                        await self._stop.wait()
                if self._stopping:
                    return
                await self._generate(client, index, generation, rng)
        finally:
            self._clients.remove(client)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_BOUND_S):
                    await client.aclose()

    async def _generate(self, client: SwarmClient, index: int, generation: int, rng: random.Random) -> None:
        """One greedy generation through the swarm, checked token by token against the local reference."""
        s = self.scenario
        loop = self.loop
        prompt = [rng.randrange(VOCAB) for _ in range(s.prompt_tokens)]
        reference = reference_generation(s.num_blocks, self.info.hidden_size, prompt, s.new_tokens)
        record = GenerationRecord(client=index, index=generation, started=loop.time())
        self.generations.append(record)
        session = None
        tokens: list[int] = []
        scope = asyncio.timeout(s.generation_bound_s)
        try:
            async with scope:
                session = await client.open_session(s.prompt_tokens + s.new_tokens)
                out = await session.step(prompt_hidden(prompt, self.info.hidden_size), 0)
                tokens.append(next_token(out[:, -1]))
                for step in range(s.new_tokens - 1):
                    hidden = prompt_hidden(tokens[-1:], self.info.hidden_size)
                    out = await session.step(hidden, s.prompt_tokens + step)
                    tokens.append(next_token(out[:, -1]))
            record.outcome = "completed"
            record.identical = tokens == reference
        except TimeoutError as e:
            record.outcome = "hung" if scope.expired() else "failed"
            record.error = f"{type(e).__name__}: {e}" if not scope.expired() else "hung: past generation_bound_s"
        except PetalnodeError as e:
            record.outcome = "failed"
            record.error = f"{type(e).__name__}: {str(e)[:160]}"
        except Exception as e:  # a bug in the client: keep simulating, report it
            record.outcome = "crashed"
            record.error = f"{type(e).__name__}: {str(e)[:160]}"
            log.exception("generation crashed")
        finally:
            if session is not None:
                record.reroutes = session.reroutes
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_BOUND_S):
                        await session.aclose()
            record.ended = loop.time()
            record.coverage_ok = not self.coverage.overlaps_gap(record.started, record.ended)

    # -- end -----------------------------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        nodes = [srv.node for srv in self.servers.values()]
        for server in self.servers.values():
            self.network.kill(server.host)
        await asyncio.gather(*(self._close_node(n) for n in nodes), return_exceptions=True)
        if self._bootstrap is not None:
            await self._close_node(self._bootstrap)

    def _summary(self, ended: float, real_start: float) -> dict[str, Any]:
        for server in self.servers.values():
            if server.left_at is None:  # still running: count its time and loads so far
                server.left_at = ended
                self._account(server)
                server.left_at = None
        generations = summarize_generations(self.generations)
        return {
            "scenario": dataclasses.asdict(self.scenario),
            **generations,
            "coverage": self.coverage.summary(ended),
            "dht_lookups": self.lookups.summary(),
            "servers": self.server_stats.summary(),
            "event_loop_errors": dict(self.loop_errors.most_common(10)),
            "node_warnings": dict(self.warnings.most_common(12)),
            "virtual_seconds": round(ended - (self.coverage.start or 0.0), 1),
            "stopped_early_by_real_time_limit": self.stopped_early,
        }


class _WarningCounter(logging.Handler):
    """Counts node warnings by message template (not formatted), so a storm of one kind shows as one number."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.name}: {str(record.msg)[:90]}"] += 1


# A simulated swarm is millions of long-lived objects plus a stream of short-lived timers and messages; with the
# default thresholds the collector keeps re-scanning the long-lived ones (15% of a 300-server run's time).
SIMULATION_GC_THRESHOLDS = (100_000, 50, 100)


def run_scenario(scenario: Scenario) -> dict[str, Any]:
    """Run one scenario in a fresh virtual-time loop and return its metrics."""
    previous = gc.get_threshold()
    gc.set_threshold(*SIMULATION_GC_THRESHOLDS)
    try:
        return run(ChurnSimulation(scenario).run(), epoch_s=1.7e9)
    finally:
        gc.set_threshold(*previous)


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi or lo)


def parse_args(argv: list[str] | None = None) -> tuple[Scenario, argparse.Namespace]:
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__ or "churn simulator", prog="simulations/churn.py")
    p.add_argument("--servers", type=int, default=d.servers)
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--blocks", type=int, default=d.num_blocks, help="model size in blocks")
    p.add_argument("--blocks-per-server", type=_span, default=d.blocks_per_server, help="LO:HI (uniform)")
    p.add_argument("--memory-gib", type=_range, default=None,
                   help="LO:HI server memory (uniform); each block is 0.25 GiB, overrides --blocks-per-server")
    p.add_argument("--stable-servers", type=int, default=d.stable_servers)
    p.add_argument("--hours", type=float, default=d.duration_s / 3600)
    p.add_argument("--mean-lifetime-min", type=float, default=d.mean_lifetime_s / 60)
    p.add_argument("--crash-share", type=float, default=d.crash_share)
    p.add_argument("--rejoin-delay-s", type=float, default=d.mean_rejoin_delay_s)
    p.add_argument("--warmup-s", type=float, default=d.warmup_s)
    p.add_argument("--latency-ms", type=float, default=d.latency_s * 1000)
    p.add_argument("--bandwidth-mbit", type=float, default=d.bandwidth_mbit_s, help="0 = unlimited")
    p.add_argument("--loss", type=float, default=d.loss, help="datagram (DHT) loss probability")
    p.add_argument("--partitions-per-hour", type=float, default=d.partitions_per_hour)
    p.add_argument("--partition-s", type=float, default=d.partition_s)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--think-s", type=float, default=d.mean_think_s)
    p.add_argument("--record-ttl-s", type=float, default=d.record_ttl_s)
    p.add_argument("--step-timeout-s", type=float, default=d.step_timeout_s)
    p.add_argument("--wait-for-blocks-s", type=float, default=d.wait_for_blocks_s)
    p.add_argument("--load-s-per-block", type=float, default=d.load_s_per_block)
    p.add_argument("--dht-probe-period-s", type=float, default=d.dht_probe_period_s)
    p.add_argument("--dht-ksize", type=int, default=None, help="Kademlia k (default: the DHT's, 20)")
    p.add_argument("--rebalance-period-s", type=float, default=d.rebalance_period_s, help="0 = servers never move")
    p.add_argument("--connection-idle-s", type=float, default=d.connection_idle_s,
                   help="close connections without streams after this long (0 = never)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--progress-every-s", type=float, default=0.0, help="virtual seconds between progress lines")
    p.add_argument("--real-time-limit-s", type=float, default=None,
                   help="end the measured phase early after this many real seconds (metrics cover what ran)")
    p.add_argument("--log-level", default="error", help="log level of the node code (warnings are counted anyway)")
    a = p.parse_args(argv)
    scenario = Scenario(
        servers=a.servers, clients=a.clients, num_blocks=a.blocks, blocks_per_server=a.blocks_per_server,
        server_memory_gib=a.memory_gib, stable_servers=a.stable_servers, duration_s=a.hours * 3600,
        mean_lifetime_s=a.mean_lifetime_min * 60, crash_share=a.crash_share, mean_rejoin_delay_s=a.rejoin_delay_s,
        warmup_s=a.warmup_s, latency_s=a.latency_ms / 1000, bandwidth_mbit_s=a.bandwidth_mbit or None, loss=a.loss,
        partitions_per_hour=a.partitions_per_hour, partition_s=a.partition_s, prompt_tokens=a.prompt_tokens,
        new_tokens=a.new_tokens, mean_think_s=a.think_s, record_ttl_s=a.record_ttl_s,
        step_timeout_s=a.step_timeout_s, wait_for_blocks_s=a.wait_for_blocks_s,
        load_s_per_block=a.load_s_per_block, dht_probe_period_s=a.dht_probe_period_s, dht_ksize=a.dht_ksize,
        rebalance_period_s=a.rebalance_period_s or None, connection_idle_s=a.connection_idle_s or None,
        progress_every_s=a.progress_every_s, real_time_limit_s=a.real_time_limit_s, seed=a.seed,
    )
    return scenario, a


def main(argv: list[str] | None = None) -> int:
    scenario, args = parse_args(argv)
    # Node warnings must reach the simulator's counter even when they are not printed.
    handler = logging.StreamHandler()
    handler.setLevel(args.log_level.upper())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(handler.level, logging.WARNING))
    result = run_scenario(scenario)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

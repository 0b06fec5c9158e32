# DHTNode: the thin async facade over a hardened `kademlia.network.Server`.
#
# Invariants:
# - The node id is the identity's peer id; every record it writes is signed by that identity under its own
#   subkey, with seq strictly increasing for the life of the process (and across restarts, since it starts at
#   the wall clock in milliseconds).
# - The node owns every task it starts (maintenance, bucket refresh, record refreshers, the protocol's pings and
#   handoffs) and `aclose()` cancels and awaits all of them. kademlia's own hourly `refresh_table` loop (which
#   re-publishes other peers' records forever) is never started.
# - Record expiry uses the injected `wall_clock` (absolute time crosses machines); everything else uses the
#   event loop's clock, so a virtual-time loop drives the whole node.
# - Lookups and stores both run over `disjoint_paths` disjoint paths (`_crawling`), seeded with that many times k
#   contacts, and a store writes to every node the paths end at (up to paths * k), so a reader's paths meet the
#   writer's even when the k nodes nearest the key are colluders that drop records (issue 13; what this does not
#   cover is listed in `DHTNode`'s docstring).
from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from petalnode._lifecycle import TaskOwner, set_state
from petalnode._timeouts import DEFAULT_TIMEOUTS, Timeouts, timeout_scope
from petalnode.dht._crawling import FastNodeSpiderCrawl, RecordSpiderCrawl
from petalnode.dht._protocol import HardenedProtocol
from petalnode.dht._record import MAX_CLOCK_SKEW_S, MAX_RECORD_TTL_S, MAX_VALUE_BYTES, Record, dht_key
from petalnode.dht._storage import RecordStorage
from petalnode.errors import ClosedResourceError, ConfigError, DHTError, DHTTimeoutError, InvalidStateError
from petalnode.identity import Identity, PeerId
from petalnode.swarm_key import SwarmKey

log = logging.getLogger(__name__)

# Petals expires announcements after about 2x their update period; we refresh every ttl/2.
RECORD_TTL_S = 300.0
# A lookup is ~log2(N)/alpha rounds of one RPC each, plus RPC timeouts for dead contacts; 20 s bounds it.
# (The defaults of Timeouts.dht_lookup / dht_bootstrap; a DHTNode takes its values from a `Timeouts`.)
LOOKUP_TIMEOUT_S = DEFAULT_TIMEOUTS.dht_lookup
BOOTSTRAP_TIMEOUT_S = DEFAULT_TIMEOUTS.dht_bootstrap
CULL_INTERVAL_S = 60.0
# Kademlia paper section 2.3 refreshes idle buckets hourly; we check every 10 minutes (cheap when none are idle).
BUCKET_REFRESH_INTERVAL_S = 600.0
# Concurrent lookups in store_many / get_many: each is ~alpha datagrams in flight.
MAX_CONCURRENT_LOOKUPS = 8
KSIZE = 20
ALPHA = 3
# S/Kademlia's d. Two paths double the nodes a lookup asks and a store writes to (measured in
# benchmarks/dht_lookup.py --compare-paths); an attacker then needs 2k colluders nearest a key, not k, to hide it.
DISJOINT_PATHS = 2

EndpointFactory = Callable[..., Awaitable[tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]]]
Address = tuple[str, int]


class NodeState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class _KademliaServer(Server):
    """`kademlia.network.Server` with our protocol, an injectable datagram endpoint and no self-run loops."""

    protocol_class = HardenedProtocol

    def __init__(self, *, node_id: bytes, storage: RecordStorage, ksize: int, alpha: int,
                 protocol_kwargs: dict[str, Any]) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        # Server does `storage or ForgetfulStorage()`, and an empty RecordStorage is falsy (it has __len__).
        self.storage = storage
        self._protocol_kwargs = protocol_kwargs

    def _create_protocol(self) -> HardenedProtocol:
        return self.protocol_class(
            self.node, self.storage, self.ksize, clock=asyncio.get_running_loop().time, **self._protocol_kwargs
        )

    async def listen_on(self, endpoint_factory: EndpointFactory, local_addr: Address) -> None:
        self.transport, self.protocol = await endpoint_factory(self._create_protocol, local_addr=local_addr)

    def refresh_table(self, interval: float = 3600) -> None:
        """Never self-scheduled: DHTNode runs bucket refresh in a task it owns."""

    async def bootstrap_node(self, addr: Address) -> Node | None:
        node_id = await self.protocol.ping_address(addr)
        return Node(node_id, addr[0], addr[1]) if node_id is not None else None


class RefreshHandle:
    """A running periodic re-announcement; `cancel()` stops it (the records then expire on their own)."""

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    def cancel(self) -> None:
        # The owner (DHTNode._tasks) forgets the task once it is done; aclose awaits it if still cancelling.
        self._task.cancel()

    @property
    def done(self) -> bool:
        return self._task.done()


class DHTNode:
    """One Kademlia node with signed per-writer records.

    Use as `node = DHTNode(identity); await node.start(listen=..., bootstrap=[...])` then `await node.aclose()`,
    or `async with DHTNode(identity) as node:` (starts with defaults: loopback, port 0, no bootstrap).

    Against colluding nodes placed next to a key (ids are free to generate), lookups and stores use
    `disjoint_paths` disjoint paths, never stop at the first (possibly empty or stale) answer, and keep the newest
    signed record per writer; one address counts as one node id per lookup. Not defended: colluders that
    outnumber paths * k among the nodes nearest a key, or sit on every path; a victim whose routing table is all
    colluders (eclipse at bootstrap); replays of a writer's older record while it is unexpired, where no holder of
    the newer one is reached; node ids claimed in datagrams are not proven (an attacker need not even grind them,
    only open one socket per id), and making ids costly (S/Kademlia's crypto puzzles) is not done.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        endpoint_factory: EndpointFactory | None = None,
        client_mode: bool = False,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        rpc_timeout_s: float | None = None,
        record_ttl_s: float = RECORD_TTL_S,
        lookup_timeout_s: float | None = None,
        wall_clock: Callable[[], float] = time.time,
        ksize: int = KSIZE,
        alpha: int = ALPHA,
        max_record_ttl_s: float = MAX_RECORD_TTL_S,
        max_clock_skew_s: float = MAX_CLOCK_SKEW_S,
        swarm_key: SwarmKey | None = None,
        disjoint_paths: int = DISJOINT_PATHS,
    ) -> None:
        # swarm_key: a private swarm's key; every datagram is sealed under it (see _sealing.py).
        if type(disjoint_paths) is not int or disjoint_paths < 1:
            raise ConfigError(f"disjoint_paths must be an int >= 1, got {disjoint_paths!r}")
        if not 0 < record_ttl_s <= max_record_ttl_s:
            raise ConfigError(f"record_ttl_s must be in (0, {max_record_ttl_s}], got {record_ttl_s}")
        # rpc_timeout_s / lookup_timeout_s override `timeouts.dht_rpc` / `dht_lookup` (kept for callers).
        rpc_timeout_s = timeouts.dht_rpc if rpc_timeout_s is None else rpc_timeout_s
        if rpc_timeout_s is None:
            raise ConfigError("a DHT datagram RPC needs a timeout (a lost datagram never answers): dht_rpc=None")
        if rpc_timeout_s <= 0:
            raise ConfigError(f"rpc_timeout_s must be positive, got {rpc_timeout_s}")
        self.identity = identity
        self.client_mode = client_mode
        self.disjoint_paths = disjoint_paths
        self.record_ttl_s = record_ttl_s
        self.lookup_timeout_s = timeouts.dht_lookup if lookup_timeout_s is None else lookup_timeout_s
        self.bootstrap_timeout_s = timeouts.dht_bootstrap
        self._endpoint_factory = endpoint_factory
        self._wall_clock = wall_clock
        self._max_ttl_s = max_record_ttl_s
        self._skew_s = max_clock_skew_s
        self.storage = RecordStorage(wall_clock, max_ttl_s=max_record_ttl_s, skew_s=max_clock_skew_s)
        self._server = _KademliaServer(
            node_id=identity.peer_id.raw, storage=self.storage, ksize=ksize, alpha=alpha,
            protocol_kwargs={"rpc_timeout_s": rpc_timeout_s, "client_mode": client_mode, "swarm_key": swarm_key},
        )
        self._state = NodeState.NEW
        self._seq = 0
        self._tasks = TaskOwner("dht")
        self._port: int | None = None
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def state(self) -> NodeState:
        return self._state

    def _set_state(self, new: NodeState) -> None:
        self._state = set_state(log, f"DHT node {self.identity.peer_id}", self._state, new)

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    @property
    def port(self) -> int:
        if self._port is None:
            raise InvalidStateError(f'DHT node has no port in state "{self._state.value}"')
        return self._port

    @property
    def protocol(self) -> HardenedProtocol:
        """The RPC protocol (for diagnostics and tests: routing table, drop counters)."""
        if self._server.protocol is None:
            raise InvalidStateError(f'DHT node has no protocol in state "{self._state.value}"')
        return self._server.protocol

    async def start(self, listen: Address = ("127.0.0.1", 0), bootstrap: Sequence[Address] = ()) -> None:
        """Open the datagram endpoint, join through `bootstrap` and start background upkeep.

        Raises:
            InvalidStateError: already started. ClosedResourceError: already closed.
            DHTError: bootstrap addresses were given but none answered.
        """
        if self._state is NodeState.CLOSED:
            raise ClosedResourceError("DHT node is closed")
        if self._state is not NodeState.NEW:
            raise InvalidStateError(f'cannot start a DHT node in state "{self._state.value}"')
        self._set_state(NodeState.RUNNING)
        try:
            factory = self._endpoint_factory or asyncio.get_running_loop().create_datagram_endpoint
            await self._server.listen_on(factory, listen)
            sockname = self._server.transport.get_extra_info("sockname")
            self._port = int(sockname[1]) if sockname else int(listen[1])
            self._spawn(self._maintain(), name="maintain")
            if bootstrap:
                await self.bootstrap(bootstrap)
        except BaseException:
            await self.aclose()
            raise

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Join (or re-join) the network through `addresses`; returns how many nodes we now know."""
        self._check_running()
        addrs = [await self._resolve(h, p) for h, p in addresses]
        # A slow bootstrap is not fatal: whoever answered in time is enough (the error below if nobody did).
        try:
            async with timeout_scope(self.bootstrap_timeout_s, DHTTimeoutError, "DHT bootstrap timed out"):
                await self._server.bootstrap(addrs)
        except DHTTimeoutError:
            log.warning("DHT bootstrap through %s timed out after %s s", addrs, self.bootstrap_timeout_s)
        known = len(self.protocol.router.contacts())
        if addrs and known == 0:
            raise DHTError(f"no DHT bootstrap node answered: {addrs}")
        return known

    async def _resolve(self, host: str, port: int) -> Address:
        if self._endpoint_factory is not None:
            return (str(host), int(port))
        try:
            ipaddress.ip_address(host)
            return (str(host), int(port))
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise ConfigError(f"cannot resolve DHT bootstrap host {host!r}") from None
            return (str(infos[0][4][0]), int(port))

    async def aclose(self) -> None:
        """Stop serving and cancel every owned task. Idempotent; releases the socket even when cancelled."""
        if self._state is NodeState.CLOSED:
            return
        self._set_state(NodeState.CLOSED)
        try:
            await self._tasks.aclose()
        finally:
            try:
                if self._server.protocol is not None:
                    await self._server.protocol.aclose()
            finally:
                self._server.stop()

    async def __aenter__(self) -> DHTNode:
        if self._state is NodeState.NEW:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_running(self) -> None:
        if self._state is NodeState.CLOSED:
            raise ClosedResourceError("DHT node is closed")
        if self._state is not NodeState.RUNNING:
            raise InvalidStateError(f'DHT node must be started, state is "{self._state.value}"')

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> asyncio.Task[None]:
        return self._tasks.spawn(coro, name=name)

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_bucket_refresh = loop.time() + BUCKET_REFRESH_INTERVAL_S
        while True:
            await asyncio.sleep(CULL_INTERVAL_S)
            self.storage.cull()
            if loop.time() >= next_bucket_refresh:
                next_bucket_refresh = loop.time() + BUCKET_REFRESH_INTERVAL_S
                refresh_s = None if self.lookup_timeout_s is None else self.lookup_timeout_s * 3
                try:
                    async with timeout_scope(refresh_s, DHTTimeoutError, "DHT bucket refresh timed out"):
                        await self._server._refresh_table()
                except DHTError as e:
                    log.warning("DHT bucket refresh failed: %s", e)

    # -- records --------------------------------------------------------------------------------------------------
    def _verify(self, record: Record) -> None:
        record.verify(self._wall_clock(), max_ttl_s=self._max_ttl_s, skew_s=self._skew_s)

    def _sign(self, key: str, value: bytes, ttl_s: float | None) -> Record:
        ttl = self.record_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= self._max_ttl_s:
            raise ConfigError(f"ttl_s must be in (0, {self._max_ttl_s}], got {ttl}")
        if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
            raise ConfigError(f"a DHT value is bytes of at most {MAX_VALUE_BYTES}")
        now = self._wall_clock()
        self._seq = max(self._seq + 1, int(now * 1000))
        return Record.create(self.identity, key=dht_key(key), value=value, expires_at=now + ttl, seq=self._seq)

    async def store(self, key: str, value: bytes, ttl_s: float | None = None) -> int:
        """Sign `value` as our subkey under `key` and store it on the k nodes closest to the key.

        Returns:
            How many nodes accepted it (ourselves included when we are among the closest).
        Raises:
            ConfigError: value too large or ttl out of range. ClosedResourceError / InvalidStateError.
        """
        self._check_running()
        return await self._store_record(self._sign(key, value, ttl_s))

    async def store_many(self, keys: Iterable[str], value: bytes, ttl_s: float | None = None) -> dict[str, int]:
        """Store the same value under many keys (a server announcing its block range) concurrently."""
        self._check_running()
        records = {key: self._sign(key, value, ttl_s) for key in keys}
        counts = await asyncio.gather(*(self._store_record(r) for r in records.values()))
        return dict(zip(records, counts, strict=True))

    async def _store_record(self, record: Record) -> int:
        async with self._limit:
            keynode = Node(record.key)
            accepted = 0
            nearest = self._seeds(keynode)
            nodes: list[Node] = []
            if nearest:
                crawl = FastNodeSpiderCrawl(
                    self.protocol, keynode, nearest, self._server.ksize, self._server.alpha, paths=self.disjoint_paths
                )
                try:
                    async with timeout_scope(self.lookup_timeout_s, DHTTimeoutError, "DHT store lookup timed out"):
                        nodes = await crawl.find()
                except DHTTimeoutError:
                    nodes = crawl.closest()
                    log.warning("DHT store lookup timed out; storing on the %d nodes found", len(nodes))
            if not self.client_mode and (
                len(nodes) < self._server.ksize * self.disjoint_paths
                or self._server.node.distance_to(keynode) < max(n.distance_to(keynode) for n in nodes)
            ):
                with contextlib.suppress(DHTError):
                    accepted += self.storage.put(record)
            results = await asyncio.gather(*(self.protocol.call_store(n, record.key, [record]) for n in nodes))
            accepted += sum(1 for ok, body in results if ok and body[0])
            return accepted

    async def get(self, key: str) -> dict[PeerId, Record]:
        """Every live, verified record under `key` from the k closest nodes, one per writer.

        A lookup that runs past `lookup_timeout_s` returns what it found so far.
        """
        self._check_running()
        async with self._limit:
            return await self._get(dht_key(key))

    async def get_many(self, keys: Iterable[str]) -> dict[str, dict[PeerId, Record]]:
        """`get` for many keys concurrently (bounded); e.g. every block of a model."""
        self._check_running()
        keys = list(dict.fromkeys(keys))
        found = await asyncio.gather(*(self.get(key) for key in keys))
        return dict(zip(keys, found, strict=True))

    def _seeds(self, keynode: Node) -> list[Node]:
        # Each path starts from k of our own contacts (S/Kademlia): with fewer, the colluders nearest the key are
        # all a path ever hears of, since every answer lists only the k contacts nearest the key.
        return self.protocol.router.find_neighbors(keynode, k=self._server.ksize * self.disjoint_paths)

    async def _get(self, key: bytes) -> dict[PeerId, Record]:
        keynode = Node(key)
        nearest = self._seeds(keynode)
        crawl = RecordSpiderCrawl(
            self.protocol,
            keynode,
            nearest,
            self._server.ksize,
            self._server.alpha,
            verify=self._verify,
            paths=self.disjoint_paths,
        )
        crawl.merge(self.storage.records(key))
        if nearest:
            # Past the lookup timeout we return what we found (a partial answer beats none for routing).
            try:
                async with timeout_scope(self.lookup_timeout_s, DHTTimeoutError, "DHT lookup timed out"):
                    await crawl.find()
            except DHTTimeoutError:
                log.warning("DHT lookup timed out after %.1f s; returning %d records", self.lookup_timeout_s,
                            len(crawl.found))
        now = self._wall_clock()
        return {PeerId(sub): rec for sub, rec in sorted(crawl.found.items()) if rec.expires_at > now}

    def start_refreshing(
        self,
        keys: str | Sequence[str],
        value_fn: Callable[[], bytes | Awaitable[bytes]],
        *,
        period_s: float | None = None,
    ) -> RefreshHandle:
        """Store `value_fn()` under `keys` now and then every `period_s` (default: record ttl / 2).

        The task belongs to this node (cancelled by `aclose`); cancel it earlier with the returned handle.
        A failing round is logged and retried next period.
        """
        self._check_running()
        key_list = [keys] if isinstance(keys, str) else list(keys)
        period = self.record_ttl_s / 2 if period_s is None else period_s
        if period <= 0:
            raise ConfigError(f"refresh period must be positive, got {period}")

        async def refresh() -> None:
            while True:
                try:
                    value = value_fn()
                    if isinstance(value, Awaitable):
                        value = await value
                    await self.store_many(key_list, value)
                except (DHTError, ConfigError) as e:
                    log.warning("DHT refresh of %d keys failed: %s", len(key_list), e)
                await asyncio.sleep(period)

        return RefreshHandle(self._spawn(refresh(), name="refresh"))

# The DHT RPC layer: kademlia's protocol with every input validated and every task owned.
#
# What this fixes in `kademlia.protocol.KademliaProtocol` / `rpcudp.RPCProtocol` (each bullet names the flaw):
# - Datagrams are parsed synchronously with strict msgpack limits (`_wire`); a malformed request or reply is
#   counted in `dropped` and ignored. No task is spawned per datagram, so a flood cannot pile up tasks.
# - Replies are validated before kademlia code sees them: a FIND_NODE reply carrying `(id, None, None)` is a
#   malformed reply, so no socket call ever gets a bad address (which used to close the UDP socket for good).
# - The RPC timeout is configurable; a contact is evicted only after MAX_STRIKES timeouts in a row, and pings
#   and stores retry once before giving up.
# - `welcome_if_new` hashes storage keys once (they already are 160-bit keys) and hands a newcomer only the
#   records it should hold (paper section 2.5), original signatures and expiries intact.
# - A full bucket pings its head at most once per interval (`_routing`), in a task this protocol owns.
# - Client mode: requests carry `None` instead of our node id, so nobody adds us to a routing table, and we
#   answer no requests.
# - Stores carry signed records; the storing node verifies each one (`RecordStorage.put`).
# - Private swarms: with a swarm key every datagram is sealed (`_sealing`); what does not open is dropped and
#   counted in `outsider_dropped` before any parsing.
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from petalnode._lifecycle import TaskOwner
from petalnode.dht._known import KnownRecords
from petalnode.dht._record import Record
from petalnode.dht._routing import DecidingRoutingTable
from petalnode.dht._sealing import DatagramSealer
from petalnode.dht._storage import RecordStorage
from petalnode.dht._wire import (
    KIND_REQUEST,
    KIND_RESPONSE,
    MAX_BODY_BYTES,
    MAX_DATAGRAM_BYTES,
    MSG_ID_BYTES,
    Contact,
    pack_body,
    parse_contacts,
    parse_datagram,
    parse_key,
    parse_node_id,
    parse_request,
)
from petalnode.errors import CodecError, DHTError, RemoteProtocolError
from petalnode.swarm_key import SwarmKey

log = logging.getLogger(__name__)

# kademlia hard-codes 5 s; loopback and LAN replies take well under 100 ms, WAN under 1 s.
RPC_TIMEOUT_S = 2.0  # the default of Timeouts.dht_rpc (petalnode/_timeouts.py)
MAX_STRIKES = 2
# Record bytes per FIND_VALUE page / STORE batch: with up to 20 contacts (~900 B) and framing this stays well
# under the 8192-byte datagram cap.
PAGE_BUDGET_BYTES = 6000
MAX_RECORDS_PER_MESSAGE = 64
# One lookup reads at most this many pages from one node (64 pages of >= 5 records: >= 320 writers).
MAX_PAGES_PER_NODE = 64
MAX_HANDOFF_TASKS = 8


class HardenedProtocol(KademliaProtocol):
    """`KademliaProtocol` with signed per-writer records, validation, owned tasks and client mode."""

    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        *,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
        client_mode: bool = False,
        clock: Callable[[], float],
        swarm_key: SwarmKey | None = None,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self._sealer = None if swarm_key is None else DatagramSealer(swarm_key)
        self.outsider_dropped = 0  # datagrams not sealed under our swarm key (private swarms only)
        self._wait_timeout = rpc_timeout_s
        self.router = DecidingRoutingTable(self, ksize, source_node, clock=clock)
        self.storage: RecordStorage = storage
        self.client_mode = client_mode
        self.dropped = 0
        self.internal_errors = 0
        self._strikes: dict[bytes, int] = {}
        self._tasks = TaskOwner("dht protocol")
        self._handoffs = 0
        self._closed = False
        self._ip_hosts_only = True
        self._handlers: dict[str, tuple[Callable[..., Any], int]] = {
            "ping": (self.rpc_ping, 1),
            "store": (self.rpc_store, 3),
            "find_node": (self.rpc_find_node, 2),
            "find_value": (self.rpc_find_value, 4),
        }

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # On a real socket a contact host must be an IP literal: a name would make sendto() resolve it with a
        # blocking DNS lookup. The in-memory network names its hosts, and has no DNS.
        self._ip_hosts_only = transport.get_extra_info("socket") is not None

    # -- receiving ------------------------------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._closed:
            return
        if self._sealer is not None:
            try:
                data = self._sealer.open(data, MAX_DATAGRAM_BYTES)
            except CodecError as e:
                self.dropped += 1
                self.outsider_dropped += 1
                log.debug("dropped DHT datagram from %s: %s", addr, e)
                return
        try:
            datagram = parse_datagram(data)
            if datagram.kind == KIND_RESPONSE:
                self._accept_response(datagram.msg_id, datagram.body, addr)
            elif not self.client_mode:
                self._serve(datagram.msg_id, datagram.body, addr)
        except (CodecError, RemoteProtocolError, DHTError) as e:
            self.dropped += 1
            log.debug("dropped DHT datagram from %s: %s", addr, e)
        except Exception:  # a bug of ours: log it, keep serving
            self.dropped += 1
            self.internal_errors += 1
            log.exception("error handling DHT datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the RPC timeout handles the lost call.
        log.debug("DHT socket error: %s", exc)

    def _serve(self, msg_id: bytes, body: Any, addr: Any) -> None:
        request = parse_request(body)
        entry = self._handlers.get(request.name)
        if entry is None:
            raise RemoteProtocolError(f"unknown DHT request {request.name[:32]!r}")
        handler, arity = entry
        if len(request.args) != arity:
            raise RemoteProtocolError(f"DHT {request.name} takes {arity} arguments, got {len(request.args)}")
        response = handler(addr, *request.args)
        self._send(bytes([KIND_RESPONSE]) + msg_id + pack_body(response), addr)

    def _send(self, datagram: bytes, addr: Any) -> None:
        self.transport.sendto(datagram if self._sealer is None else self._sealer.seal(datagram), addr)

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is None:
            raise RemoteProtocolError("reply to no outstanding request")
        future, timeout = entry
        timeout.cancel()
        if not future.done():  # the caller may have been cancelled meanwhile
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    # -- served RPCs (sender first, as in kademlia) ---------------------------------------------------------------
    def _welcome_sender(self, sender: Any, nodeid: Any) -> Node:
        node_id = parse_node_id(nodeid, optional=True)
        node = Node(node_id or bytes(20), sender[0], sender[1])
        if node_id is not None:
            self.welcome_if_new(node)
        return node

    def rpc_ping(self, sender: Any, nodeid: Any) -> bytes:
        self._welcome_sender(sender, nodeid)
        return self.source_node.id

    def rpc_store(self, sender: Any, nodeid: Any, key: Any, records: Any) -> list[bool]:
        key = parse_key(key)
        if not isinstance(records, list) or not 0 < len(records) <= MAX_RECORDS_PER_MESSAGE:
            raise RemoteProtocolError("a DHT store carries 1..64 records")
        self._welcome_sender(sender, nodeid)
        accepted = []
        for obj in records:
            try:
                record = Record.from_wire(obj)
                if record.key != key:
                    raise RemoteProtocolError("record stored under a key other than its own")
                accepted.append(self.storage.put(record))
            except (DHTError, RemoteProtocolError) as e:
                log.debug("refused a record from %s: %s", sender, e)
                accepted.append(False)
        return accepted

    def rpc_find_node(self, sender: Any, nodeid: Any, key: Any) -> list[list[Any]]:
        key = parse_key(key)
        source = self._welcome_sender(sender, nodeid)
        neighbors = self.router.find_neighbors(Node(key), exclude=source)
        return [[n.id, n.ip, n.port] for n in neighbors]  # what list(n) gives, without kademlia's iterator

    def rpc_find_value(self, sender: Any, nodeid: Any, key: Any, cursor: Any, known: Any) -> dict[str, Any]:
        key = parse_key(key)
        if cursor is not None:
            cursor = parse_key(cursor)
        skip = KnownRecords.from_wire(known) or ()
        nodes = self.rpc_find_node(sender, nodeid, key) if cursor is None else []
        page, next_cursor = self.storage.page(key, cursor, PAGE_BUDGET_BYTES, MAX_RECORDS_PER_MESSAGE, skip=skip)
        return {"records": [r.to_wire() for r in page], "next": next_cursor,
                "nodes": nodes}

    # -- calling --------------------------------------------------------------------------------------------------
    def _request(self, address: tuple[str, int], name: str, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        # rpcudp's own request side hides behind __getattr__ and packs with pure-Python umsgpack (a third of the
        # CPU time of a busy node). Same framing and the same `_outstanding` / `_timeout` bookkeeping, so
        # rpcudp's response matching still applies; C msgpack and an explicit size check.
        if self.transport is None or self.transport.is_closing():
            raise DHTError("DHT socket is closed")
        msg_id = os.urandom(MSG_ID_BYTES)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        datagram = bytes([KIND_REQUEST]) + msg_id + pack_body([name, list(args)])
        self._outstanding[msg_id] = (future, loop.call_later(self._wait_timeout, self._timeout, msg_id))
        self._send(datagram, address)
        return future

    async def _call(
        self, node: Node, name: str, *args: Any, retries: int, parse: Callable[[Any], Any]
    ) -> tuple[bool, Any]:
        if self._closed:
            return (False, None)
        my_id = None if self.client_mode else self.source_node.id
        result: tuple[bool, Any] = (False, None)
        timeouts = 0
        for _ in range(retries + 1):
            try:
                ok, body = await self._request((node.ip, node.port), name, my_id, *args)
            except DHTError:  # our own socket is gone: not the contact's fault
                return (False, None)
            if ok:
                try:
                    result = (True, parse(body))
                except (RemoteProtocolError, DHTError) as e:
                    log.debug("malformed %s reply from %s: %s", name, node, e)
                    self.dropped += 1
                    timeouts += 1
                    break
                break
            timeouts += 1
        return self._handle_result(result, node, timeouts)

    def _handle_result(self, result: tuple[bool, Any], node: Node, failures: int) -> tuple[bool, Any]:
        if result[0]:
            self._strikes.pop(node.id, None)
            self.welcome_if_new(node)
            return result
        strikes = self._strikes.get(node.id, 0) + failures
        if strikes >= MAX_STRIKES:
            log.debug("%s failed %d times, evicting", node, strikes)
            self._strikes.pop(node.id, None)
            self.router.remove_contact(node)
        else:
            self._strikes[node.id] = strikes
        return result

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        return self._handle_result(result, node, 0 if result[0] else 1)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        def parse(body: Any) -> bytes:
            node_id = parse_node_id(body)
            if node_to_ask.id and node_id != node_to_ask.id:
                raise RemoteProtocolError("ping answered by a different node id")
            return node_id  # type: ignore[return-value]

        return await self._call(node_to_ask, "ping", retries=1, parse=parse)

    async def ping_address(self, address: tuple[str, int]) -> bytes | None:
        """Ping an address whose node id we do not know yet (bootstrap); returns its id or None."""
        my_id = None if self.client_mode else self.source_node.id
        for _ in range(2):
            ok, body = await self._request(address, "ping", my_id)
            if ok:
                try:
                    return parse_node_id(body)
                except RemoteProtocolError:
                    self.dropped += 1
                    return None
        return None

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call(
            node_to_ask, "find_node", node_to_find.id, retries=0,
            parse=lambda body: self._parse_contacts(body),
        )

    def _parse_contacts(self, body: Any) -> list[Contact]:
        # Others may list us among their contacts; asking ourselves is wasted work (and in client mode a timeout).
        contacts = parse_contacts(body, max_len=2 * self.router.ksize)
        if self._ip_hosts_only:
            for contact in contacts:
                try:
                    ipaddress.ip_address(contact[1])
                except ValueError:
                    raise RemoteProtocolError("a DHT contact host must be an IP address") from None
        return [c for c in contacts if c[0] != self.source_node.id]

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node, known: KnownRecords | None = None,
        on_page: Callable[[], None] | None = None,
    ) -> tuple[bool, Any]:
        """The live records `node_to_ask` holds for the key (following pages), and its closest contacts.

        Args:
            known: (writer, seq) pairs we already have; the holder leaves those out (see `_known`).
            on_page: called after each page that arrived (the crawl's gate uses it to tell a live holder).
        Returns:
            (True, (records, contacts)) or (False, None). Records are parsed, not yet verified.
        """
        records: list[Record] = []
        contacts: list[Contact] = []
        cursor: bytes | None = None
        known_wire = None if known is None else known.to_wire()
        for page_number in range(MAX_PAGES_PER_NODE):
            ok, page = await self._call(
                node_to_ask, "find_value", node_to_find.id, cursor, known_wire, retries=0 if page_number == 0 else 1,
                parse=lambda body: self._parse_value_page(body, node_to_find.id),
            )
            if not ok:
                return (False, None) if page_number == 0 else (True, (records, contacts))
            if on_page is not None:
                on_page()
            page_records, page_contacts, next_cursor = page
            records.extend(page_records)
            contacts.extend(page_contacts)
            if next_cursor is None or (cursor is not None and next_cursor <= cursor):
                break
            cursor = next_cursor
        return (True, (records, contacts))

    def _parse_value_page(self, body: Any, key: bytes) -> tuple[list[Record], list[Contact], bytes | None]:
        if not isinstance(body, dict) or set(body) != {"records", "next", "nodes"}:
            raise RemoteProtocolError("a FIND_VALUE reply is {records, next, nodes}")
        raw = body["records"]
        if not isinstance(raw, list) or len(raw) > MAX_RECORDS_PER_MESSAGE:
            raise RemoteProtocolError("FIND_VALUE records must be an array of at most 64")
        records = []
        for obj in raw:
            record = Record.from_wire(obj)  # InvalidRecordError is a DHTError: the whole reply is refused
            if record.key != key:
                raise RemoteProtocolError("FIND_VALUE returned a record for another key")
            records.append(record)
        next_cursor = None if body["next"] is None else parse_key(body["next"])
        return records, self._parse_contacts(body["nodes"]), next_cursor

    async def call_store(self, node_to_ask: Node, key: bytes, records: list[Record]) -> tuple[bool, Any]:  # type: ignore[override]
        """Store `records` (all under `key`) on one node; returns (True, [accepted per record]) or (False, None)."""
        def parse(body: Any) -> list[bool]:
            if not isinstance(body, list) or len(body) != len(records) or not all(isinstance(b, bool) for b in body):
                raise RemoteProtocolError("a STORE reply is one bool per record")
            return body

        return await self._call(node_to_ask, "store", key, [r.to_wire() for r in records], retries=1, parse=parse)

    # -- routing table upkeep -------------------------------------------------------------------------------------
    def welcome_if_new(self, node: Node) -> None:
        """Add or refresh `node`; if it is new, hand it the records it should now hold (paper section 2.5)."""
        if node.id == self.source_node.id or self._closed:
            return
        handoff = self._handoff_keys(node) if self.router.is_new_node(node) and not self.client_mode else []
        head = self.router.add_contact(node)
        if head is not None:
            self._spawn(self.call_ping(head))
        if handoff and not self.router.is_new_node(node) and self._handoffs < MAX_HANDOFF_TASKS:
            self._spawn(self._handoff(node, handoff))

    def _handoff_keys(self, node: Node) -> list[bytes]:
        keys = []
        for key in self.storage.keys():
            keynode = Node(key)  # storage keys are already 160-bit digests: no second hash
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
            if not neighbors or (new_node_close and this_closest):
                keys.append(key)
        return keys

    async def _handoff(self, node: Node, keys: list[bytes]) -> None:
        self._handoffs += 1
        try:
            for key in keys:
                for batch in batch_records(self.storage.records(key)):
                    ok, _ = await self.call_store(node, key, batch)
                    if not ok:
                        return
        finally:
            self._handoffs -= 1

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closed:  # a datagram handled after aclose starts no new work
            coro.close()
            return
        self._tasks.spawn(coro)

    async def aclose(self) -> None:
        """Stop answering, fail outstanding calls, cancel and await owned tasks (idempotent)."""
        self._closed = True
        for future, timeout in self._outstanding.values():
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        await self._tasks.aclose()


def batch_records(records: list[Record]) -> list[list[Record]]:
    """Split records into STORE batches that each fit one datagram."""
    batches: list[list[Record]] = []
    size = 0
    for record in records:
        if not batches or size + record.wire_size() > PAGE_BUDGET_BYTES or len(batches[-1]) >= MAX_RECORDS_PER_MESSAGE:
            batches.append([])
            size = 0
        batches[-1].append(record)
        size += record.wire_size()
    return batches


assert PAGE_BUDGET_BYTES < MAX_BODY_BYTES - 2048

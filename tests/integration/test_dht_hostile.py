"""A hostile peer on real UDP: the `(id, None, None)` FIND_NODE reply that kills plain kademlia's socket."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest

from petalnode.dht import DHTNode
from petalnode.identity import Identity

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


class EvilPeer(asyncio.DatagramProtocol):
    """Answers pings correctly and every lookup with a contact whose address is (None, None)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.answered = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != b"\x00":
            return
        name, _args = msgpack.unpackb(data[21:])
        reply: object = os.urandom(20) if name == "ping" else [[os.urandom(20), None, None]]
        if name == "find_value":
            reply = {"records": [], "next": None, "nodes": [[os.urandom(20), None, None]]}
        self.answered += 1
        self.transport.sendto(b"\x01" + data[1:21] + msgpack.packb(reply), addr)


async def test_none_address_contacts_do_not_close_the_socket() -> None:
    loop = asyncio.get_running_loop()
    evil_transport, evil = await loop.create_datagram_endpoint(EvilPeer, local_addr=("127.0.0.1", 0))
    evil_port = evil_transport.get_extra_info("sockname")[1]
    victim = DHTNode(Identity.generate(), rpc_timeout_s=0.5)
    good = DHTNode(Identity.generate(), rpc_timeout_s=0.5)
    try:
        await good.start()
        # The bootstrap crawl asks the evil peer for contacts and gets the bad one back.
        await victim.start(bootstrap=[("127.0.0.1", evil_port), ("127.0.0.1", good.port)])
        assert evil.answered >= 2
        assert victim.protocol.dropped >= 1
        assert victim.protocol.internal_errors == 0
        assert not victim.protocol.transport.is_closing()
        assert evil_port not in {c.port for c in victim.protocol.router.contacts()}
        # The victim still serves: the good node stores through it and both read back.
        assert await good.store("still-alive", b"yes") >= 2
        assert set(await victim.get("still-alive")) == {good.peer_id}
    finally:
        await good.aclose()
        await victim.aclose()
        evil_transport.close()

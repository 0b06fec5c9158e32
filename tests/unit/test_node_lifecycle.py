"""Node / SwarmClient / DHTNode lifecycle over the in-memory network: close during start, close twice, a component
failing to close, a cancelled close, start twice, start after close, and no task outliving aclose."""

from __future__ import annotations

import asyncio

import pytest

from petalnode.dht import DHTNode
from petalnode.errors import ClosedResourceError, InvalidStateError
from petalnode.identity import Identity, PeerAddress
from petalnode.node import Node, SwarmClient
from petalnode.transport import MemoryNetwork


def _node(network: MemoryNetwork, host: str, **kwargs) -> Node:
    identity = Identity.generate()
    return Node(identity, listen_host=host, listen_port=4000, transport=network.transport(identity, host),
                endpoint_factory=network.create_datagram_endpoint, **kwargs)


def _unreachable(network: MemoryNetwork) -> PeerAddress:
    # Nobody listens there: the DHT bootstrap waits for its timeout, which is our window to close during start.
    return PeerAddress("memory", "nobody", 4000, Identity.generate().peer_id)


def _others(before: set[asyncio.Task]) -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t not in before and not t.done()}


async def test_node_close_twice_start_twice_and_after_close() -> None:
    network = MemoryNetwork()
    before = set(asyncio.all_tasks())
    node = _node(network, "b")
    await node.start()
    with pytest.raises(InvalidStateError):
        await node.start()
    await node.aclose()
    await node.aclose()  # idempotent
    assert node.state.value == "closed"
    with pytest.raises(ClosedResourceError):
        await node.start()
    assert not _others(before)


async def test_node_close_during_start_raises_closed_and_releases_everything() -> None:
    network = MemoryNetwork()
    before = set(asyncio.all_tasks())
    node = _node(network, "s", bootstrap=[_unreachable(network)])
    starting = asyncio.create_task(node.start())
    while node._dht is None:  # noqa: ASYNC110 - polling a private attribute; no event exists for it
        await asyncio.sleep(0.01)
    await node.aclose()
    with pytest.raises(ClosedResourceError):
        await starting
    assert node.state.value == "closed"
    assert node.dht.state.value == "closed"
    assert node._transport._closed
    await asyncio.sleep(0)
    assert not _others(before)


async def test_node_component_failing_to_close_still_closes_the_rest() -> None:
    network = MemoryNetwork()
    before = set(asyncio.all_tasks())
    node = _node(network, "b")
    await node.start()
    rpc_aclose = node.rpc.aclose

    async def broken() -> None:
        await rpc_aclose()
        raise OSError("rpc close failed")

    node._rpc.aclose = broken  # type: ignore[method-assign]
    # Registered before the patch: swap the callback too, the way a real failure would look.
    node._cleanup = type(node._cleanup)("test")
    node._cleanup.push("transport", node._transport.aclose)
    node._cleanup.push("rpc", broken)
    node._cleanup.push("dht", node.dht.aclose)
    with pytest.raises(OSError, match="rpc close failed"):
        await node.aclose()
    assert node.dht.state.value == "closed"
    assert node._transport._closed
    assert not _others(before)


async def test_cancelled_node_close_releases_everything_and_reraises() -> None:
    network = MemoryNetwork()
    before = set(asyncio.all_tasks())
    node = _node(network, "b")
    await node.start()
    hanging = asyncio.Event()
    signaled = asyncio.Event()

    async def slow_close() -> None:
        signaled.set()
        await hanging.wait()

    node._cleanup.push("slow", slow_close)  # closed first (last registered)
    closer = asyncio.create_task(node.aclose())
    await signaled.wait()
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert node.state.value == "closed"
    assert node.dht.state.value == "closed"
    assert node._transport._closed
    assert not _others(before)


async def test_swarm_client_start_twice_after_close_and_close_during_start() -> None:
    network = MemoryNetwork()
    boot = _node(network, "b")
    await boot.start()
    before = set(asyncio.all_tasks())

    def client(host: str, bootstrap: PeerAddress) -> SwarmClient:
        identity = Identity.generate()
        return SwarmClient("m", 4, [bootstrap], identity=identity, transport=network.transport(identity, host),
                           endpoint_factory=network.create_datagram_endpoint, listen_host=host)

    c = client("c1", boot.address)
    await c.start()
    with pytest.raises(InvalidStateError):
        await c.start()
    await c.aclose()
    await c.aclose()
    with pytest.raises(ClosedResourceError):
        await c.start()
    assert c.state.value == "closed"

    c2 = client("c2", _unreachable(network))
    starting = asyncio.create_task(c2.start())
    while c2._dht is None:  # noqa: ASYNC110 - polling a private attribute; no event exists for it
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await c2.aclose()
    with pytest.raises(ClosedResourceError):
        await starting
    assert c2.state.value == "closed" and c2._dht.state.value == "closed"
    await asyncio.sleep(0)
    assert not _others(before)
    await boot.aclose()


async def test_dht_node_start_twice_and_after_close() -> None:
    network = MemoryNetwork()
    dht = DHTNode(Identity.generate(), endpoint_factory=network.create_datagram_endpoint)
    await dht.start(listen=("d", 4000))
    with pytest.raises(InvalidStateError):
        await dht.start(listen=("d", 4001))
    await dht.aclose()
    await dht.aclose()
    with pytest.raises(ClosedResourceError):
        await dht.start(listen=("d", 4000))
    assert not dht._tasks

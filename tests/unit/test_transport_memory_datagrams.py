"""MemoryNetwork datagrams: the asyncio UDP surface the DHT runs on inside one process."""

from __future__ import annotations

import asyncio

import pytest

from petalnode.errors import ConfigError
from petalnode.transport import LinkConfig, MemoryNetwork


class Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.made = False
        self.lost = asyncio.Event()
        self.errors: list[Exception] = []
        self.arrived = asyncio.Event()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(2):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        self.arrived.set()

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def test_port_zero_picks_distinct_ports_and_sockname() -> None:
    net = MemoryNetwork()
    t1, p1 = await net.create_datagram_endpoint(Recorder, local_addr=("h1", 0))
    t2, _ = await net.create_datagram_endpoint(Recorder, local_addr=("h1", 0))
    assert p1.made
    assert t1.get_extra_info("sockname")[0] == "h1"
    assert t1.get_extra_info("sockname") != t2.get_extra_info("sockname")
    with pytest.raises(OSError):
        await net.create_datagram_endpoint(Recorder, local_addr=t1.get_extra_info("sockname"))


async def test_delivery_uses_link_latency_and_source_address() -> None:
    net = MemoryNetwork(LinkConfig(latency_s=0.05))
    ta, _ = await net.create_datagram_endpoint(Recorder, local_addr=("a", 0))
    _, pb = await net.create_datagram_endpoint(Recorder, local_addr=("b", 4000))
    loop = asyncio.get_running_loop()
    start = loop.time()
    ta.sendto(b"hello", ("b", 4000))
    assert pb.received == []
    await pb.wait_for(1)
    assert loop.time() - start >= 0.05
    assert pb.received == [(b"hello", ta.get_extra_info("sockname"))]


async def test_loss_drops_about_the_configured_fraction() -> None:
    net = MemoryNetwork(LinkConfig(loss=0.5), seed=1)
    ta, _ = await net.create_datagram_endpoint(Recorder, local_addr=("a", 0))
    _, pb = await net.create_datagram_endpoint(Recorder, local_addr=("b", 1))
    for i in range(400):
        ta.sendto(i.to_bytes(2, "big"), ("b", 1))
    await asyncio.sleep(0.01)
    assert 120 < len(pb.received) < 280
    assert (net.datagrams_sent, net.datagram_bytes_sent) == (400, 800)  # counted when sent, lost ones included


async def test_partition_heal_kill_and_close() -> None:
    net = MemoryNetwork()
    ta, _ = await net.create_datagram_endpoint(Recorder, local_addr=("a", 0))
    tb, pb = await net.create_datagram_endpoint(Recorder, local_addr=("b", 1))
    net.partition("b")
    ta.sendto(b"x", ("b", 1))
    await asyncio.sleep(0.01)
    assert pb.received == []
    net.heal("b")
    ta.sendto(b"y", ("b", 1))
    await asyncio.sleep(0.01)
    assert [d for d, _ in pb.received] == [b"y"]
    net.kill("b")
    assert tb.is_closing()
    async with asyncio.timeout(1):
        await pb.lost.wait()
    ta.sendto(b"z", ("b", 1))  # nobody bound any more: silently lost, like UDP
    await asyncio.sleep(0.01)
    assert [d for d, _ in pb.received] == [b"y"]
    # the host can come back (a restarted node) on the same port
    tb2, pb2 = await net.create_datagram_endpoint(Recorder, local_addr=("b", 1))
    ta.sendto(b"again", ("b", 1))
    await asyncio.sleep(0.01)
    assert [d for d, _ in pb2.received] == [b"again"]
    ta.close()
    ta.close()
    ta.sendto(b"ignored", ("b", 1))
    tb2.abort()


async def test_oversized_datagram_reports_error_and_bad_link_config_is_refused() -> None:
    net = MemoryNetwork()
    ta, pa = await net.create_datagram_endpoint(Recorder, local_addr=("a", 0))
    ta.sendto(b"x" * 70000, ("b", 1))
    assert pa.errors and isinstance(pa.errors[0], OSError)
    with pytest.raises(ConfigError):
        LinkConfig(loss=1.5)
    with pytest.raises(ValueError):
        ta.sendto(b"x", "b:1")


async def test_bandwidth_serialises_datagrams_in_order() -> None:
    net = MemoryNetwork(LinkConfig(bandwidth_bytes_per_s=100_000))
    ta, _ = await net.create_datagram_endpoint(Recorder, local_addr=("a", 0))
    _, pb = await net.create_datagram_endpoint(Recorder, local_addr=("b", 1))
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(5):
        ta.sendto(bytes([i]) * 2000, ("b", 1))  # 10 kB at 100 kB/s: 0.1 s
    await pb.wait_for(5)
    assert loop.time() - start >= 0.09
    assert [d[0] for d, _ in pb.received] == [0, 1, 2, 3, 4]

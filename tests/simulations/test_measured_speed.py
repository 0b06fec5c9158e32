"""Measured speed in the simulator: real Node servers and a real SwarmClient over the memory network, in virtual time,
with stand-in compute that takes a set (virtual) time per step. A server announcing 1000x its speed gets at most
the first session; a server that slows down loses the route to its peer after one session, and a server that was
measured slow is tried again once its measurement has faded and its discount lapsed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from petalnode.identity import Identity, PeerId
from petalnode.node import Node, ServeOptions, SwarmClient
from petalnode.node._observed import DISCOUNT_MEMORY_S, HALF_LIFE_S
from petalnode.transport import LinkConfig, MemoryNetwork
from simulations._standin import StandInBackend, StandInModelInfo, next_token, prompt_hidden, reference_generation
from simulations._virtual_loop import run

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
MODEL = "standin-model"
NUM_BLOCKS = 4
PROMPT = [11, 22, 33, 44, 55]
NEW_TOKENS = 6


class _TimedExecutor:
    """Runs stand-in compute after `step_s` of virtual time: a server of a known real speed."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    async def run(self, fn: Callable[[], T], *, priority: int = 0, peer: object = None) -> T:
        await asyncio.sleep(self.step_s)
        return fn()

    def close(self) -> None:
        pass


class TimedStandIn(StandInBackend):
    """A stand-in that announces `claim` blocks/s and really takes `step_s` per step (changeable mid-run)."""

    def __init__(self, info: StandInModelInfo, *, claim: float, step_s: float) -> None:
        super().__init__(info, throughput=claim)
        self.timed = _TimedExecutor(step_s)

    def executor(self) -> Any:
        return self.timed


class Swarm:
    def __init__(self) -> None:
        self.network = MemoryNetwork(LinkConfig(latency_s=0.005))
        self.info = StandInModelInfo(MODEL, NUM_BLOCKS)
        self.nodes: list[Node] = []
        self.backends: dict[str, TimedStandIn] = {}
        self.peer_of: dict[PeerId, str] = {}

    async def node(self, name: str, *, claim: float = 100.0, step_s: float = 0.0, serve: bool = True) -> Node:
        loop = asyncio.get_running_loop()
        identity = Identity.from_seed(name.encode())
        backend = self.backends[name] = TimedStandIn(self.info, claim=claim, step_s=step_s)
        options = ServeOptions(model=MODEL, blocks=(0, NUM_BLOCKS), rebalance_period_s=None) if serve else None
        bootstrap = [self.nodes[0].address] if self.nodes else []
        node = Node(identity, listen_host=name, listen_port=7000, bootstrap=bootstrap, serve=options,
                    transport=self.network.transport(identity, name),
                    endpoint_factory=self.network.create_datagram_endpoint, wall_clock=loop.wall_clock,
                    compute=backend)
        await node.start()
        self.nodes.append(node)
        self.peer_of[identity.peer_id] = name
        return node

    async def client(self) -> SwarmClient:
        loop = asyncio.get_running_loop()
        identity = Identity.from_seed(b"client")
        client = SwarmClient(MODEL, NUM_BLOCKS, [self.nodes[0].address], identity=identity, seed=1,
                             listen_host="client", transport=self.network.transport(identity, "client"),
                             endpoint_factory=self.network.create_datagram_endpoint, wall_clock=loop.wall_clock,
                             step_timeout_s=5.0, wait_for_blocks_s=30.0)
        await client.start()
        return client

    async def generation(self, client: SwarmClient) -> tuple[list[int], str]:
        """A greedy generation in a new session; returns its tokens and the server its route went through."""
        session = await client.open_session(len(PROMPT) + NEW_TOKENS)
        try:
            (hop,) = session.hops
            out = await session.step(prompt_hidden(PROMPT, self.info.hidden_size), 0)
            tokens = [next_token(out[:, -1])]
            for step in range(NEW_TOKENS - 1):
                out = await session.step(prompt_hidden(tokens[-1:], self.info.hidden_size), len(PROMPT) + step)
                tokens.append(next_token(out[:, -1]))
            return tokens, self.peer_of[hop.peer_id]
        finally:
            await session.aclose()

    async def aclose(self, client: SwarmClient) -> None:
        await client.aclose()
        for node in reversed(self.nodes):
            await node.aclose()


EXPECTED = reference_generation(NUM_BLOCKS, 8, PROMPT, NEW_TOKENS)


def test_a_server_claiming_1000x_gets_at_most_the_first_session(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[str]:
        swarm = Swarm()
        await swarm.node("boot", serve=False)
        await swarm.node("honest", claim=100.0, step_s=NUM_BLOCKS / 100.0)  # as fast as it says
        await swarm.node("liar", claim=100_000.0, step_s=NUM_BLOCKS / 10.0)  # 10x slower than the honest one
        client = await swarm.client()
        used = []
        for _ in range(10):
            tokens, server = await swarm.generation(client)
            assert tokens == EXPECTED
            used.append(server)
        await swarm.aclose(client)
        return used

    with caplog.at_level(logging.WARNING, logger="petalnode.node._swarm_client"):
        used = run(scenario())
    assert used.count("liar") <= 1 and "liar" not in used[1:], used
    if "liar" in used:
        warnings = [r.getMessage() for r in caplog.records if "announces" in r.getMessage()]
        assert len(warnings) == 1 and "1e+05 blocks/s" in warnings[0], warnings


def test_a_server_that_slows_down_loses_the_route_and_gets_another_chance_later() -> None:
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        swarm = Swarm()
        await swarm.node("boot", serve=False)
        await swarm.node("a", claim=100.0, step_s=NUM_BLOCKS / 100.0)
        await swarm.node("b", claim=100.0, step_s=NUM_BLOCKS / 100.0)
        client = await swarm.client()
        _, favourite = await swarm.generation(client)
        other = "b" if favourite == "a" else "a"
        # The favourite gets 10x slower (another client's load, say); the other stays as it was.
        swarm.backends[favourite].timed.step_s = NUM_BLOCKS / 10.0
        slowed = [(await swarm.generation(client))[1] for _ in range(4)]
        # 5.5x below its claim by 45 ms per block: discounted, as a liar would be (the client cannot tell).
        loop = asyncio.get_running_loop()
        favourite_id = next(p for p, name in swarm.peer_of.items() if name == favourite)
        assert client.speeds.is_discounted(favourite_id, loop.time())
        # Much later (as if the client was idle), everything measured has faded and the discount has lapsed:
        # the favourite, fast again, is tried again (its claim beats the other's faded measurement of 50) and
        # re-learned as fast.
        swarm.backends[favourite].timed.step_s = NUM_BLOCKS / 1000.0
        swarm.backends[other].timed.step_s = NUM_BLOCKS / 50.0
        await asyncio.sleep(DISCOUNT_MEMORY_S + HALF_LIFE_S)
        assert client.speeds.throughputs(loop.time()) == {}
        recovered = [(await swarm.generation(client))[1] for _ in range(4)]
        assert not client.speeds.is_discounted(favourite_id, loop.time())
        await swarm.aclose(client)
        return [favourite, other], slowed, recovered

    (favourite, other), slowed, recovered = run(scenario())
    # The slow session itself measured it: the next one already goes to the other server.
    assert slowed[0] == favourite and slowed[1:] == [other] * 3, slowed
    assert recovered[-2:] == [favourite] * 2, recovered

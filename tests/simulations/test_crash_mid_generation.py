"""A server dies in the middle of a greedy generation (crash or graceful leave, at each position of the chain);
the client reroutes to the spare, replays, and the tokens equal the fault-free reference. Real Node servers and a
real SwarmClient over the memory network, in virtual time."""

from __future__ import annotations

import asyncio
import time

import pytest

from petalnode.identity import Identity
from petalnode.node import Node, ServeOptions, SwarmClient
from petalnode.transport import LinkConfig, MemoryNetwork
from simulations._standin import StandInBackend, StandInModelInfo, next_token, prompt_hidden, reference_generation
from simulations._virtual_loop import run

pytestmark = pytest.mark.timeout(120)

MODEL = "standin-model"
NUM_BLOCKS = 9
CHAIN = [(0, 3), (3, 6), (6, 9)]
PROMPT = [11, 22, 33, 44, 55]
NEW_TOKENS = 16
KILL_AFTER = 6  # tokens generated before the failure


async def generation_with_failure(position: int, crash: bool) -> tuple[list[int], int, float]:
    loop = asyncio.get_running_loop()
    network = MemoryNetwork(LinkConfig(latency_s=0.01))
    info = StandInModelInfo(MODEL, NUM_BLOCKS)

    def node(name: str, blocks: tuple[int, int] | None, bootstrap: list) -> Node:  # type: ignore[type-arg]
        identity = Identity.from_seed(name.encode())
        serve = None if blocks is None else ServeOptions(model=MODEL, blocks=blocks, rebalance_period_s=None)
        return Node(identity, listen_host=name, listen_port=7000, bootstrap=bootstrap, serve=serve,
                    transport=network.transport(identity, name), endpoint_factory=network.create_datagram_endpoint,
                    wall_clock=loop.wall_clock, compute=StandInBackend(info, throughput=100.0 + len(name)))

    boot = node("boot", None, [])
    await boot.start()
    servers = {}
    for i, blocks in enumerate(CHAIN):
        for copy in ("a", "b"):
            servers[(i, copy)] = node(f"s{i}{copy}", blocks, [boot.address])
            await servers[(i, copy)].start()
    identity = Identity.from_seed(b"client")
    client = SwarmClient(MODEL, NUM_BLOCKS, [boot.address], identity=identity, seed=1, listen_host="client",
                         transport=network.transport(identity, "client"),
                         endpoint_factory=network.create_datagram_endpoint, wall_clock=loop.wall_clock,
                         step_timeout_s=5.0, wait_for_blocks_s=30.0)
    await client.start()
    started = loop.time()
    async with asyncio.timeout(300):
        session = await client.open_session(len(PROMPT) + NEW_TOKENS)
        out = await session.step(prompt_hidden(PROMPT, info.hidden_size), 0)
        tokens = [next_token(out[:, -1])]
        for step in range(NEW_TOKENS - 1):
            if step == KILL_AFTER:
                victim_id = session.hops[position].peer_id
                victim = next(n for n in servers.values() if n.identity.peer_id == victim_id)
                if crash:
                    network.kill(victim.listen_host)
                await victim.aclose()
            out = await session.step(prompt_hidden(tokens[-1:], info.hidden_size), len(PROMPT) + step)
            tokens.append(next_token(out[:, -1]))
        reroutes = session.reroutes
        await session.aclose()
    elapsed = loop.time() - started
    await client.aclose()
    for n in [*servers.values(), boot]:
        await n.aclose()
    return tokens, reroutes, elapsed


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("crash", [True, False], ids=["crash", "graceful"])
def test_a_server_failing_mid_generation_is_survived_exactly(position: int, crash: bool) -> None:
    real_start = time.perf_counter()
    tokens, reroutes, elapsed = run(generation_with_failure(position, crash))
    assert tokens == reference_generation(NUM_BLOCKS, 8, PROMPT, NEW_TOKENS)
    assert reroutes >= 1  # the failure was noticed and routed around (the victim was on the route)
    assert elapsed < 60, f"generation took {elapsed:.1f} virtual seconds"
    assert time.perf_counter() - real_start < 30

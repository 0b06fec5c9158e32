"""SwarmSession failover without sockets: real Node servers with the stand-in compute over the in-memory network,
in virtual time. Whose fault an error is decides who gets banned: a step the client's own session cannot take is
refused locally; a server refusing valid steps is routed around and banned once another server accepts them; two
servers refusing the same step end in BadRequestError and ban nobody."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import torch

from petalnode import Timeouts
from petalnode.errors import BadRequestError, NoRouteError, ShapeError
from petalnode.identity import Identity, PeerId
from petalnode.node import Node, ServeOptions, SwarmClient, SwarmSession
from petalnode.node._backend import InlineExecutor
from petalnode.transport import LinkConfig, MemoryNetwork
from simulations._standin import (
    StandInBackend,
    StandInModelInfo,
    StandInSpan,
    next_token,
    prompt_hidden,
    reference_generation,
)
from simulations._virtual_loop import run

pytestmark = pytest.mark.timeout(60)

MODEL = "standin-model"
NUM_BLOCKS = 4
HIDDEN = 8
PROMPT = [11, 22, 33]


class _LyingSpan(StandInSpan):
    """Refuses every step (as a compute error, which the server reports as a bad request) while `lying()`."""

    def __init__(self, start: int, end: int, lying: Callable[[], bool]) -> None:
        super().__init__(start, end)
        self._lying = lying

    def subspan(self, start: int, end: int) -> StandInSpan:
        return _LyingSpan(start, end, self._lying)

    def forward_span(self, hidden, cache, position_ids, prompts=None):  # type: ignore[no-untyped-def]
        if self._lying():
            raise ShapeError("lying: I refuse this perfectly good step")
        return super().forward_span(hidden, cache, position_ids, prompts)


class _StallingExecutor(InlineExecutor):
    """Inline compute that hangs (in virtual time) while `stalled()`: a server that accepts a step and never
    answers it."""

    def __init__(self, stalled: Callable[[], bool]) -> None:
        self._stalled = stalled

    async def run(self, fn, *, priority=0, peer=None):  # type: ignore[no-untyped-def]
        if self._stalled():
            await asyncio.sleep(3600)
        return fn()


class _LyingBackend(StandInBackend):
    def __init__(self, info: StandInModelInfo, *, throughput: float, lying: Callable[[], bool],
                 stalled: Callable[[], bool] = lambda: False) -> None:
        super().__init__(info, throughput=throughput)
        self._lying = lying
        self._stalled = stalled

    def executor(self) -> _StallingExecutor:
        return _StallingExecutor(self._stalled)

    def load_span(self, info, start, end, *, dtype, device, progress):  # type: ignore[no-untyped-def]
        super().load_span(info, start, end, dtype=dtype, device=device, progress=progress)
        return _LyingSpan(start, end, self._lying)


@dataclass
class Swarm:
    client: SwarmClient
    servers: dict[str, Node]
    lying: set[str]
    stalled: set[str]

    def name_of(self, peer_id: PeerId) -> str:
        return next(name for name, node in self.servers.items() if node.identity.peer_id == peer_id)

    def banned(self) -> set[str]:
        return {self.name_of(p) for p in self.client.bans.banned()}


@asynccontextmanager
async def swarm(names: list[str], timeouts: Timeouts | None = None) -> AsyncIterator[Swarm]:
    """A bootstrap, one server per name hosting every block (the fastest first), and a client."""
    loop = asyncio.get_running_loop()
    network = MemoryNetwork(LinkConfig(latency_s=0.01))
    info = StandInModelInfo(MODEL, NUM_BLOCKS, hidden_size=HIDDEN)
    lying: set[str] = set()
    stalled: set[str] = set()

    def node(name: str, serve: bool, bootstrap: list, throughput: float = 0.0) -> Node:  # type: ignore[type-arg]
        identity = Identity.from_seed(name.encode())
        options = ServeOptions(model=MODEL, blocks=(0, NUM_BLOCKS), rebalance_period_s=None) if serve else None
        return Node(identity, listen_host=name, listen_port=7000, bootstrap=bootstrap, serve=options,
                    transport=network.transport(identity, name), endpoint_factory=network.create_datagram_endpoint,
                    wall_clock=loop.wall_clock,
                    compute=_LyingBackend(info, throughput=throughput, lying=lambda: name in lying,
                                          stalled=lambda: name in stalled))

    boot = node("boot", False, [])
    await boot.start()
    servers = {}
    for i, name in enumerate(names):
        servers[name] = node(name, True, [boot.address], throughput=1000.0 / (i + 1))
        await servers[name].start()
    identity = Identity.from_seed(b"client")
    client = SwarmClient(MODEL, NUM_BLOCKS, [boot.address], identity=identity, seed=1, listen_host="client",
                         transport=network.transport(identity, "client"),
                         endpoint_factory=network.create_datagram_endpoint, wall_clock=loop.wall_clock,
                         timeouts=timeouts or Timeouts(step=5.0, wait_for_blocks=5.0))
    await client.start()
    try:
        async with asyncio.timeout(600):
            yield Swarm(client, servers, lying, stalled)
    finally:
        await client.aclose()
        for n in [*servers.values(), boot]:
            await n.aclose()


async def generate(session: SwarmSession, new_tokens: int, first: int | None = None) -> list[int]:
    """Greedy stand-in generation: the prompt, then one token per step."""
    out = await session.step(prompt_hidden(PROMPT, HIDDEN), 0)
    tokens = [next_token(out[:, -1])]
    for _ in range(new_tokens - 1):
        out = await session.step(prompt_hidden(tokens[-1:], HIDDEN))
        tokens.append(next_token(out[:, -1]))
    return tokens


def test_a_step_past_max_length_is_refused_locally_and_bans_nobody() -> None:
    async def scenario() -> None:
        async with swarm(["a", "b"]) as s:
            session = await s.client.open_session(len(PROMPT) + 4)
            tokens = await generate(session, 2)  # positions 0..3
            # 4 tokens at position 4 would need max_length 8 (a prompt-lookup draft does this): refused here.
            with pytest.raises(BadRequestError, match="exceeds the session's max_length 7"):
                await session.step(prompt_hidden([1, 2, 3, 4], HIDDEN))
            with pytest.raises(BadRequestError, match="batch 2 exceeds"):
                await session.step(torch.zeros(2, 1, HIDDEN))
            with pytest.raises(BadRequestError, match="position 9"):
                await session.step(prompt_hidden([1], HIDDEN), 9)
            assert s.banned() == set() and session.reroutes == 0
            # The session goes on exactly where it was.
            for _ in range(3):
                out = await session.step(prompt_hidden(tokens[-1:], HIDDEN))
                tokens.append(next_token(out[:, -1]))
            assert tokens == reference_generation(NUM_BLOCKS, HIDDEN, PROMPT, 5)
            assert session.position == 7 and s.banned() == set()

    run(scenario())


def test_a_server_refusing_valid_steps_is_routed_around_and_banned_once_another_accepts() -> None:
    async def scenario() -> None:
        async with swarm(["liar", "honest"]) as s:
            session = await s.client.open_session(len(PROMPT) + 6)
            assert s.name_of(session.hops[0].peer_id) == "liar"  # the fastest server is on the route
            tokens = await generate(session, 2)
            s.lying.add("liar")
            for _ in range(4):
                out = await session.step(prompt_hidden(tokens[-1:], HIDDEN))
                tokens.append(next_token(out[:, -1]))
            assert tokens == reference_generation(NUM_BLOCKS, HIDDEN, PROMPT, 6)
            assert [s.name_of(h.peer_id) for h in session.hops] == ["honest"]
            assert s.banned() == {"liar"} and session.reroutes == 1

    run(scenario())


def test_a_step_two_servers_refuse_raises_bad_request_bans_nobody_and_the_session_recovers() -> None:
    async def scenario() -> None:
        async with swarm(["a", "b"]) as s:
            session = await s.client.open_session(len(PROMPT) + 6)
            tokens = await generate(session, 2)
            s.lying.update({"a", "b"})  # as if our step were bad in a way only servers can tell
            with pytest.raises(BadRequestError, match="refused as a bad request by 2 servers"):
                await session.step(prompt_hidden(tokens[-1:], HIDDEN))
            assert s.banned() == set()
            s.lying.clear()
            for _ in range(4):
                out = await session.step(prompt_hidden(tokens[-1:], HIDDEN))
                tokens.append(next_token(out[:, -1]))
            assert tokens == reference_generation(NUM_BLOCKS, HIDDEN, PROMPT, 6)
            assert s.banned() == set()

    run(scenario())


def test_a_refusal_with_no_other_server_raises_bad_request_not_no_route() -> None:
    async def scenario() -> None:
        async with swarm(["only"]) as s:
            session = await s.client.open_session(len(PROMPT) + 4)
            await generate(session, 1)
            s.lying.add("only")
            with pytest.raises(BadRequestError, match="no other server can check it"):
                await session.step(prompt_hidden([5], HIDDEN))
            assert s.banned() == set()

    run(scenario())


def test_servers_that_all_left_end_in_no_route_error() -> None:
    async def scenario() -> None:
        async with swarm(["a", "b"]) as s:
            session = await s.client.open_session(len(PROMPT) + 4)
            await generate(session, 1)
            for node in s.servers.values():
                await node.aclose()
            with pytest.raises(NoRouteError):
                await session.step(prompt_hidden([5], HIDDEN))
            assert s.banned() == {"a", "b"}  # each failed when tried: a at the step, b when reopening

    run(scenario())


def test_a_short_step_timeout_reaches_the_stream_and_a_stalled_server_is_failed_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with swarm(["stuck", "fine"], Timeouts(step=0.5, wait_for_blocks=5.0)) as s:
            assert s.client.timeouts.step == 0.5
            session = await s.client.open_session(len(PROMPT) + 4)
            assert s.name_of(session.hops[0].peer_id) == "stuck"
            tokens = await generate(session, 1)
            s.stalled.add("stuck")
            started = loop.time()
            out = await session.step(prompt_hidden(tokens[-1:], HIDDEN))
            # The stalled server cost the 0.5 s step timeout (not the 60 s default), then the other one answered.
            assert 0.5 <= loop.time() - started < 3.0
            tokens.append(next_token(out[:, -1]))
            assert tokens == reference_generation(NUM_BLOCKS, HIDDEN, PROMPT, 2)
            assert s.banned() == {"stuck"} and session.reroutes == 1

    with caplog.at_level("WARNING", logger="petalnode.node._swarm_client"):
        run(scenario())
    assert "StepTimeoutError" in caplog.text

"""Spot-checked outputs: the pure rules (_verification.py), and SwarmSession verification against lying servers —
real Node servers with the stand-in compute over the in-memory network, in virtual time. A corrupting server
exists only here (its span returns wrong values from a chosen position on)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode import Timeouts
from petalnode.errors import ConfigError, NoRouteError, VerificationError, VerificationRollback
from petalnode.identity import Identity, PeerId
from petalnode.node import Node, ServeOptions, SwarmClient, SwarmSession
from petalnode.node._referee import RefereeSession
from petalnode.node._verification import (
    CheckSchedule,
    Side,
    VerifyMode,
    first_mismatch,
    majority,
    relative_errors,
    tolerance,
)
from petalnode.transport import LinkConfig, MemoryNetwork
from simulations._standin import (
    PRIME,
    StandInBackend,
    StandInModelInfo,
    StandInSpan,
    next_token,
    prompt_hidden,
    reference_generation,
)
from simulations._virtual_loop import run

pytestmark = pytest.mark.timeout(120)

MODEL = "standin-model"
NUM_BLOCKS = 4
HIDDEN = 8
PROMPT = [11, 22, 33]
NEW_TOKENS = 16


# -- the rules --------------------------------------------------------------------------------------------------
def test_relative_errors_and_first_mismatch() -> None:
    b = torch.ones(2, 5, 4)
    a = b.clone()
    assert first_mismatch(a, b, 1e-4) is None
    a[1, 3, 0] += 0.5  # one row of the batch, at position 3
    errors = relative_errors(a, b)
    assert errors.shape == (5,) and errors[3] == pytest.approx(0.25) and errors[:3].max() == 0
    assert first_mismatch(a, b, 1e-4) == 3
    assert first_mismatch(a, b, 0.3) is None
    with pytest.raises(ValueError, match="shapes"):
        relative_errors(a, b[:, :4])


def test_tolerances_are_ordered_by_precision() -> None:
    assert tolerance(torch.float32, torch.float32) < tolerance(torch.bfloat16, torch.bfloat16)
    assert tolerance(torch.bfloat16, torch.bfloat16) <= tolerance(torch.float32, torch.bfloat16)
    assert tolerance(torch.float32, torch.bfloat16) == tolerance(torch.bfloat16, torch.float32)
    with pytest.raises(ConfigError, match="no verification tolerance"):
        tolerance(torch.float32, torch.int8)


def test_majority_truth_table() -> None:
    assert majority(None, 3).liar is Side.SHADOW  # the third agrees with the main hop
    assert majority(2, None).liar is Side.MAIN  # the third agrees with the shadow
    assert majority(2, 3).liar is None  # three answers
    assert majority(None, None).liar is None  # agrees with both: nothing to decide on


def test_verify_mode_parse() -> None:
    assert VerifyMode.parse("FULL") is VerifyMode.FULL
    assert VerifyMode.parse(None) is VerifyMode.SAMPLE
    with pytest.raises(ConfigError, match="off, sample, full"):
        VerifyMode.parse("sometimes")


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), mean_gap=st.integers(1, 20))
def test_sample_schedule_gaps_are_bounded_and_average_the_mean(seed: int, mean_gap: int) -> None:
    schedule = CheckSchedule(VerifyMode.SAMPLE, random.Random(seed), mean_gap=mean_gap)
    gaps, since = [], 0
    for _ in range(4000):
        since += 1
        if schedule.due():
            gaps.append(since)
            since = 0
    assert gaps and all(1 <= g <= 2 * mean_gap - 1 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(mean_gap, rel=0.2)
    assert all(CheckSchedule(VerifyMode.FULL, random.Random(seed)).due() for _ in range(10))
    assert not any(CheckSchedule(VerifyMode.OFF, random.Random(seed)).due() for _ in range(10))


# -- sessions against corrupting servers ------------------------------------------------------------------------
@dataclass
class Corruption:
    """Servers (by name) whose outputs are wrong at positions >= their value."""

    from_position: dict[str, int] = field(default_factory=dict)
    kind: dict[str, int] = field(default_factory=dict)


class _CorruptingSpan(StandInSpan):
    def __init__(self, start: int, end: int, wrong_from: Callable[[], int | None], salt: int) -> None:
        super().__init__(start, end)
        self._wrong_from = wrong_from
        self._salt = salt

    def subspan(self, start: int, end: int) -> StandInSpan:
        return _CorruptingSpan(start, end, self._wrong_from, self._salt)

    def forward_span(self, hidden, cache, position_ids, prompts=None):  # type: ignore[no-untyped-def]
        out = super().forward_span(hidden, cache, position_ids, prompts)
        wrong_from = self._wrong_from()
        if wrong_from is not None:
            wrong = (position_ids[0] >= wrong_from)[None, :, None]
            out = torch.where(wrong, (out * (2 + self._salt) + 1) % PRIME, out)
        return out


class _CorruptingBackend(StandInBackend):
    def __init__(self, info: StandInModelInfo, *, throughput: float, wrong_from: Callable[[], int | None],
                 salt: int) -> None:
        super().__init__(info, throughput=throughput)
        self._wrong_from = wrong_from
        self._salt = salt

    def load_span(self, info, start, end, *, dtype, device, progress):  # type: ignore[no-untyped-def]
        super().load_span(info, start, end, dtype=dtype, device=device, progress=progress)
        return _CorruptingSpan(start, end, self._wrong_from, self._salt)


@dataclass
class Swarm:
    client: SwarmClient
    servers: dict[str, Node]
    corruption: Corruption

    def name_of(self, peer_id: PeerId) -> str:
        return next(name for name, node in self.servers.items() if node.identity.peer_id == peer_id)

    def banned(self) -> set[str]:
        return {self.name_of(p) for p in self.client.bans.banned()}

    def route(self, session: SwarmSession) -> list[str]:
        return [self.name_of(h.peer_id) for h in session.hops]


@asynccontextmanager
async def swarm(names: list[str], *, verify: str) -> AsyncIterator[Swarm]:
    """A bootstrap and one server per name hosting every block, the first the fastest (so the route's main hop),
    the second the next (the shadow), and a verifying client."""
    loop = asyncio.get_running_loop()
    network = MemoryNetwork(LinkConfig(latency_s=0.01))
    info = StandInModelInfo(MODEL, NUM_BLOCKS, hidden_size=HIDDEN)
    corruption = Corruption()

    def node(name: str, serve: bool, bootstrap: list, throughput: float = 0.0, salt: int = 1) -> Node:  # type: ignore[type-arg]
        identity = Identity.from_seed(name.encode())
        options = ServeOptions(model=MODEL, blocks=(0, NUM_BLOCKS), rebalance_period_s=None) if serve else None
        return Node(identity, listen_host=name, listen_port=7000, bootstrap=bootstrap, serve=options,
                    transport=network.transport(identity, name), endpoint_factory=network.create_datagram_endpoint,
                    wall_clock=loop.wall_clock,
                    compute=_CorruptingBackend(info, throughput=throughput, salt=salt,
                                               wrong_from=lambda: corruption.from_position.get(name)))

    boot = node("boot", False, [])
    await boot.start()
    servers = {}
    for i, name in enumerate(names):
        servers[name] = node(name, True, [boot.address], throughput=1000.0 / (i + 1), salt=i + 1)
        await servers[name].start()
    identity = Identity.from_seed(b"client")
    client = SwarmClient(MODEL, NUM_BLOCKS, [boot.address], identity=identity, seed=1, listen_host="client",
                         transport=network.transport(identity, "client"),
                         endpoint_factory=network.create_datagram_endpoint, wall_clock=loop.wall_clock,
                         timeouts=Timeouts(step=5.0, wait_for_blocks=5.0), verify=verify)
    await client.start()
    try:
        async with asyncio.timeout(600):
            yield Swarm(client, servers, corruption)
    finally:
        await client.aclose()
        for n in [*servers.values(), boot]:
            await n.aclose()


async def generate(session: SwarmSession, new_tokens: int) -> tuple[list[int], int]:
    """Greedy stand-in generation that re-runs from the session's position after a rollback, as the library's
    generate() does, and checks everything before returning. Returns (new tokens, rollbacks seen)."""
    sequence = list(PROMPT)
    rollbacks = 0
    for _ in range(10 * new_tokens):  # bounded: each rollback banned a liar
        try:
            if len(sequence) < len(PROMPT) + new_tokens:
                start = session.position
                out = await session.step(prompt_hidden(sequence[start:], HIDDEN), start)
                sequence.append(next_token(out[:, -1]))
                continue
            await session.verify()
            return sequence[len(PROMPT):], rollbacks
        except VerificationRollback as e:
            rollbacks += 1
            assert e.position == session.position
            del sequence[e.position + 1 :]  # the token at e.position came from a checked output
    raise AssertionError("generation did not finish")


REFERENCE = reference_generation(NUM_BLOCKS, HIDDEN, PROMPT, NEW_TOKENS)


def test_full_mode_catches_a_lying_main_server_before_any_wrong_output_is_returned() -> None:
    async def scenario() -> None:
        async with swarm(["liar", "b", "c"], verify="full") as s:
            s.corruption.from_position["liar"] = len(PROMPT) + 5  # honest for 5 steps, then wrong
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            assert s.route(session) == ["liar"]
            tokens, rollbacks = await generate(session, NEW_TOKENS)
            assert tokens == REFERENCE
            assert rollbacks == 0  # nothing wrong ever reached the caller
            assert s.banned() == {"liar"} and "liar" not in s.route(session)
            stats = session.verify_stats
            assert stats.liars_banned == 1 and stats.max_unverified_steps == 0
            assert stats.first_detection_position == len(PROMPT) + 5

    run(scenario())


def test_sample_mode_rolls_back_and_the_output_equals_the_honest_one() -> None:
    async def scenario() -> None:
        async with swarm(["liar", "b", "c"], verify="sample") as s:
            s.corruption.from_position["liar"] = len(PROMPT) + 4
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            tokens, rollbacks = await generate(session, NEW_TOKENS)
            assert tokens == REFERENCE
            assert s.banned() == {"liar"}
            stats = session.verify_stats
            assert stats.liars_banned == 1 and stats.rollbacks == rollbacks
            # Checks are spaced: fewer catch-up steps than tokens.
            assert stats.checks < NEW_TOKENS

    run(scenario())


def test_a_lying_shadow_is_banned_and_the_session_is_not_rolled_back() -> None:
    async def scenario() -> None:
        async with swarm(["a", "liar", "c"], verify="full") as s:
            s.corruption.from_position["liar"] = 0
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            tokens, rollbacks = await generate(session, NEW_TOKENS)
            assert tokens == REFERENCE and rollbacks == 0
            assert s.banned() == {"liar"} and s.route(session) == ["a"]

    run(scenario())


def test_a_lying_server_with_no_one_to_check_it_is_reported() -> None:
    async def scenario() -> None:
        async with swarm(["only"], verify="full") as s:
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            with pytest.raises(VerificationError, match="cannot be verified: no other server"):
                await session.step(prompt_hidden(PROMPT, HIDDEN), 0)
        async with swarm(["only"], verify="sample") as s:
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            tokens, _ = await generate(session, NEW_TOKENS)
            assert tokens == REFERENCE and session.verify_stats.unverifiable_hops >= 1

    run(scenario())


def test_two_liars_and_one_honest_server_give_no_majority_in_full_mode() -> None:
    async def scenario() -> None:
        async with swarm(["liar1", "liar2", "c"], verify="full") as s:
            s.corruption.from_position.update({"liar1": 2, "liar2": 2})  # different wrong values (salts differ)
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            with pytest.raises(VerificationError, match="no majority"):
                await session.step(prompt_hidden(PROMPT, HIDDEN), 0)
            assert s.banned() == set()

    run(scenario())


def test_verification_off_uses_the_liar_and_the_output_is_wrong() -> None:
    # The control: without verification the corrupting server's outputs reach the caller.
    async def scenario() -> None:
        async with swarm(["liar", "b", "c"], verify="off") as s:
            s.corruption.from_position["liar"] = len(PROMPT) + 4
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            tokens, _ = await generate(session, NEW_TOKENS)
            assert tokens != REFERENCE and s.banned() == set()

    run(scenario())


class _StandInReferee:
    """The stand-in blocks computed by the 'client' itself, as `LocalReferee` does with real weights."""

    dtype = torch.float32

    def __init__(self) -> None:
        self.runs = 0
        self.sessions = 0

    async def run(self, start: int, end: int, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        self.runs += 1
        return StandInSpan(start, end).forward_span(hidden, None, torch.arange(hidden.shape[1])[None])

    async def open_session(self, start: int, end: int, max_length: int, batch_size: int,
                           prompts: torch.Tensor | None) -> RefereeSession:
        self.sessions += 1
        return RefereeSession(StandInSpan(start, end), max_length=max_length, batch_size=batch_size,
                              hidden_size=HIDDEN, dtype=torch.float32, prompts=prompts, inline=True)


@pytest.mark.parametrize("liar_first", [True, False])
def test_with_two_servers_the_clients_own_copy_decides(liar_first: bool) -> None:
    async def scenario() -> None:
        names = ["liar", "honest"] if liar_first else ["honest", "liar"]
        # Sample mode: once the liar is banned one server is left, which FULL would refuse as unverifiable.
        async with swarm(names, verify="sample") as s:
            s.client.referee = referee = _StandInReferee()
            s.corruption.from_position["liar"] = len(PROMPT) + 2
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            tokens, _ = await generate(session, NEW_TOKENS)
            assert tokens == REFERENCE
            assert s.banned() == {"liar"} and s.route(session) == ["honest"]
            assert referee.runs == 1 and session.verify_stats.referee_runs == 1

    run(scenario())


def test_with_two_servers_and_no_referee_sample_mode_reports_no_majority(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with swarm(["liar", "honest"], verify="sample") as s:
            s.corruption.from_position["liar"] = len(PROMPT) + 2
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            await generate(session, NEW_TOKENS)
            assert s.banned() == set() and session.verify_stats.mismatches >= 1

    run(scenario())
    assert "no majority" in caplog.text


@pytest.mark.parametrize("liar_first", [True, False])
def test_full_mode_with_two_servers_checks_the_survivor_with_the_clients_own_copy(liar_first: bool) -> None:
    async def scenario() -> None:
        names = ["liar", "honest"] if liar_first else ["honest", "liar"]
        async with swarm(names, verify="full") as s:
            s.client.referee = referee = _StandInReferee()
            s.corruption.from_position["liar"] = len(PROMPT) + 2
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            tokens, rollbacks = await generate(session, NEW_TOKENS)
            assert tokens == REFERENCE and rollbacks == 0  # nothing wrong ever reached the caller
            assert s.banned() == {"liar"} and s.route(session) == ["honest"]
            assert referee.sessions == 1  # the survivor's shadow: a KV-cache session over the client's copy
            stats = session.verify_stats
            assert stats.unverifiable_hops == 0 and stats.max_unverified_steps == 0

    run(scenario())


def test_full_mode_bans_a_lone_liar_its_own_copy_disagrees_with() -> None:
    async def scenario() -> None:
        async with swarm(["liar"], verify="full") as s:
            s.client.referee = _StandInReferee()
            s.corruption.from_position["liar"] = len(PROMPT) + 2
            session = await s.client.open_session(len(PROMPT) + NEW_TOKENS)
            with pytest.raises(NoRouteError):  # the only server lied: nothing is left to route through
                await generate(session, NEW_TOKENS)
            assert s.banned() == {"liar"}

    run(scenario())

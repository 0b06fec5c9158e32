"""SwarmView: merging per-block announcements, per-block throughput, uncovered runs and their description."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from petalnode.codecs import packb, unpackb
from petalnode.dht import Announcement, Record, ServerState, dht_key
from petalnode.identity import Identity, PeerId
from petalnode.node import fetch_swarm
from petalnode.node._swarm_view import ServerView, SwarmView, describe_runs, runs_where

MODEL = "tiny-llama"


def pid(i: int) -> PeerId:
    return PeerId(hashlib.sha256(f"peer{i}".encode()).digest()[:20])


def ann(start: int, end: int, *, state: ServerState = ServerState.ONLINE, throughput: float = 1.0,
        model: str = MODEL, cache: int = 1000, name: str | None = None) -> Announcement:
    return Announcement(
        state=state, model=model, start_block=start, end_block=end, throughput=throughput, cache_tokens_left=cache,
        addresses=("tcp://127.0.0.1:1",), version="0.1.0", public_name=name,
    )


def records_of(*servers: tuple[PeerId, Announcement]) -> dict[int, dict[PeerId, Announcement]]:
    """What a full set of DHT lookups would return: each announcement under every block it covers."""
    records: dict[int, dict[PeerId, Announcement]] = {}
    for peer_id, a in servers:
        for block in range(a.start_block, a.end_block):
            records.setdefault(block, {})[peer_id] = a
    return records


def test_server_view_copies_every_announcement_field() -> None:
    a = ann(2, 5, state=ServerState.JOINING, throughput=3.5, cache=77, name="alice")
    view = ServerView.from_announcement(pid(1), a)
    assert (view.peer_id, view.start, view.end, view.length) == (pid(1), 2, 5, 3)
    assert (view.throughput, view.state, view.cache_tokens_left) == (3.5, ServerState.JOINING, 77)
    assert (view.addresses, view.public_name, view.version) == (a.addresses, "alice", "0.1.0")


def test_merge_keeps_one_view_per_server() -> None:
    view = SwarmView.from_block_records(6, records_of((pid(1), ann(0, 3)), (pid(2), ann(2, 6, throughput=2.0))))
    assert view.model == MODEL
    assert {p: (s.start, s.end) for p, s in view.servers.items()} == {pid(1): (0, 3), pid(2): (2, 6)}
    assert view.block_throughput() == [1.0, 1.0, 3.0, 2.0, 2.0, 2.0]
    assert view.block_coverage() == [1, 1, 2, 1, 1, 1]


def test_merge_drops_records_that_do_not_fit_their_key_or_model() -> None:
    records = records_of((pid(1), ann(0, 2)))
    records[4] = {pid(2): ann(0, 2), pid(3): ann(4, 5, model="other-model")}  # found under a block it lacks
    records[5] = {pid(4): ann(5, 9)}  # reaches past the model's 6 blocks
    view = SwarmView.from_block_records(6, records, model=MODEL)
    assert set(view.servers) == {pid(1)}


def test_merge_infers_the_majority_model_when_not_given() -> None:
    records = records_of((pid(1), ann(0, 4)), (pid(2), ann(4, 5, model="other")))
    view = SwarmView.from_block_records(5, records)
    assert view.model == MODEL
    assert set(view.servers) == {pid(1)}


def test_conflicting_announcements_of_one_peer_resolve_to_the_most_seen() -> None:
    old, new = ann(0, 4, state=ServerState.JOINING), ann(0, 4, state=ServerState.ONLINE)
    records = {0: {pid(1): old}, 1: {pid(1): new}, 2: {pid(1): new}, 3: {pid(1): new}}
    view = SwarmView.from_block_records(4, records)
    assert view.servers[pid(1)].state == ServerState.ONLINE
    tie = {0: {pid(1): old}, 1: {pid(1): new}}  # one each: the first seen in block order wins
    assert SwarmView.from_block_records(4, tie).servers[pid(1)].state == ServerState.JOINING


def test_empty_records_give_an_empty_view() -> None:
    view = SwarmView.from_block_records(3, {})
    assert view.servers == {} and view.model is None
    assert view.block_throughput() == [0.0, 0.0, 0.0]
    assert view.uncovered_blocks() == [(0, 3)]


def test_states_filter_throughput_and_coverage() -> None:
    view = SwarmView.from_block_records(6, records_of(
        (pid(1), ann(0, 2)), (pid(2), ann(2, 4, state=ServerState.JOINING)),
        (pid(3), ann(4, 6, state=ServerState.OFFLINE)),
    ))
    assert view.block_throughput() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert view.block_throughput(states=(ServerState.ONLINE,)) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert view.uncovered_blocks() == [(2, 6)]  # ONLINE only by default: a joining server cannot serve yet
    assert view.uncovered_blocks(states=(ServerState.ONLINE, ServerState.JOINING)) == [(4, 6)]


def test_uncovered_runs_are_maximal() -> None:
    view = SwarmView.from_block_records(10, records_of((pid(1), ann(1, 3)), (pid(2), ann(3, 5)), (pid(3), ann(8, 9))))
    assert view.uncovered_blocks() == [(0, 1), (5, 8), (9, 10)]


def test_without_and_with_server_leave_the_original_untouched() -> None:
    view = SwarmView.from_block_records(4, records_of((pid(1), ann(0, 4))))
    extra = ServerView.from_announcement(pid(2), ann(1, 2))
    assert set(view.with_server(extra).servers) == {pid(1), pid(2)}
    assert view.without(pid(1)).servers == {}
    assert set(view.servers) == {pid(1)}


def test_view_rejects_servers_outside_the_model() -> None:
    with pytest.raises(ValueError):
        SwarmView.from_servers(3, [ServerView.from_announcement(pid(1), ann(2, 4))])
    with pytest.raises(ValueError):
        SwarmView(0, {})


def test_runs_where() -> None:
    assert runs_where([]) == []
    assert runs_where([True, True, False, True]) == [(0, 2), (3, 4)]
    assert runs_where([False, False]) == []


@pytest.mark.parametrize(("runs", "text"), [
    ([(12, 15)], "blocks 12-14"),
    ([(3, 4)], "block 3"),
    ([(0, 2), (5, 6)], "blocks 0-1 and 5"),
    ([(0, 1), (3, 4), (7, 10)], "blocks 0, 3 and 7-9"),
    ([], "no blocks"),
])
def test_describe_runs(runs: list[tuple[int, int]], text: str) -> None:
    assert describe_runs(runs) == text


def test_merge_of_group_keys_keeps_announcements_that_overlap_their_group() -> None:
    spans = {pid(1): ann(6, 10), pid(2): ann(0, 3), pid(3): ann(12, 14), pid(4): ann(12, 14)}
    records = {
        (0, 8): {pid(1): spans[pid(1)], pid(2): spans[pid(2)], pid(3): spans[pid(3)]},  # pid 3: not in 0-7
        (8, 14): {pid(1): spans[pid(1)], pid(4): spans[pid(4)]},
        (14, 20): {pid(5): ann(14, 15)},  # a key past the model's 14 blocks
    }
    view = SwarmView.from_key_records(14, records, model=MODEL)
    assert {p: (s.start, s.end) for p, s in view.servers.items()} == {
        pid(1): (6, 10), pid(2): (0, 3), pid(4): (12, 14)
    }
    assert view.block_coverage() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]


def test_a_lookup_skips_announcements_it_refuses_and_keeps_the_rest() -> None:
    def record(seed: bytes, value: bytes) -> Record:
        return Record.create(Identity.from_seed(seed), key=dht_key(f"{MODEL}.0:8"), value=value,
                             expires_at=2e9, seq=1)

    newer = unpackb(ann(0, 6).to_bytes())
    newer["v"], newer["b"]["q"] = Announcement.VERSION + 1, "a field added later"  # read: the unknown field is ignored
    broken = unpackb(ann(0, 6).to_bytes())
    broken["v"] = Announcement.VERSION + 1
    del broken["b"]["m"]  # refused: a newer version without a field this one needs
    good, read, refused = (record(b"good", ann(0, 6).to_bytes()), record(b"newer", packb(newer)),
                           record(b"broken", packb(broken)))

    class FakeDHT:
        async def get_many(self, keys: object) -> dict:
            return {f"{MODEL}.0:8": {r.peer_id: r for r in (good, read, refused)}}

    view = asyncio.run(fetch_swarm(FakeDHT(), MODEL, 6))  # type: ignore[arg-type]
    assert set(view.servers) == {good.peer_id, read.peer_id}

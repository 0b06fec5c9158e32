# The merged view of one model's swarm, built from the announcements found under its DHT keys.
#
# Invariants:
# - Pure data: no I/O, no clock, no randomness; the daemon, the client and the churn simulator build it the same way.
# - Every ServerView in a SwarmView has 0 <= start < end <= num_blocks and belongs to the view's model.
# - One ServerView per peer id: when a peer's announcements disagree (a re-announcement still propagating), the one
#   seen under the most keys wins; ties go to the one first seen in ascending block order.
# - Per-block sums use a fixed server order (sorted by peer id), so equal inputs give bit-identical floats.
from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from petalnode.dht import Announcement, ServerState
from petalnode.identity import PeerId

SERVING_STATES: tuple[ServerState, ...] = (ServerState.ONLINE, ServerState.JOINING)
"""States that count for placement: a joining server is about to host its blocks (Petals counts it too)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerView:
    """One server as the swarm sees it: blocks [start, end) at `throughput` decode steps/s through ONE block."""

    peer_id: PeerId
    start: int
    end: int
    throughput: float
    state: ServerState
    cache_tokens_left: int
    addresses: tuple[str, ...]
    public_name: str | None
    version: str
    adapters: tuple[str, ...] = ()
    # The content digest of the weights of [start, end) it announced (None: an older server, or still joining).
    span_digest: bytes | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"server block range [{self.start}, {self.end}) is empty or negative")

    @classmethod
    def from_announcement(cls, peer_id: PeerId, announcement: Announcement) -> ServerView:
        return cls(
            peer_id=peer_id, start=announcement.start_block, end=announcement.end_block,
            throughput=announcement.throughput, state=announcement.state,
            cache_tokens_left=announcement.cache_tokens_left, addresses=announcement.addresses,
            public_name=announcement.public_name, version=announcement.version,
            adapters=announcement.adapters, span_digest=announcement.span_digest,
        )

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SwarmView:
    """All servers of one model that a lookup found, keyed by peer id."""

    num_blocks: int
    servers: Mapping[PeerId, ServerView]
    model: str | None = None

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"a model has at least one block, got num_blocks={self.num_blocks}")
        for peer_id, server in self.servers.items():
            if server.peer_id != peer_id or server.end > self.num_blocks:
                raise ValueError(f"server {peer_id} [{server.start}, {server.end}) does not fit the view")

    @classmethod
    def from_servers(cls, num_blocks: int, servers: Iterable[ServerView], *, model: str | None = None) -> SwarmView:
        return cls(num_blocks, {s.peer_id: s for s in servers}, model)

    @classmethod
    def from_block_records(
        cls,
        num_blocks: int,
        records: Mapping[int, Mapping[PeerId, Announcement]],
        *,
        model: str | None = None,
    ) -> SwarmView:
        """Merge per-block lookups (block index -> {peer id -> announcement}); see `from_key_records`."""
        return cls.from_key_records(num_blocks, {(b, b + 1): found for b, found in records.items()}, model=model)

    @classmethod
    def from_key_records(
        cls,
        num_blocks: int,
        records: Mapping[tuple[int, int], Mapping[PeerId, Announcement]],
        *,
        model: str | None = None,
    ) -> SwarmView:
        """Merge DHT lookups of a model's keys into one view.

        Args:
            num_blocks: the model's number of blocks.
            records: the blocks [first, end) a key covers -> {peer id -> announcement found under that key}.
            model: the model name the keys were built from; announcements for another model are dropped. When
                None, the name most announcements carry is used (first seen wins a tie).

        Announcements are dropped when their range misses the blocks of the key they were found under (a stale
        or lying record), or when it reaches past `num_blocks` (a server of a different model build).
        """
        found: list[tuple[PeerId, Announcement]] = [
            (peer_id, ann)
            for first, end in sorted(records)
            for peer_id, ann in records[(first, end)].items()
            if 0 <= first < end <= num_blocks and ann.start_block < end and first < ann.end_block <= num_blocks
        ]
        if model is None and found:
            model = Counter(ann.model for _, ann in found).most_common(1)[0][0]
        # Counter keeps first-insertion order, and most_common is stable, so ties go to the first seen.
        seen: dict[PeerId, Counter[Announcement]] = {}
        for peer_id, ann in found:
            if ann.model == model:
                seen.setdefault(peer_id, Counter())[ann] += 1
        servers = [ServerView.from_announcement(p, next(iter(c)) if len(c) == 1 else c.most_common(1)[0][0])
                   for p, c in seen.items()]
        return cls.from_servers(num_blocks, servers, model=model)

    def without(self, peer_id: PeerId) -> SwarmView:
        """The view as if `peer_id` had left (used to ask "where would I go?")."""
        return SwarmView(self.num_blocks, {p: s for p, s in self.servers.items() if p != peer_id}, self.model)

    def with_server(self, server: ServerView) -> SwarmView:
        """The view with `server` added or replaced."""
        return SwarmView(self.num_blocks, {**self.servers, server.peer_id: server}, self.model)

    def block_throughput(self, states: Collection[ServerState] = SERVING_STATES) -> list[float]:
        """Summed throughput of the servers in `states`, per block."""
        totals = [0.0] * self.num_blocks
        for peer_id in sorted(self.servers):
            server = self.servers[peer_id]
            if server.state in states:
                for block in range(server.start, server.end):
                    totals[block] += server.throughput
        return totals

    def block_coverage(self, states: Collection[ServerState] = SERVING_STATES) -> list[int]:
        """Number of servers in `states` per block."""
        counts = [0] * self.num_blocks
        for server in self.servers.values():
            if server.state in states:
                for block in range(server.start, server.end):
                    counts[block] += 1
        return counts

    def uncovered_blocks(self, states: Collection[ServerState] = (ServerState.ONLINE,)) -> list[tuple[int, int]]:
        """Maximal [start, end) runs of blocks that no server in `states` hosts."""
        return runs_where([count == 0 for count in self.block_coverage(states)])


def runs_where(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of consecutive True entries."""
    runs: list[tuple[int, int]] = []
    run_start: int | None = None
    for i, flag in enumerate([*flags, False]):
        if flag and run_start is None:
            run_start = i
        elif not flag and run_start is not None:
            runs.append((run_start, i))
            run_start = None
    return runs


def describe_runs(runs: Iterable[tuple[int, int]]) -> str:
    """Human text for block runs, inclusive as users count: [(12, 15)] -> "blocks 12-14", [(3, 4)] -> "block 3"."""
    parts = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in runs]
    if not parts:
        return "no blocks"
    if len(parts) == 1:
        return f"block {parts[0]}" if "-" not in parts[0] else f"blocks {parts[0]}"
    return "blocks " + ", ".join(parts[:-1]) + " and " + parts[-1]

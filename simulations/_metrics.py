# What the churn simulator measures, kept apart from how it drives the swarm.
#
# Invariants:
# - Ground truth (which servers are alive, online and reachable, and which blocks they host) comes from the
#   simulator's own bookkeeping, never from the DHT: the DHT is what is being measured.
# - Coverage is integrated exactly between updates (piecewise constant), from `start` on; the simulator updates
#   it at every event that can change it (join, leave, crash, partition, heal) and on a periodic tick (to catch
#   moves the node makes by itself).
# - Every number in the summary is derived from the raw records here, so it can be re-checked by hand.
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationRecord:
    client: int
    index: int
    started: float
    ended: float = 0.0
    outcome: str = "running"  # completed | failed | hung | crashed
    identical: bool = False
    reroutes: int = 0
    error: str | None = None
    coverage_ok: bool = True  # every block had a live, reachable server for the whole generation

    @property
    def duration(self) -> float:
        return self.ended - self.started


class CoverageTracker:
    """Integrates, over virtual time, how many blocks had no live online server."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.counts = [0] * num_blocks
        self.start: float | None = None
        self.last = 0.0
        self.uncovered_block_s = 0.0
        self.any_uncovered_s = 0.0
        self.per_block_uncovered_s = [0.0] * num_blocks
        self.gaps: list[list[float]] = []  # [start, end] of every period with some block uncovered
        self.min_servers_per_block_s = 0.0  # integral of min(counts), for the mean redundancy

    def begin(self, now: float) -> None:
        self.start = self.last = now
        if min(self.counts) == 0:
            self.gaps.append([now, float("inf")])

    def update(self, now: float, counts: list[int]) -> None:
        if self.start is not None:
            dt = now - self.last
            uncovered = [b for b, c in enumerate(self.counts) if c == 0]
            self.uncovered_block_s += dt * len(uncovered)
            for b in uncovered:
                self.per_block_uncovered_s[b] += dt
            if uncovered:
                self.any_uncovered_s += dt
            self.min_servers_per_block_s += dt * min(self.counts)
            was_gap, is_gap = bool(uncovered), min(counts) == 0
            if is_gap and not was_gap:
                self.gaps.append([now, float("inf")])
            elif was_gap and not is_gap and self.gaps:
                self.gaps[-1][1] = now
        self.last = now
        self.counts = list(counts)

    def full(self) -> bool:
        return min(self.counts) > 0

    def overlaps_gap(self, start: float, end: float) -> bool:
        return any(g0 <= end and start <= g1 for g0, g1 in self.gaps)

    def summary(self, end: float) -> dict[str, Any]:
        self.update(end, self.counts)
        span = max(1e-9, end - (self.start if self.start is not None else end))
        return {
            "uncovered_block_seconds": round(self.uncovered_block_s, 1),
            "seconds_with_any_block_uncovered": round(self.any_uncovered_s, 1),
            "fully_covered_share": round(1.0 - self.any_uncovered_s / span, 4),
            "worst_block_uncovered_seconds": round(max(self.per_block_uncovered_s), 1),
            "gaps": len(self.gaps),
            "mean_servers_on_weakest_block": round(self.min_servers_per_block_s / span, 2),
        }


@dataclass
class LookupStats:
    """Swarm lookups through the real client DHT, checked against ground truth per block."""

    lookups: int = 0
    failed_lookups: int = 0
    block_checks: int = 0
    block_successes: int = 0
    true_servers: int = 0
    found_true_servers: int = 0
    online_found: int = 0
    stale_online_found: int = 0  # announced ONLINE, but the server is dead or gone

    def summary(self) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "failed_lookups": self.failed_lookups,
            "block_success_rate": _ratio(self.block_successes, self.block_checks),
            "server_recall": _ratio(self.found_true_servers, self.true_servers),
            "stale_online_share": _ratio(self.stale_online_found, self.online_found),
        }


@dataclass
class ServerStats:
    started: int = 0
    start_failures: int = 0
    crashes: int = 0
    graceful_leaves: int = 0
    partitions: int = 0
    server_seconds: float = 0.0
    block_loads: int = 0
    servers_that_loaded: int = 0
    blocks_hosted: list[int] = field(default_factory=list)
    start_errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        hours = self.server_seconds / 3600
        return {
            "started": self.started,
            "start_failures": self.start_failures,
            "start_errors": dict(self.start_errors.most_common(5)),
            "crashes": self.crashes,
            "graceful_leaves": self.graceful_leaves,
            "partitions": self.partitions,
            "server_hours": round(hours, 2),
            "block_loads": self.block_loads,
            "block_loads_per_server_hour": _ratio(self.block_loads, hours),
            "reloads_beyond_first_per_server_hour": _ratio(self.block_loads - self.servers_that_loaded, hours),
            "mean_blocks_per_server": round(statistics.fmean(self.blocks_hosted), 2) if self.blocks_hosted else None,
        }


def summarize_generations(records: Iterable[GenerationRecord]) -> dict[str, Any]:
    records = list(records)
    done = [r for r in records if r.outcome != "running"]
    completed = [r for r in done if r.outcome == "completed"]
    identical = [r for r in completed if r.identical]
    covered = [r for r in done if r.coverage_ok]
    covered_bad = [r for r in covered if not (r.outcome == "completed" and r.identical)]
    clean = sorted(r.duration for r in completed if r.reroutes == 0)
    median_clean = statistics.median(clean) if clean else None
    added = sorted(r.duration - median_clean for r in completed if r.reroutes > 0) if median_clean is not None else []
    reroutes = [r.reroutes for r in done]
    return {
        "generations": {
            "started": len(records),
            "finished": len(done),
            "completed": len(completed),
            "failed": sum(r.outcome == "failed" for r in done),
            "hung": sum(r.outcome == "hung" for r in done),
            "crashed": sum(r.outcome == "crashed" for r in done),
            "identical_share_of_completed": _ratio(len(identical), len(completed)),
            "mismatched": len(completed) - len(identical),
            "while_fully_covered": len(covered),
            "while_fully_covered_completed_identical": len(covered) - len(covered_bad),
            "while_fully_covered_share_ok": _ratio(len(covered) - len(covered_bad), len(covered)),
            "errors": dict(Counter(_error_kind(r.error) for r in done if r.error).most_common(8)),
            "longest_s": round(max((r.duration for r in done), default=0.0), 2),
        },
        "reroutes": {
            "total": sum(reroutes),
            "per_generation": _ratio(sum(reroutes), len(reroutes)),
            "generations_with_reroutes": sum(1 for n in reroutes if n),
            "max_in_one_generation": max(reroutes, default=0),
        },
        "latency_s": {
            "median_without_reroutes": _round(median_clean),
            "p95_without_reroutes": _round(_quantile(clean, 0.95)),
            "mean_added_by_reroutes": _round(statistics.fmean(added)) if added else None,
            "p95_added_by_reroutes": _round(_quantile(added, 0.95)),
            "max_added_by_reroutes": _round(added[-1]) if added else None,
        },
        "bad_generations_while_covered": [asdict(r) for r in covered_bad[:10]],
    }


def _error_kind(error: str) -> str:
    return error.split(":", 1)[0]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ratio(a: float, b: float) -> float | None:
    return None if not b else round(a / b, 4)

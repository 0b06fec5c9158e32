"""A lying, slow server for the measured-speed tests: a normal `petalnode join` that overstates its speed.

Run as `python -m tests.slow_liar_server --claim-factor 1000 --delay 0.03 --count-file F -- join ...`: the real
`petalnode` command with the real Node, except that the throughput it announces is `--claim-factor` times what it
measured, and every inference step it computes first sleeps `--delay` seconds (so it is really slower than an
honest server on the same machine). Its outputs are right. After each step it writes how many inference steps it
has computed to `--count-file`, so a test can tell which generations went through it.

A test-only tool: nothing in petalnode imports it, and no product flag does any of this.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from petalnode.cli import main
from petalnode.node import PRIORITY_INFERENCE, ComputeExecutor, TorchBackend


def patch(claim_factor: float, delay_s: float, count_file: Path | None) -> None:
    real_throughput = TorchBackend.throughput
    real_run = ComputeExecutor.run
    steps = 0

    def lying_throughput(self: TorchBackend, *args: Any, **kwargs: Any) -> float:
        return claim_factor * real_throughput(self, *args, **kwargs)

    async def slow_run(
        self: ComputeExecutor, fn: Callable[[], Any], *, priority: int = PRIORITY_INFERENCE,
        peer: Hashable | None = None,
    ) -> Any:
        nonlocal steps
        if priority == PRIORITY_INFERENCE:
            await asyncio.sleep(delay_s)
        result = await real_run(self, fn, priority=priority, peer=peer)
        if priority == PRIORITY_INFERENCE:
            steps += 1
            if count_file is not None:
                _write_count(count_file, steps)
        return result

    TorchBackend.throughput = lying_throughput  # type: ignore[method-assign]
    ComputeExecutor.run = slow_run  # type: ignore[method-assign]


def _write_count(path: Path, steps: int) -> None:
    # Replaced whole, so a reader never sees a half-written number (a small blocking write: a test tool).
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(steps))
    os.replace(tmp, path)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.slow_liar_server")
    parser.add_argument("--claim-factor", type=float, required=True, help="announce this times the real speed")
    parser.add_argument("--delay", type=float, required=True, help="seconds slept before each inference step")
    parser.add_argument("--count-file", type=Path, help="where to write the number of inference steps computed")
    parser.add_argument("petalnode_args", nargs=argparse.REMAINDER, help="-- then the `petalnode` arguments")
    args = parser.parse_args(argv)
    rest = args.petalnode_args[1:] if args.petalnode_args[:1] == ["--"] else args.petalnode_args
    patch(args.claim_factor, args.delay, args.count_file)
    return main(rest)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

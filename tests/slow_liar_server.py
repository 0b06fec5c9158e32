"""A lying, slow server for the measured-speed tests: a normal `petalnode join` that overstates its speed.

Run as `python -m tests.slow_liar_server --claim-factor 1000 --delay 0.03 --count-file F -- join ...`: the real
`petalnode` command with the real Node, except that the throughput it announces is `--claim-factor` times what it
measured, and every inference step it computes first sleeps `--delay` seconds (so it is really slower than an
honest server on the same machine). Its outputs are right. After each step it writes how many inference steps it
has computed to `--count-file`, so a test can tell which generations went through it. `start_liar` starts it as
one more server of a `LocalSwarm` (tests and benchmarks/measured_speed.py).

A test-only tool: nothing in petalnode imports it, and no product flag does any of this.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from petalnode.cli import main
from petalnode.node import PRIORITY_INFERENCE, ComputeExecutor, LocalSwarm, SwarmProcess, TorchBackend
from petalnode.node._local_swarm import STARTUP_TIMEOUT_S


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


def start_liar(
    swarm: LocalSwarm, model_dir: Path, count_file: Path, *, blocks: str, claim_factor: float, delay_s: float,
    threads: int = 1,
) -> SwarmProcess:
    """Start this script as one more server of `swarm` (stopped with it); returns once it announced itself."""
    ready, log_path = swarm.workdir / "liar.ready", swarm.workdir / "liar.log"
    command = [
        sys.executable, "-m", "tests.slow_liar_server", "--claim-factor", str(claim_factor), "--delay", str(delay_s),
        "--count-file", str(count_file), "--",
        "join", "--bootstrap", swarm.bootstrap_address, "--listen", "127.0.0.1:0", "--blocks", blocks,
        "--model", str(model_dir), "--threads", str(threads), "--ready-file", str(ready),
    ]
    with open(log_path, "wb") as log_handle:
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=swarm.env, cwd=Path(__file__).resolve().parent.parent)
    liar = SwarmProcess("server", process, ready, log_path)
    swarm.servers.append(liar)
    liar.wait_ready(time.monotonic() + STARTUP_TIMEOUT_S)
    return liar


def liar_steps(count_file: Path) -> int:
    """Inference steps the liar computed so far."""
    return int(count_file.read_text()) if count_file.exists() else 0


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

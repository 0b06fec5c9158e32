"""What a `petalnode bootstrap` process costs to start: launch-to-ready time, RSS and PSS once it is ready.

Starts a real bootstrap (`python -m petalnode.cli bootstrap --listen 127.0.0.1:0 --ready-file F`) several times
in a row, measures the time from spawning the process to its ready file appearing, reads VmRSS from
/proc/PID/status and Pss from /proc/PID/smaps_rollup once it is ready (Linux only), then stops it with SIGTERM.
Also reports whether libtorch is mapped into it (/proc/PID/maps), i.e. whether torch was imported. Prints one JSON
object with every run and the medians. tests/cli/test_cli_bootstrap_imports.py checks the same from inside the
process.
Run: python benchmarks/bootstrap_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0


def _kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in {path}")


def one_run(workdir: Path, index: int) -> dict:
    ready = workdir / f"bootstrap-{index}.ready"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "petalnode.cli", "bootstrap", "--listen", "127.0.0.1:0", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"bootstrap exited with {process.returncode} before it was ready")
            if time.perf_counter() - started > STARTUP_TIMEOUT_S:
                raise RuntimeError("bootstrap not ready in time")
            time.sleep(0.005)
        ready_s = time.perf_counter() - started
        proc = Path(f"/proc/{process.pid}")
        rss_kib = _kib(proc / "status", "VmRSS")
        pss_kib = _kib(proc / "smaps_rollup", "Pss")
        libtorch = "libtorch" in (proc / "maps").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    return {"ready_s": round(ready_s, 3), "rss_mib": round(rss_kib / 1024, 1), "pss_mib": round(pss_kib / 1024, 1),
            "libtorch_mapped": libtorch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="petalnode-bootstrap-bench-") as tmp:
        runs = [one_run(Path(tmp), i) for i in range(args.runs)]
    print(json.dumps({
        "benchmark": "bootstrap_start",
        "runs": runs,
        "median_ready_s": statistics.median(r["ready_s"] for r in runs),
        "median_rss_mib": statistics.median(r["rss_mib"] for r in runs),
        "median_pss_mib": statistics.median(r["pss_mib"] for r in runs),
    }, indent=2))


if __name__ == "__main__":
    main()

"""The swarm health page in a real headless Chromium, against a real swarm with a hole in it.

One swarm of real processes: a bootstrap, server A on blocks 0-2 and server B on blocks 2-3 of the 6-block tiny
model (coverage 1, 1, 2, 1, 0, 0), B also serving the page (`join --monitor-port`), plus a standalone
`petalnode monitor` process. The test checks /api/health (broken, blocks 4-5), that `status --json` prints the
same report, that the monitor process never loaded torch, then screenshots the page in Chromium and reads the
block cells' colours out of the PNG, in order, comparing them with the JSON. Finally server A leaves and the
monitor's report follows (the live refresh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from petalnode.monitor import COVERAGE_COLOURS
from petalnode.monitor._page import CELL_WIDTH_PX
from petalnode.node import LocalSwarm
from tests.png_reader import hex_rgb, read_png

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# Chromium stays offline and quiet: no sync, updates, QUIC or first-run work; a throwaway profile each time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,600"]
# Fields that are measurements or stamps of one look at the swarm, not its state.
VOLATILE = {"generated_at", "measured_by", "rtt_ms"}

MONITOR_DRIVER = r"""
import json, sys, threading, time
from pathlib import Path

ready, report, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]

def watch():
    while not ready.exists():
        time.sleep(0.01)
    report.write_text(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))

threading.Thread(target=watch, daemon=True).start()
from petalnode.cli import main
sys.exit(main(argv + ["--ready-file", str(ready)]))
"""


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _health(url: str) -> dict:
    status, body = _get(url + "api/health")
    assert status == 200, body
    return json.loads(body)


def _wait_for(url: str, predicate, what: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    report = _health(url)
    while not predicate(report):
        assert time.monotonic() < deadline, f"{what} not seen within {timeout_s} s: {json.dumps(report)[:2000]}"
        time.sleep(0.25)
        report = _health(url)
    return report


def _stable(report: dict) -> object:
    """The report without its stamps and measurements (see VOLATILE)."""
    if isinstance(report, dict):
        return {k: _stable(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [_stable(v) for v in report]
    return report


def _chromium(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="petalnode-chromium-") as profile:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def cell_colours(png: Path, num_cells: int) -> list[int]:
    """The coverage class (index into COVERAGE_COLOURS) of each block cell, left to right, read from the pixels.

    Finds the screenshot row crossing the most cell-wide runs of a palette colour (the bar), then reads those runs
    in order; legend swatches and text are narrower than a cell and never count.
    """
    width, height, rows = read_png(png)
    image = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(height, width, 3).astype(np.int16)
    palette = [np.array(hex_rgb(c), dtype=np.int16) for c in COVERAGE_COLOURS]
    best: list[int] = []
    for y in range(height):
        classes = np.full(width, -1)
        for i, colour in enumerate(palette):
            classes[np.all(np.abs(image[y] - colour) <= 2, axis=1)] = i
        runs, x = [], 0
        while x < width:
            end = x
            while end < width and classes[end] == classes[x]:
                end += 1
            if classes[x] >= 0 and abs((end - x) - CELL_WIDTH_PX) <= 2:
                runs.append(int(classes[x]))
            x = end
        if len(runs) > len(best):
            best = runs
        if len(best) == num_cells:
            break
    return best


@pytest.fixture(scope="module")
def swarm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"PETALNODE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with LocalSwarm(str(tiny_model_dir), threads=1, env=env) as swarm:  # the bootstrap; servers start together
        swarm.add_server(["--blocks", "0:3"], wait=False)
        page_server = swarm.add_server(["--blocks", "2:4", "--monitor-port", "0", "--monitor-refresh", "0.5"],
                                       wait=False)
        work = tmp_path_factory.mktemp("monitor")
        ready, modules = work / "monitor.ready", work / "modules.json"
        monitor = subprocess.Popen(
            [sys.executable, "-c", MONITOR_DRIVER, str(ready), str(modules), "monitor", "--bootstrap",
             swarm.bootstrap_address, "--listen", "127.0.0.1:0", "--port", "0", "--model", str(tiny_model_dir),
             "--refresh", "0.5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env})
        # A bootstrap of its own with the page, for a model it has no weights of (NAME=BLOCKS): nobody serves it.
        lone = subprocess.Popen(
            [sys.executable, "-m", "petalnode.cli", "bootstrap", "--listen", "127.0.0.1:0", "--ready-file",
             str(work / "lone.ready"), "--monitor-port", "0", "--monitor-model", "elsewhere=3"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for server in swarm.servers:
            server.wait_ready(time.monotonic() + 120)
        try:
            deadline = time.monotonic() + 60
            while not modules.exists():
                assert monitor.poll() is None, monitor.communicate()[1]
                assert time.monotonic() < deadline, "monitor not ready in time"
                time.sleep(0.05)
            time.sleep(0.05)
            while not (work / "lone.ready").exists():
                assert lone.poll() is None, lone.communicate()[1]
                assert time.monotonic() < deadline, "lone bootstrap not ready in time"
                time.sleep(0.05)
            yield {"swarm": swarm, "page_server": page_server, "monitor": json.loads(ready.read_text())["monitor"],
                   "heavy": json.loads(modules.read_text()),
                   "lone": json.loads((work / "lone.ready").read_text())["monitor"]}
        finally:
            for process in (monitor, lone):
                process.terminate()
                process.communicate(timeout=30)
    assert monitor.returncode == 0 and lone.returncode == 0


def two_servers_online(report: dict) -> bool:
    servers = report["models"][0]["servers"]
    return len(servers) == 2 and all(s["state"] == "online" and s["probe"] == "ok" for s in servers)


def test_health_json_names_the_gap_and_status_json_prints_the_same(swarm: dict, tiny_model_dir: Path) -> None:
    monitor_url, page_url = swarm["monitor"], swarm["page_server"].info["monitor"]
    # Started first: it spends seconds importing torch while the checks below run (both servers are announced).
    status = subprocess.Popen([sys.executable, "-m", "petalnode.cli", "status", "--json", "--bootstrap",
                               swarm["swarm"].bootstrap_address, "--model", str(tiny_model_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert swarm["heavy"] == [], "petalnode monitor loaded torch"
    report = _wait_for(monitor_url, two_servers_online, "both servers online")
    model = report["models"][0]
    assert model["model"] == tiny_model_dir.name and model["num_blocks"] == 6
    assert (report["healthy"], model["healthy"], model["uncovered"]) == (False, False, [[4, 6]])
    assert model["headline"] == "broken: blocks 4-5 have no server"
    coverage = [b["servers"] for b in model["blocks"]]
    assert coverage == [1, 1, 2, 1, 0, 0]
    rows = model["servers"]
    assert [r["blocks"] for r in rows] == ["0-2", "2-3"]
    for row in rows:
        assert row["reachability"] == "direct" and row["dtype"] == "float32" and 0 < row["rtt_ms"] < 2000
        assert row["cache_tokens_left"] > 0 and row["version"] and row["throughput"] > 0
    assert model["blocks"][2]["throughput"] == pytest.approx(rows[0]["throughput"] + rows[1]["throughput"])

    # The page served by a block server (join --monitor-port) sees the same swarm; so does `status --json`.
    assert _stable(_wait_for(page_url, two_servers_online, "both servers (server's page)")) == _stable(report)
    stdout, stderr = status.communicate(timeout=120)
    assert status.returncode == 1, stderr  # not servable
    printed = json.loads(stdout)
    assert _stable(printed) == _stable(_health(monitor_url))
    assert all(row["rtt_ms"] is not None for row in printed["models"][0]["servers"])  # it measured too

    # Bad requests get clear HTTP errors and the page keeps serving.
    assert _get(monitor_url + "no-such-page")[0] == 404
    assert _get(monitor_url + "api/health?x=%ff")[0] == 200
    request = urllib.request.Request(monitor_url + "api/health", data=b"{", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    assert _get(monitor_url)[0] == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_page_in_chromium_shows_the_json_coverage(swarm: dict, tmp_path: Path) -> None:
    monitor_url = swarm["monitor"]
    model = _wait_for(monitor_url, two_servers_online, "both servers online")["models"][0]
    coverage = [b["servers"] for b in model["blocks"]]
    dom = _chromium(monitor_url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "broken: blocks 4-5 have no server" in dom.stdout
    assert dom.stdout.count('<div class="cell ') == 6 and "float32" in dom.stdout

    shot = tmp_path / "health.png"
    result = _chromium(monitor_url, f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    keep = os.environ.get("PETALNODE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    colours = cell_colours(shot, 6)
    assert colours == [min(n, len(COVERAGE_COLOURS) - 1) for n in coverage], "cells on screen differ from JSON"
    assert sum(1 for c in colours if c == 0) == sum(b - a for a, b in model["uncovered"]) == 2


def test_a_bootstrap_serves_the_page_for_a_model_it_has_no_weights_of(swarm: dict) -> None:
    report = _health(swarm["lone"])
    assert [(m["model"], m["num_blocks"], m["servers"]) for m in report["models"]] == [("elsewhere", 3, [])]
    assert report["models"][0]["headline"] == "broken: blocks 0-2 have no server" and report["healthy"] is False
    assert _get(swarm["lone"])[0] == 200


def test_the_report_follows_a_server_leaving(swarm: dict) -> None:
    first = swarm["swarm"].servers[0]
    first.stop()  # SIGTERM: it announces OFFLINE
    first.process.wait(20)
    report = _wait_for(swarm["monitor"], lambda r: r["models"][0]["uncovered"] == [[0, 2], [4, 6]],
                       "blocks 0-1 uncovered after server A left")
    assert report["models"][0]["headline"] == "broken: blocks 0-1 and 4-5 have no server"
    assert [b["servers"] for b in report["models"][0]["blocks"]] == [0, 0, 1, 1, 0, 0]

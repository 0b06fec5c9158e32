"""A real `petalnode bootstrap` process never imports torch or transformers (it hosts no blocks).

The check runs inside the bootstrap process: a small driver starts the CLI entry point exactly as
`python -m petalnode.cli bootstrap ...` does, and a watcher thread records `sys.modules` once the node has
written its ready file (so the node is fully started: DHT joined, RPC and signaling listening).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DRIVER = r"""
import json, sys, threading, time
from pathlib import Path

ready, report = Path(sys.argv[1]), Path(sys.argv[2])

def watch():
    while not ready.exists():
        time.sleep(0.01)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    ours = sorted(m for m in sys.modules if m.startswith("petalnode"))
    report.write_text(json.dumps({"heavy": heavy, "petalnode": ours}))

threading.Thread(target=watch, daemon=True).start()
from petalnode.cli import main
sys.exit(main(["bootstrap", "--listen", "127.0.0.1:0", "--ready-file", str(ready)]))
"""


def test_bootstrap_process_does_not_import_torch(tmp_path: Path) -> None:
    ready, report = tmp_path / "bootstrap.ready", tmp_path / "modules.json"
    process = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready), str(report)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not report.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "bootstrap not ready in time"
            time.sleep(0.05)
        time.sleep(0.05)  # the report is written in one call; let it land
        modules = json.loads(report.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    # It is the real bootstrap path: the daemon, the node, the DHT and signaling are all loaded.
    for name in ("petalnode.cli._daemon", "petalnode.node._node", "petalnode.dht._node", "petalnode.node._signaling"):
        assert name in modules["petalnode"]
    assert modules["heavy"] == []
    assert json.loads(ready.read_text())["address"].startswith("tcp://127.0.0.1:")

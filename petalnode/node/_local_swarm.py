"""An embedded swarm on this machine: a bootstrap and a few servers as real processes on loopback.

`petalnode generate` without `--bootstrap` uses it so a fresh machine still works; tests and benchmarks use it to
get a real swarm (real processes, real sockets) with one call. Every process is started with a ready file it
writes once it is listening (bootstrap) or serving (server), so startup waits on facts, not sleeps; stopping
sends SIGTERM (servers announce offline) and then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from petalnode.errors import ConfigError, InvalidStateError, LocalSwarmError, StartupTimeoutError

# A timeout of its own (not in `Timeouts`): it bounds loading a model in a child process, a harness concern.
STARTUP_TIMEOUT_S = 180.0
# A grace period (SIGTERM, then SIGKILL), not a timeout of a phase.
STOP_GRACE_S = 10.0


@dataclass
class SwarmProcess:
    role: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    info: dict = field(default_factory=dict)

    def wait_ready(self, deadline: float) -> dict:
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                try:
                    self.info = json.loads(self.ready_file.read_text())
                    return self.info
                except ValueError:
                    pass  # being written
            if self.process.poll() is not None:
                raise LocalSwarmError(
                    f"{self.role} process exited with code {self.process.returncode} before it was ready:\n"
                    + self.log_file.read_text()[-3000:]
                )
            time.sleep(0.05)
        raise StartupTimeoutError(f"{self.role} process not ready within {STARTUP_TIMEOUT_S:.0f} s:\n"
                             + self.log_file.read_text()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


class LocalSwarm:
    """`with LocalSwarm(model, spans=[(0, 10), (10, 20), (20, 30)]) as swarm: swarm.bootstrap_address`."""

    def __init__(
        self,
        model: str | None = None,
        *,
        spans: list[tuple[int, int]] | None = None,
        threads: int | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        swarm_key: Path | str | None = None,
    ) -> None:
        # swarm_key: a key file; every process of this swarm (bootstrap and servers) gets `--swarm-key` with it.
        self.model = model
        self.swarm_key = swarm_key
        self.spans = spans or []
        self.threads = threads
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="petalnode-swarm-")
        self.workdir = workdir or Path(self._tmp.name)
        self.bootstrap: SwarmProcess | None = None
        self.servers: list[SwarmProcess] = []

    @property
    def bootstrap_address(self) -> str:
        if self.bootstrap is None:
            raise InvalidStateError('cannot get the bootstrap address of a local swarm in state "not started"')
        return self.bootstrap.info["address"]

    def _spawn(self, role: str, args: list[str]) -> SwarmProcess:
        index = len(self.servers) + (self.bootstrap is not None)
        ready = self.workdir / f"{role}-{index}.ready"
        log_path = self.workdir / f"{role}-{index}.log"
        command = [sys.executable, "-m", "petalnode.cli", *args, "--ready-file", str(ready)]
        if self.swarm_key is not None:
            command += ["--swarm-key", str(self.swarm_key)]
        log_handle = open(log_path, "wb")  # closed below; the child keeps its copy
        process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, env=self.env,
                                   stdin=subprocess.DEVNULL)
        log_handle.close()
        return SwarmProcess(role, process, ready, log_path)

    def start(self) -> LocalSwarm:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            self.bootstrap = self._spawn("bootstrap", ["bootstrap", "--listen", "127.0.0.1:0"])
            self.bootstrap.wait_ready(deadline)
            for start, end in self.spans:
                self.add_server(["--blocks", f"{start}:{end}"], wait=False)
            for server in self.servers:
                server.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def add_server(self, args: list[str], *, wait: bool = True) -> SwarmProcess:
        command = ["join", "--bootstrap", self.bootstrap_address, "--listen", "127.0.0.1:0", *args]
        if self.model:
            command += ["--model", self.model]
        if self.threads:
            command += ["--threads", str(self.threads)]
        server = self._spawn("server", command + self.extra_args)
        self.servers.append(server)
        if wait:
            server.wait_ready(time.monotonic() + STARTUP_TIMEOUT_S)
        return server

    def stop(self) -> None:
        everyone = [*self.servers, *([self.bootstrap] if self.bootstrap else [])]
        for proc in everyone:
            proc.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in everyone:
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.process.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def parse_span(text: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ConfigError(f"not a block range: {text!r} (expected START:END, e.g. 10:20)") from None
    if not 0 <= start < end:
        raise ConfigError(f"not a block range: {text!r} (need 0 <= START < END)")
    return start, end

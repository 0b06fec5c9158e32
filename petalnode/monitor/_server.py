"""The health page's HTTP server: FastAPI routes served by uvicorn inside the node's own event loop.

GET / is the page (`_page.render_page`), GET /api/health the same report as JSON (node/_health.py). A background
task refreshes the report every `refresh_s`; requests only read the latest one, so a page view never triggers DHT
lookups or probes (a busy page cannot flood the swarm). A failed refresh keeps the last report and says why.

Why FastAPI + uvicorn: both are dependencies already (the OpenAI-compatible API uses them), uvicorn's `Server`
runs in an existing event loop, and FastAPI's routing is all we need; no HTTP code is written here.
uvicorn installs SIGINT/SIGTERM handlers while it serves; the daemon owns those signals (it announces OFFLINE
before exiting), so `_EmbeddedServer` leaves them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn

from petalnode._lifecycle import TaskOwner
from petalnode.errors import ClosedResourceError, ConfigError, InvalidStateError, PetalnodeError
from petalnode.monitor._page import render_page

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 10.0  # Petals' monitor refreshes every 60 s; a node's own page can afford fresher data
STARTUP_TIMEOUT_S = 10.0  # uvicorn binding an already-open socket takes milliseconds
SHUTDOWN_TIMEOUT_S = 5.0
REFRESH_TIMEOUT_S = 60.0  # a refresh is a few DHT lookups (5 s RPC timeouts) and probes (2 s each, concurrent)

Collect = Callable[[], Awaitable[dict[str, Any]]]


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that does not take over the process's signal handlers (see the module docstring)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_app(monitor: HealthMonitor) -> Any:
    """The FastAPI application: two read-only routes over `monitor`'s latest report."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="petalnode swarm health", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        report = monitor.report
        if report is None:
            return HTMLResponse("<!doctype html><p>petalnode: no swarm view yet: "
                                f"{monitor.error or 'first lookup running'}</p>", status_code=503)
        return HTMLResponse(render_page(report, refresh_s=monitor.refresh_s, error=monitor.error),
                            headers={"Cache-Control": "no-store"})

    @app.get("/api/health")
    async def health() -> JSONResponse:
        report = monitor.report
        if report is None:
            return JSONResponse({"error": monitor.error or "first lookup running"}, status_code=503)
        body = report if monitor.error is None else {**report, "error": monitor.error}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return app


class HealthMonitor:
    """Serves the health page on host:port and keeps its report fresh; `async with` or start()/aclose().

    Args:
        collect: returns a fresh health report (node/_health_probe.py `collect_health` over the node's DHT/RPC).
        host, port: where to listen (port 0: any free port; see `url`).
        refresh_s: seconds between refreshes.
    """

    def __init__(self, collect: Collect, *, host: str = "127.0.0.1", port: int = 0,
                 refresh_s: float = DEFAULT_REFRESH_S) -> None:
        if not refresh_s > 0:
            raise ConfigError(f"the health page refresh period must be positive, got {refresh_s}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"the health page port must be 0-65535, got {port}")
        self._collect = collect
        self.host = host
        self.port = port
        self.refresh_s = refresh_s
        self.report: dict[str, Any] | None = None
        self.error: str | None = None
        self._tasks = TaskOwner("health monitor")
        self._server: Any = None
        self._socket: socket.socket | None = None
        self._started = False
        self._closed = False

    @property
    def url(self) -> str:
        if self._socket is None:
            raise InvalidStateError("the health page is not listening")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"

    async def __aenter__(self) -> HealthMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def refresh(self) -> None:
        """One refresh; a swarm error is kept in `error` (shown on the page) instead of raised."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_S):
                self.report = await self._collect()
            self.error = None
        except TimeoutError:
            log.warning("health page refresh took over %s s", REFRESH_TIMEOUT_S)
            self.error = f"the swarm lookup took over {REFRESH_TIMEOUT_S:.0f} s"
        except (PetalnodeError, OSError) as e:
            log.warning("health page refresh failed: %s", e)
            self.error = str(e)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def start(self) -> None:
        """Take a first look at the swarm, then listen. Raises ConfigError if host:port cannot be bound."""
        if self._closed:
            raise ClosedResourceError("the health monitor is closed")
        if self._started:
            raise InvalidStateError("the health monitor is already started")
        self._started = True
        await self.refresh()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"the health page cannot listen on {self.host}:{self.port}: {e}") from e
        self._socket = sock
        config = uvicorn.Config(build_app(self), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = _EmbeddedServer(config)
        serving = self._tasks.spawn(self._server.serve(sockets=[sock]), name="http")
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not self._server.started:
                if serving.done():
                    await self.aclose()
                    raise ConfigError(f"the health page server stopped while starting: {serving.exception()}")
                await asyncio.sleep(0.01)
        self._tasks.spawn(self._refresh_loop(), name="refresh")

    async def aclose(self) -> None:
        """Stop serving (open connections get SHUTDOWN_TIMEOUT_S) and stop refreshing. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.should_exit = True
            serving = [t for t in self._tasks if t.get_name().endswith("http")]
            if serving:  # uvicorn closes its listener and idle connections; the rest are cancelled below
                await asyncio.wait(serving, timeout=SHUTDOWN_TIMEOUT_S)
        await self._tasks.aclose()
        if self._socket is not None:
            self._socket.close()

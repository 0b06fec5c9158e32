"""The swarm health page: any node serves it (`petalnode monitor`, or `--monitor-port` on bootstrap/join).

The report itself is computed in `petalnode.node` (`collect_health`, `model_health`), so `petalnode status --json`
prints exactly what GET /api/health serves; this package only renders it as HTML and serves it over HTTP.
"""

from petalnode.monitor._page import COVERAGE_COLOURS, coverage_class, render_page
from petalnode.monitor._server import DEFAULT_REFRESH_S, HealthMonitor, build_app

__all__ = [
    "COVERAGE_COLOURS",
    "DEFAULT_REFRESH_S",
    "HealthMonitor",
    "build_app",
    "coverage_class",
    "render_page",
]

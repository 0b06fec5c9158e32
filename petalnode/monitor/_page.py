# The health page as one server-rendered HTML document (inline CSS, no build step, no external assets).
#
# Invariants:
# - Pure: the health report (node/_health.py) in, a str out. Every value from the swarm (names, versions,
#   adapters, addresses: announced by strangers) is HTML-escaped; nothing is put into the script.
# - One `.cell` per block, in block order, coloured by how many online servers cover it (COVERAGE_COLOURS; the
#   browser test counts these colours in a screenshot). Cells hold no text, so each is one solid rectangle.
# - Live refresh: a short inline script re-fetches the page every `refresh_s` and swaps the body in, so the server
#   stays the only renderer; without JavaScript a <noscript> meta refresh does the same.
from __future__ import annotations

import time
from html import escape
from typing import Any

COVERAGE_COLOURS: tuple[str, ...] = ("#d73027", "#fdae61", "#a6d96a", "#1a9850")
"""Cell colour by online servers covering the block: 0 (red: broken), 1 (orange: no redundancy), 2, 3 or more."""
CELL_WIDTH_PX = 28
CELL_HEIGHT_PX = 44
DASH = "\u2014"

_CSS = f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; margin: 0 0 8px; }}
h2 {{ font-size: 16px; margin: 20px 0 6px; }}
.headline {{ font-size: 18px; font-weight: 600; padding: 6px 10px; display: inline-block; border-radius: 4px; }}
.healthy {{ background: #e4f4e4; color: #17612c; }}
.broken {{ background: #fbe3e1; color: #8f1d15; }}
.bar {{ display: flex; flex-wrap: wrap; gap: 3px; margin: 6px 0; }}
.cell {{ width: {CELL_WIDTH_PX}px; height: {CELL_HEIGHT_PX}px; }}
.c0 {{ background: {COVERAGE_COLOURS[0]}; }} .c1 {{ background: {COVERAGE_COLOURS[1]}; }}
.c2 {{ background: {COVERAGE_COLOURS[2]}; }} .c3 {{ background: {COVERAGE_COLOURS[3]}; }}
.legend span {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }}
table {{ border-collapse: collapse; margin-top: 6px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }}
th {{ background: #f4f4f4; }}
.muted {{ color: #777; font-size: 12px; }}
"""

_SCRIPT = """
// Re-render from the server every few seconds without a full reload (see the page module's header).
setInterval(async () => {
  try {
    const reply = await fetch(location.href, {cache: "no-store"});
    if (reply.ok) document.body.replaceWith(new DOMParser().parseFromString(await reply.text(), "text/html").body);
  } catch (e) { /* the node is restarting: try again next time */ }
}, REFRESH_MS);
"""


def coverage_class(servers: int) -> str:
    """The CSS class of a block cell covered by `servers` online servers."""
    return f"c{min(servers, len(COVERAGE_COLOURS) - 1)}"


def _cell(block: dict[str, Any]) -> str:
    joining = f", {block['joining']} joining" if block["joining"] else ""
    title = f"block {block['index']}: {block['servers']} online servers, {block['throughput']:.0f} steps/s{joining}"
    return (f'<div class="cell {coverage_class(block["servers"])}" data-block="{block["index"]}" '
            f'data-servers="{block["servers"]}" title="{escape(title)}"></div>')


def _text(value: object) -> str:
    return DASH if value is None or value == "" or value == [] else escape(str(value))


def _row(server: dict[str, Any]) -> str:
    reach = server["reachability"] + (f" via {server['relay']}" if server["relay"] else "")
    rtt = "unreachable" if server["probe"] == "failed" else (
        None if server["rtt_ms"] is None else f"{server['rtt_ms']:.1f} ms")
    cells = [server["name"], server["peer_short"], server["state"], server["blocks"], f"{server['throughput']:.0f}",
             server["cache_tokens_left"], server["version"], ", ".join(server["adapters"]), reach, rtt,
             server["dtype"]]
    return "<tr>" + "".join(f"<td>{_text(c)}</td>" for c in cells) + "</tr>"


def _model_section(model: dict[str, Any]) -> str:
    state = "healthy" if model["healthy"] else "broken"
    blocks = model["blocks"]
    servers = model["servers"]
    rows = "".join(_row(s) for s in servers) or f'<tr><td colspan="11">no servers announce {escape(model["model"])}'
    legend = "".join(f'<span class="c{i}"></span>{label}'
                     for i, label in enumerate(("no server", "1 server", "2 servers", "3+ servers")))
    return f"""
<section class="model" data-model="{escape(model['model'])}">
<h2>{escape(model['model'])}: {model['num_blocks']} blocks, {len(servers)} servers</h2>
<div class="headline {state}" data-healthy="{str(model['healthy']).lower()}">{escape(model['headline'])}</div>
<div class="bar">{''.join(_cell(b) for b in blocks)}</div>
<div class="muted">blocks 0-{model['num_blocks'] - 1}, coloured by online servers covering them
<span class="legend">{legend}</span></div>
<table>
<tr><th>name</th><th>peer</th><th>state</th><th>blocks</th><th>steps/s/block</th><th>cache tokens left</th>
<th>version</th><th>adapters</th><th>reachability</th><th>round trip</th><th>dtype</th></tr>
{rows}
</table>
</section>"""


def render_page(report: dict[str, Any], *, refresh_s: float, error: str | None = None) -> str:
    """The whole page for a health report (node/_health.py `health_report`); `error`: why it may be stale."""
    overall = "healthy" if report["healthy"] else "broken"
    problem = f'<p class="broken headline">last refresh failed: {escape(error)}</p>' if error else ""
    refresh_ms = max(1, round(refresh_s * 1000))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>petalnode swarm health: {overall}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="{max(1, round(refresh_s))}"></noscript>
<style>{_CSS}</style>
<script>{_SCRIPT.replace("REFRESH_MS", str(refresh_ms))}</script>
</head><body>
<h1>petalnode swarm health</h1>
{problem}{''.join(_model_section(m) for m in report['models'])}
<p class="muted">Round trip: an `info` call from this node ({escape(report['measured_by'][:12])}) to each online
server, every refresh; {DASH} when not measured (not online, or no usable address). Updated
{time.strftime("%H:%M:%S UTC", time.gmtime(report["generated_at"]))}, every {refresh_s:g} s; JSON at
<a href="/api/health">/api/health</a>.</p>
</body></html>
"""

"""The swarm health report (node/_health.py) and its page (monitor/_page.py): pure, no sockets."""

from __future__ import annotations

import json
import re

import pytest

from petalnode.dht import ServerState
from petalnode.identity import Identity
from petalnode.monitor import COVERAGE_COLOURS, coverage_class, render_page
from petalnode.node import Probe, ProbeStatus, ServerView, SwarmView, health_report, model_health
from petalnode.node._health import headline, reachability

RELAY_ADDRESS = "webrtc://198.51.100.7:31337/{}"


def server(start: int, end: int, *, state: ServerState = ServerState.ONLINE, throughput: float = 10.0,
           address: str | None = None, name: str | None = None, adapters: tuple[str, ...] = ()) -> ServerView:
    peer_id = Identity.generate().peer_id
    return ServerView(peer_id=peer_id, start=start, end=end, throughput=throughput, state=state,
                      cache_tokens_left=512, addresses=((address or "tcp://127.0.0.1:4000/{}").format(peer_id),),
                      public_name=name, version="0.1.0", adapters=adapters)


def ok(rtt_s: float) -> Probe:
    return Probe(status=ProbeStatus.OK, rtt_s=rtt_s, dtype="float32", sessions=0)


def test_gaps_are_contiguous_zero_based_ranges_as_status_prints_them() -> None:
    view = SwarmView.from_servers(50, [server(0, 47), server(49, 50), server(10, 20)])
    health = model_health(view, "m")
    assert health["healthy"] is False
    assert health["uncovered"] == [[47, 49]]
    assert health["headline"] == "broken: blocks 47-48 have no server"
    assert [b["servers"] for b in health["blocks"][8:22]] == [1, 1] + [2] * 10 + [1, 1]
    assert health["blocks"][12]["throughput"] == 20.0
    assert headline([(3, 4)]) == "broken: block 3 has no server"
    assert headline([(0, 2), (5, 6)]) == "broken: blocks 0-1 and 5 have no server"
    assert model_health(SwarmView.from_servers(4, [server(0, 4)]), "m")["headline"] == "healthy"


def test_only_online_reachable_servers_cover_blocks() -> None:
    joining, offline = server(0, 2, state=ServerState.JOINING), server(2, 4, state=ServerState.OFFLINE)
    dead, alive, unprobed = server(4, 6), server(6, 7), server(7, 8)
    view = SwarmView.from_servers(8, [joining, offline, dead, alive, unprobed])
    health = model_health(view, "m", {dead.peer_id: Probe(status=ProbeStatus.FAILED), alive.peer_id: ok(0.0123)})
    assert health["uncovered"] == [[0, 6]]
    assert [b["joining"] for b in health["blocks"]] == [1, 1, 0, 0, 0, 0, 0, 0]
    rows = {r["start"]: r for r in health["servers"]}
    assert (rows[4]["probe"], rows[4]["counted"], rows[4]["rtt_ms"]) == ("failed", False, None)
    assert (rows[6]["probe"], rows[6]["rtt_ms"], rows[6]["dtype"]) == ("ok", 12.3, "float32")
    assert (rows[7]["probe"], rows[7]["counted"], rows[7]["rtt_ms"]) == ("not probed", True, None)


def test_rows_are_sorted_and_carry_what_servers_announce() -> None:
    relayed = server(2, 4, address=RELAY_ADDRESS, name="bob", adapters=("a1",))
    view = SwarmView.from_servers(4, [relayed, server(0, 2)])
    rows = model_health(view, "m")["servers"]
    assert [r["blocks"] for r in rows] == ["0-1", "2-3"]
    assert rows[1]["peer_short"] == str(relayed.peer_id)[:12] and rows[1]["name"] == "bob"
    assert (rows[1]["reachability"], rows[1]["relay"], rows[1]["adapters"]) == ("relayed", "198.51.100.7:31337", ["a1"])
    assert (rows[0]["reachability"], rows[0]["relay"]) == ("direct", None)
    assert reachability(server(0, 1, address="not an address")) == ("unknown", None)


def test_report_is_json_and_healthy_only_if_every_model_is() -> None:
    good = model_health(SwarmView.from_servers(2, [server(0, 2)]), "a")
    bad = model_health(SwarmView.from_servers(2, [server(0, 1)]), "b")
    report = health_report([good, bad], generated_at=1.5, measured_by="me")
    assert json.loads(json.dumps(report)) == report
    assert report["healthy"] is False and [m["model"] for m in report["models"]] == ["a", "b"]
    assert health_report([good], generated_at=1.5, measured_by="me")["healthy"] is True


def test_probe_has_a_round_trip_exactly_when_it_succeeded() -> None:
    with pytest.raises(ValueError):
        Probe(status=ProbeStatus.FAILED, rtt_s=0.1)
    with pytest.raises(ValueError):
        Probe(status=ProbeStatus.OK)


def test_page_has_one_coloured_cell_per_block_and_escapes_announced_text() -> None:
    evil = server(0, 2, name="<script>alert(1)</script>")
    view = SwarmView.from_servers(6, [evil, server(1, 3), server(1, 2), server(2, 3)])
    report = health_report([model_health(view, "m<b>", {evil.peer_id: ok(0.002)})], generated_at=0.0,
                           measured_by="x" * 32)
    page = render_page(report, refresh_s=5)
    cells = re.findall(r'<div class="cell (c\d)" data-block="(\d+)" data-servers="(\d+)"', page)
    assert [(int(b), int(n)) for _, b, n in cells] == [(0, 1), (1, 3), (2, 2), (3, 0), (4, 0), (5, 0)]
    assert [c for c, _, _ in cells] == ["c1", "c3", "c2", "c0", "c0", "c0"]
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "m&lt;b&gt;" in page and "broken: blocks 3-5 have no server" in page
    assert "2.0 ms" in page and "\u2014" in page  # measured and unmeasured round trips
    assert "setInterval" in page and 'http-equiv="refresh" content="5"' in page
    assert coverage_class(7) == "c3" and len(COVERAGE_COLOURS) == 4
    for i, colour in enumerate(COVERAGE_COLOURS):
        assert f".c{i} {{ background: {colour}; }}" in page


def test_monitored_models_by_name_and_blocks_or_from_a_local_config(tmp_path) -> None:
    from petalnode.cli._monitor import model_spec
    from petalnode.errors import ConfigError, ModelNotFoundError

    assert model_spec("SmolLM2-135M-Instruct=30") == ("SmolLM2-135M-Instruct", 30)
    with pytest.raises(ConfigError, match="at least one block"):
        model_spec("m=0")
    with pytest.raises(ModelNotFoundError):
        model_spec("no-such-model")
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 6}')
    (model / "model.safetensors").write_bytes(b"")
    assert model_spec(str(model)) == ("tiny", 6)

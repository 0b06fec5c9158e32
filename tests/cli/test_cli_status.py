"""The identity columns of `petalnode status` (`cli/_status.py` `render_status`; no processes needed)."""

from __future__ import annotations

import hashlib

from petalnode.cli._status import render_status
from petalnode.compute import span_digest
from petalnode.dht import ServerState
from petalnode.identity import Identity
from petalnode.node import ServerView, SwarmView

OURS = [hashlib.sha256(f"ours-{i}".encode()).digest() for i in range(4)]
THEIRS = [hashlib.sha256(b"theirs").digest(), *OURS[1:]]


def ours(start: int, end: int) -> bytes:
    return span_digest(OURS.__getitem__, start, end)


def server(start: int, end: int, digest: bytes | None) -> ServerView:
    return ServerView(peer_id=Identity.generate().peer_id, start=start, end=end, throughput=10.0,
                      state=ServerState.ONLINE, cache_tokens_left=100, addresses=("tcp://127.0.0.1:1",),
                      public_name=None, version="0.1.0", span_digest=digest)


def test_status_shows_short_digests_and_counts_only_servers_with_our_weights() -> None:
    other = span_digest(THEIRS.__getitem__, 0, 2)
    view = SwarmView.from_servers(4, [server(0, 2, other), server(2, 4, ours(2, 4)), server(0, 1, None)])
    lines = render_status(view, "tiny", "tcp://127.0.0.1:1", span_digest=ours).splitlines()
    assert lines[0] == f"model tiny (digest {ours(0, 4).hex()[:12]}): 4 blocks, 3 servers"
    digests = {row.split()[0]: row.split()[3] for row in lines[2:5]}
    assert digests == {"0-1": f"OTHER:{other.hex()[:12]}", "2-3": ours(2, 4).hex()[:12], "0-0": "-"}
    assert "NOT SERVABLE: blocks 0-1 of tiny have no online server with these weights" in lines[5]
    # Without this machine's digests (no local copy) every online server counts, as before.
    plain = render_status(view, "tiny", "tcp://127.0.0.1:1")
    assert plain.splitlines()[0] == "model tiny: 4 blocks, 3 servers" and "OTHER" not in plain
    assert "servable: every block has at least one online server" in plain
    good = SwarmView.from_servers(4, [server(0, 4, ours(0, 4))])
    assert render_status(good, "tiny", "x", span_digest=ours).endswith("online server with these weights")

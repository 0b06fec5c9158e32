"""Routing by content identity (`node/_routing.py` `span_digest=`): same name, other weights, never routed through.

Kept apart from test_routing.py (route costs), which another change edits at the same time.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from petalnode.compute import span_digest
from petalnode.dht import ServerState
from petalnode.errors import NoRouteError
from petalnode.node._routing import choose_route, same_weights
from petalnode.node._swarm_view import ServerView, SwarmView
from tests.unit.test_routing import pid, spans

NUM_BLOCKS = 12
# Block digests of the client's model, and of a checkpoint of the same name whose block 5 differs.
OURS = [hashlib.sha256(f"ours-{i}".encode()).digest() for i in range(NUM_BLOCKS)]
THEIRS = [hashlib.sha256(f"theirs-{i}".encode()).digest() if i == 5 else d for i, d in enumerate(OURS)]


def ours(start: int, end: int) -> bytes:
    return span_digest(OURS.__getitem__, start, end)


def server(i: int, start: int, end: int, throughput: float = 100.0, *, blocks: list[bytes] | None = OURS,
           digest: bytes | None = None) -> ServerView:
    """A server announcing the digest of `blocks`' [start, end) (or `digest` if given; None for neither)."""
    if digest is None and blocks is not None:
        digest = span_digest(blocks.__getitem__, start, end)
    return ServerView(
        peer_id=pid(i), start=start, end=end, throughput=throughput, state=ServerState.ONLINE, cache_tokens_left=1000,
        addresses=(), public_name=None, version="0.1.0", span_digest=digest,
    )


def test_a_server_with_other_weights_is_never_used_however_fast() -> None:
    view = SwarmView.from_servers(NUM_BLOCKS, [server(1, 0, NUM_BLOCKS), server(2, 0, NUM_BLOCKS, 1e6, blocks=THEIRS)])
    assert spans(choose_route(view, rtt_s={})) == [(pid(2), 0, NUM_BLOCKS)]  # without the check: the fast one
    assert spans(choose_route(view, rtt_s={}, span_digest=ours)) == [(pid(1), 0, NUM_BLOCKS)]


def test_identity_is_per_span_so_a_server_outside_the_differing_block_is_fine() -> None:
    # Server 2 loaded the other checkpoint but hosts only blocks 6-11, which are identical in both.
    view = SwarmView.from_servers(NUM_BLOCKS, [server(1, 0, 6), server(2, 6, NUM_BLOCKS, blocks=THEIRS),
                                               server(3, 0, NUM_BLOCKS, 1e6, blocks=THEIRS)])
    assert spans(choose_route(view, rtt_s={}, span_digest=ours)) == [(pid(1), 0, 6), (pid(2), 6, NUM_BLOCKS)]


def test_servers_without_a_digest_or_with_one_for_another_range_are_ineligible() -> None:
    old = server(1, 0, NUM_BLOCKS, blocks=None)  # a VERSION 1 announcement
    shifted = server(2, 0, 8, digest=ours(0, NUM_BLOCKS))  # our weights' digest, but not of what it announces
    good = server(3, 0, NUM_BLOCKS, 1.0)
    assert not same_weights(old, ours) and not same_weights(shifted, ours) and same_weights(good, ours)
    view = SwarmView.from_servers(NUM_BLOCKS, [old, shifted, good])
    assert spans(choose_route(view, rtt_s={}, span_digest=ours)) == [(pid(3), 0, NUM_BLOCKS)]


def test_no_route_says_how_many_servers_have_other_weights() -> None:
    view = SwarmView.from_servers(NUM_BLOCKS, [
        server(1, 0, NUM_BLOCKS, blocks=THEIRS), server(2, 0, 8, blocks=None), server(3, 8, NUM_BLOCKS),
        dataclasses.replace(server(4, 0, 8), state=ServerState.JOINING),
    ], model="smol")
    with pytest.raises(NoRouteError) as info:
        choose_route(view, rtt_s={}, span_digest=ours)
    assert info.value.missing == [(0, 8)]
    assert str(info.value) == (
        "blocks 0-7 of smol have no server (servers there: 1 joining, 2 servers with other weights (their span "
        "digest differs from this client's copy of the model, or is missing))"
    )
    with pytest.raises(NoRouteError, match=r"\(servers there: 1 server with other weights"):
        choose_route(SwarmView.from_servers(4, [server(1, 0, 4, digest=bytes(32))]), rtt_s={}, span_digest=ours)

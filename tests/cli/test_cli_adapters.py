"""`petalnode join --adapters` parsing and the adapters column of `petalnode status` (no processes needed)."""

from __future__ import annotations

from petalnode.cli._main import build_parser
from petalnode.cli._status import render_status
from petalnode.dht import ServerState
from petalnode.identity import Identity
from petalnode.node import ServerView, SwarmView


def test_join_takes_several_adapters() -> None:
    args = build_parser().parse_args(["join", "--bootstrap", "tcp://127.0.0.1:1/x", "--adapters", "./my-lora",
                                      "chat=someone/chat-lora", "--blocks", "0:3"])
    assert args.adapters == ["./my-lora", "chat=someone/chat-lora"] and args.blocks == "0:3"
    assert build_parser().parse_args(["join", "--bootstrap", "tcp://127.0.0.1:1/x"]).adapters == []


def test_status_lists_each_servers_adapters() -> None:
    def server(start: int, end: int, adapters: tuple[str, ...]) -> ServerView:
        return ServerView(peer_id=Identity.generate().peer_id, start=start, end=end, throughput=10.0,
                          state=ServerState.ONLINE, cache_tokens_left=100, addresses=("tcp://127.0.0.1:1",),
                          public_name=None, version="0.1.0", adapters=adapters)

    view = SwarmView.from_servers(4, [server(0, 2, ("chat", "someone/code-lora")), server(2, 4, ())])
    lines = render_status(view, "tiny", "tcp://127.0.0.1:1").splitlines()
    assert lines[1].split()[-1] == "adapters"
    assert lines[2].split()[-1] == "chat,someone/code-lora" and lines[3].split()[-1] == "-"

"""Whose fault is it, end to end (in-process nodes on loopback, a tiny llama): a step past the session's
max_length is the client's and bans nobody; a server refusing valid steps is routed around."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from petalnode.compute import load_model_info
from petalnode.errors import BadRequestError, ShapeError
from petalnode.node import Node, ServeOptions, SwarmClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_client_faults_ban_nobody_and_a_refusing_server_is_routed_around(tiny_model_dir: Path) -> None:
    info = load_model_info(tiny_model_dir)
    bootstrap = Node()
    await bootstrap.start()
    servers = []
    client = None
    try:
        for _ in range(2):
            server = Node(bootstrap=[bootstrap.address],
                          serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, info.num_blocks)))
            await server.start()
            servers.append(server)
        client = SwarmClient(info.source.name, info.num_blocks, [bootstrap.address], listen_host="127.0.0.1")
        await client.start()
        torch.manual_seed(0)
        x = torch.randn(1, 8, info.hidden_size)
        reference_session = await client.open_session(8)
        reference = await reference_session.step(x, 0)
        await reference_session.aclose()

        session = await client.open_session(6)
        out = [await session.step(x[:, :4], 0)]
        with pytest.raises(BadRequestError, match="4 \\+ 4 tokens exceeds the session's max_length 6"):
            await session.step(x[:, 4:8])
        assert client.bans.banned() == set() and session.reroutes == 0
        out.append(await session.step(x[:, 4:5]))  # the session goes on where it was

        liar = next(s for s in servers if s.identity.peer_id == session.hops[0].peer_id)
        honest = next(s for s in servers if s is not liar)
        span = liar.hosted.span

        def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise ShapeError("refusing a valid step")

        span.forward_span = refuse
        out.append(await session.step(x[:, 5:6]))
        assert [h.peer_id for h in session.hops] == [honest.identity.peer_id] and session.reroutes == 1
        assert client.bans.banned() == {liar.identity.peer_id}
        torch.testing.assert_close(torch.cat(out, dim=1), reference[:, :6], rtol=1e-4, atol=1e-5)
        await session.aclose()
    finally:
        if client is not None:
            await client.aclose()
        for node in (*servers, bootstrap):
            await node.aclose()

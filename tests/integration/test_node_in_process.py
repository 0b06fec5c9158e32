"""`petalnode.node.Node` embedded in a program's own event loop: a bootstrap, two servers and a client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petalnode.client import AutoDistributedModelForCausalLM
from petalnode.compute import load_block_span, load_model_info, span_forward
from petalnode.dht import ServerState
from petalnode.errors import BadRequestError, OutOfCacheMemoryError
from petalnode.identity import PeerAddress
from petalnode.node import Node, RemoteBlockChain, ServeOptions, fetch_swarm
from petalnode.node._protocol import InferenceStep, OpenInference

pytestmark = pytest.mark.integration


async def _start_swarm(model_dir: Path, spans: list[tuple[int, int]], **serve) -> tuple[Node, list[Node]]:
    bootstrap = Node()
    await bootstrap.start()
    servers = []
    for start, end in spans:
        server = Node(bootstrap=[bootstrap.address], serve=ServeOptions(model=str(model_dir), blocks=(start, end),
                                                                       **serve))
        await server.start()
        servers.append(server)
    return bootstrap, servers


async def _stop(*nodes: Node) -> None:
    for node in nodes:
        await node.aclose()


async def test_library_swarm_generates_like_transformers(tiny_model_dir: Path) -> None:
    bootstrap, servers = await _start_swarm(tiny_model_dir, [(0, 3), (3, 6)])
    try:
        info = load_model_info(tiny_model_dir)
        view = await fetch_swarm(bootstrap.dht, info.source.name, info.num_blocks)
        assert {(s.start, s.end, s.state) for s in view.servers.values()} == {
            (0, 3, ServerState.ONLINE), (3, 6, ServerState.ONLINE)}

        def generate() -> torch.Tensor:
            model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model_dir,
                                                                    bootstrap=[str(bootstrap.address)])
            try:
                return model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=10, do_sample=False)
            finally:
                model.close()

        ours = await asyncio.to_thread(generate)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        assert torch.equal(ours, reference.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=10, do_sample=False))
        # Leaving announces OFFLINE: a reader that outlives the servers sees each of them as OFFLINE, not ONLINE.
        peers = {server.identity.peer_id for server in servers}
        await _stop(*servers)
        view = await fetch_swarm(bootstrap.dht, info.source.name, info.num_blocks)
        assert {peer: view.servers[peer].state for peer in peers} == dict.fromkeys(peers, ServerState.OFFLINE)
    finally:
        await _stop(*servers, bootstrap)
    assert all(node.state.value == "closed" for node in (*servers, bootstrap))


async def test_server_rejects_bad_requests_and_keeps_serving(tiny_model_dir: Path) -> None:
    bootstrap, servers = await _start_swarm(tiny_model_dir, [(0, 6)], cache_tokens_per_block=64)
    server = servers[0]
    address = server.address
    model = server.hosted.model
    try:
        rpc = bootstrap.rpc

        async def expect_error(opening: OpenInference, step: InferenceStep | None, error: type[Exception], match: str):
            stream = await rpc.open_stream(address, "inference")
            try:
                await stream.send(opening)
                if step is not None:
                    await stream.receive()
                    await stream.send(step)
                with pytest.raises(error, match=match):
                    await stream.receive(timeout_s=10)
            finally:
                await stream.aclose()

        good = OpenInference(model=model, start_block=0, end_block=6, max_length=16)
        await expect_error(OpenInference(model="other", start_block=0, end_block=6, max_length=8), None,
                           BadRequestError, "hosts model")
        await expect_error(OpenInference(model=model, start_block=2, end_block=9, max_length=8), None,
                           BadRequestError, "not inside")
        await expect_error(OpenInference(model=model, start_block=0, end_block=6, max_length=4096), None,
                           OutOfCacheMemoryError, "KV cache")
        await expect_error(good, InferenceStep(hidden=torch.zeros(1, 2, 63), start_position=0),
                           BadRequestError, "hidden states")
        await expect_error(good, InferenceStep(hidden=torch.zeros(1, 2, 64), start_position=5),
                           BadRequestError, "position 5")
        # Still serving, with all cache memory back.
        assert server._sessions is not None and len(server._sessions) == 0
        chain = await asyncio.to_thread(RemoteBlockChain.connect, load_model_info(tiny_model_dir),
                                        bootstrap=[PeerAddress.parse(str(bootstrap.address))])
        try:
            session = await asyncio.to_thread(chain.open_session, 8)
            out = await asyncio.to_thread(session.step, torch.randn(1, 3, 64))
            assert out.shape == (1, 3, 64)
            await asyncio.to_thread(session.close)
        finally:
            await asyncio.to_thread(chain.close)
    finally:
        await _stop(*servers, bootstrap)


async def test_rebalancing_fills_a_hole_and_a_stable_swarm_stays_put(tiny_model_dir: Path) -> None:
    bootstrap = Node()
    await bootstrap.start()
    options = ServeOptions(model=str(tiny_model_dir), num_blocks=2, join_jitter_s=0, rebalance_period_s=0.4)
    servers: list[Node] = []
    try:
        for seed in range(4):
            server = Node(bootstrap=[bootstrap.address], serve=ServeOptions(**{**options.__dict__, "seed": seed}))
            await server.start()
            servers.append(server)
        ranges = [(s.hosted.start, s.hosted.end) for s in servers]
        assert sorted(ranges[:3]) == [(0, 2), (2, 4), (4, 6)]
        await asyncio.sleep(2.0)  # about five rebalance checks each
        assert [s.reloads for s in servers] == [1, 1, 1, 1], "a stable swarm must not reload blocks"
        # The server alone on its blocks leaves; the duplicate moves into the hole.
        duplicate = ranges[3]
        leaving = next(s for s in servers[:3] if (s.hosted.start, s.hosted.end) != duplicate)
        await leaving.aclose()
        info = load_model_info(tiny_model_dir)
        async with asyncio.timeout(20):
            while True:
                view = await fetch_swarm(bootstrap.dht, info.source.name, info.num_blocks)
                if not view.uncovered_blocks():
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # and it stays that way: nobody else moves
        live = [s for s in servers if s is not leaving]
        assert sorted((s.hosted.start, s.hosted.end) for s in live) == [(0, 2), (2, 4), (4, 6)]
        assert sorted(s.reloads for s in live) == [1, 1, 2]
    finally:
        await _stop(*servers, bootstrap)


async def test_full_server_is_skipped_for_one_with_room(tiny_model_dir: Path) -> None:
    """A server whose cache cannot hold the session says so; the client opens it on another server instead."""
    bootstrap = Node()
    await bootstrap.start()
    small = Node(bootstrap=[bootstrap.address],
                 serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 6), cache_tokens_per_block=16))
    big = Node(bootstrap=[bootstrap.address],
               serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 6), cache_tokens_per_block=512))
    await small.start()
    await big.start()
    try:
        info = load_model_info(tiny_model_dir)
        chain = await asyncio.to_thread(RemoteBlockChain.connect, info, bootstrap=[str(bootstrap.address)])
        try:
            for _ in range(3):  # whatever the route's random tie-break, the session lands on the big server
                session = await asyncio.to_thread(chain.open_session, 200)
                assert [hop.peer_id for hop in session.session.hops] == [big.identity.peer_id]
                out = await asyncio.to_thread(session.step, torch.randn(1, 150, 64))
                assert out.shape == (1, 150, 64)
                await asyncio.to_thread(session.close)
        finally:
            await asyncio.to_thread(chain.close)
    finally:
        await _stop(small, big, bootstrap)


@pytest.mark.parametrize("corruption", ["wrong_shape", "non_finite"])
async def test_malformed_replies_count_as_failures(tiny_model_dir: Path, corruption: str) -> None:
    """A server that answers with the wrong shape or NaNs is banned and replaced; the output stays exact."""
    bootstrap, (evil,) = await _start_swarm(tiny_model_dir, [(0, 6)])
    honest = None
    span = evil.hosted.span
    honest_forward = span.forward_span

    def corrupt(hidden, cache, positions):
        out = honest_forward(hidden, cache, positions)
        if positions.shape[1] == 1 and int(positions[0, 0]) >= 6:  # misbehave once decoding is under way
            return out[:, :, :-1] if corruption == "wrong_shape" else torch.full_like(out, float("nan"))
        return out

    span.forward_span = corrupt
    try:
        info = load_model_info(tiny_model_dir)
        model = await asyncio.to_thread(AutoDistributedModelForCausalLM.from_pretrained, tiny_model_dir,
                                        bootstrap=[str(bootstrap.address)])
        # The session is routed while the evil server is the only one; the honest one arrives afterwards.
        context = model.inference_session(max_length=20)
        session = await asyncio.to_thread(context.__enter__)
        honest = Node(bootstrap=[bootstrap.address], serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 6)))
        await honest.start()
        prompt = torch.tensor([[9, 8, 7, 6, 5]])
        try:
            out = await asyncio.to_thread(model.generate, prompt, max_new_tokens=10, do_sample=False)
            reroutes, route = session.reroutes, [hop.peer_id for hop in session.session.hops]
        finally:
            await asyncio.to_thread(context.__exit__, None, None, None)
            await asyncio.to_thread(model.close)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        assert torch.equal(out, reference.generate(prompt, max_new_tokens=10, do_sample=False))
        assert reroutes == 1 and route == [honest.identity.peer_id]
        assert info.num_blocks == 6
    finally:
        await _stop(*([honest] if honest else []), evil, bootstrap)


async def test_bf16_servers_compute_in_bf16_and_the_client_reads_them_exactly(tiny_model_dir: Path) -> None:
    # On CPUs with fast bf16 the automatic dtype is bf16: the swarm must then equal the same bf16 spans run
    # locally (hidden states cross the wire losslessly), not silently fp32 and not something else.
    spans = [(0, 3), (3, 6)]
    bootstrap, servers = await _start_swarm(tiny_model_dir, spans, dtype="bf16")
    try:
        assert all(server.hosted.dtype is torch.bfloat16 for server in servers)
        info = load_model_info(tiny_model_dir)
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with torch.no_grad():
            hidden = reference.model.embed_tokens(ids)
            for start, end in spans:
                span = load_block_span(info, start, end, dtype=torch.bfloat16)
                hidden = span_forward(span, hidden.to(torch.bfloat16)).to(torch.float32)
            expected = reference.lm_head(reference.model.norm(hidden))
            fp32_logits = reference(ids).logits

        def forward() -> torch.Tensor:
            model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model_dir,
                                                                    bootstrap=[str(bootstrap.address)])
            try:
                with torch.no_grad():
                    return model(ids).logits
            finally:
                model.close()

        logits = await asyncio.to_thread(forward)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        assert (logits - fp32_logits).abs().max() > 1e-4  # really bf16, not fp32
        torch.testing.assert_close(logits, fp32_logits, rtol=0.1, atol=0.1)  # and close to the model
    finally:
        await _stop(*servers, bootstrap)

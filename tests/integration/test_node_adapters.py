"""Servers with LoRA adapters (in-process `Node`s on loopback): they load, announce and reload them on a move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from petalnode.compute import active_adapter, attach_adapters, load_block_span, load_lora_adapter, load_model_info
from petalnode.dht import ServerState
from petalnode.errors import ConfigError, ModelNotFoundError
from petalnode.node import Node, NodeState, ServeOptions, fetch_swarm
from tests.tiny_models import build_lora_adapter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served-adapters")
    return (build_lora_adapter(root / "tiny-lora", tiny_model_dir, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "down_proj"]),
            build_lora_adapter(root / "other", tiny_model_dir, seed=1, r=2, lora_alpha=4, use_rslora=True,
                               target_modules=["o_proj", "up_proj"]))


def _span_output(span: torch.nn.Module, adapter: str | None) -> torch.Tensor:
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), active_adapter(adapter):
        return span.forward_span(hidden, None, torch.arange(5)[None])


def _reference(model_dir: Path, adapter_dir: Path, start: int, end: int) -> torch.Tensor:
    info = load_model_info(model_dir)
    span = load_block_span(info, start, end)
    attach_adapters(span, [load_lora_adapter(adapter_dir, info, start, end, name="ref")])
    return _span_output(span, "ref")


async def test_server_announces_its_adapters_and_reloads_them_when_it_moves(
    tiny_model_dir: Path, adapter_dirs: tuple[Path, Path]
) -> None:
    first, second = adapter_dirs
    bootstrap = Node()
    await bootstrap.start()
    server = Node(bootstrap=[bootstrap.address], serve=ServeOptions(
        model=str(tiny_model_dir), blocks=(0, 3), adapters=(str(first), f"team/second={second}")))
    try:
        await server.start()
        info = load_model_info(tiny_model_dir)
        view = await fetch_swarm(bootstrap.dht, info.source.name, info.num_blocks)
        (seen,) = view.servers.values()
        assert (seen.start, seen.end, seen.state) == (0, 3, ServerState.ONLINE)
        assert seen.adapters == ("team/second", "tiny-lora")
        assert server.hosted.adapters == {"tiny-lora", "team/second"}
        # The served span really applies them.
        span = server.hosted.span
        assert torch.equal(_span_output(span, "tiny-lora"), _reference(tiny_model_dir, first, 0, 3))
        assert torch.equal(_span_output(span, "team/second"), _reference(tiny_model_dir, second, 0, 3))

        await server._move_to(3, 6)  # what rebalancing does when the swarm gains from it
        view = await fetch_swarm(bootstrap.dht, info.source.name, info.num_blocks)
        assert [(s.start, s.end, s.adapters) for s in view.servers.values()] == [
            (3, 6, ("team/second", "tiny-lora"))]
        assert torch.equal(_span_output(server.hosted.span, "tiny-lora"), _reference(tiny_model_dir, first, 3, 6))
    finally:
        await server.aclose()
        await bootstrap.aclose()


@pytest.mark.parametrize(("adapters", "error", "match"), [
    (("/no/such/adapter",), ModelNotFoundError, "adapter '/no/such/adapter' is not available on this machine"),
    (("name=",), ConfigError, "must be PATH_OR_HUB_ID or NAME=PATH_OR_HUB_ID"),
    (tuple(f"/a{i}" for i in range(9)), ConfigError, "at most 8 adapters"),
])
async def test_a_bad_adapter_fails_the_start_clearly(tiny_model_dir: Path, adapters: tuple[str, ...],
                                                     error: type[Exception], match: str) -> None:
    bootstrap = Node()
    await bootstrap.start()
    server = Node(bootstrap=[bootstrap.address],
                  serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 3), adapters=adapters))
    try:
        with pytest.raises(error, match=match):
            await server.start()
        assert server.state is NodeState.CLOSED and server.hosted is None
        # A load that failed after JOINING was announced withdraws it; clients never wait on this server.
        info = load_model_info(tiny_model_dir)
        view = await fetch_swarm(bootstrap.dht, info.source.name, info.num_blocks)
        assert all(seen.state is ServerState.OFFLINE for seen in view.servers.values())
    finally:
        await server.aclose()
        await bootstrap.aclose()


async def test_a_pickled_adapter_fails_the_start(tiny_model_dir: Path, adapter_dirs: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text((adapter_dirs[0] / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded, whatever it holds")
    bootstrap = Node()
    await bootstrap.start()
    server = Node(bootstrap=[bootstrap.address],
                  serve=ServeOptions(model=str(tiny_model_dir), blocks=(0, 3), adapters=(str(tmp_path),)))
    try:
        with pytest.raises(ConfigError, match="pickle file that petalnode never loads"):
            await server.start()
    finally:
        await server.aclose()
        await bootstrap.aclose()

"""A server hosting some blocks reads only those blocks; a client reads only the head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from petalnode.compute import CheckpointReader, load_block_span, load_client_head, load_model_info
from petalnode.errors import ConfigError


def _stored_bytes(model_dir: Path, select) -> int:
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if select(name):
                    t = handle.get_tensor(name)
                    total += t.numel() * t.element_size()
    return total


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def test_span_reads_only_its_blocks(tiny_model_dir: Path) -> None:
    info = load_model_info(tiny_model_dir)
    load_block_span(info, 2, 4)
    expected = _stored_bytes(tiny_model_dir, lambda n: _layer(n) in (2, 3))
    everything = _stored_bytes(tiny_model_dir, lambda n: True)
    assert info.reader.bytes_loaded == expected
    assert 0 < expected < everything / 2


def test_client_head_reads_no_blocks(tiny_model_dir: Path) -> None:
    info = load_model_info(tiny_model_dir)
    load_client_head(info)
    expected = _stored_bytes(tiny_model_dir, lambda n: _layer(n) is None)
    assert info.reader.bytes_loaded == expected


def test_sharded_checkpoint_loads_like_single_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Split the checkpoint into two shards with an index; the span is identical."""
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for extra in tiny_model_dir.iterdir():
        if extra.suffix != ".safetensors":
            (sharded / extra.name).write_bytes(extra.read_bytes())
    tensors = {}
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            tensors[name] = handle.get_tensor(name)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, chunk in (("model-00001-of-00002.safetensors", names[:half]),
                         ("model-00002-of-00002.safetensors", names[half:])):
        save_file({n: tensors[n].contiguous() for n in chunk}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = load_block_span(load_model_info(tiny_model_dir), 1, 5)
    b = load_block_span(load_model_info(sharded), 1, 5)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(ta, tb)


def test_index_pointing_outside_directory_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../../etc/passwd.safetensors"}})
    )
    with pytest.raises(ConfigError, match="outside"):
        CheckpointReader.open(tmp_path)


def test_block_range_outside_model_is_refused(tiny_model_dir: Path) -> None:
    info = load_model_info(tiny_model_dir)
    with pytest.raises(ConfigError, match="outside"):
        load_block_span(info, 4, 9)
    with pytest.raises(ConfigError):
        load_block_span(info, 3, 3)


def test_block_weight_bytes_from_headers(tiny_model_dir: Path) -> None:
    info = load_model_info(tiny_model_dir)
    expected = _stored_bytes(tiny_model_dir, lambda n: _layer(n) == 0)
    assert info.block_weight_bytes(0, torch.float32) == expected
    assert info.block_weight_bytes(0, torch.bfloat16) == expected // 2
    assert info.reader.bytes_loaded == 0


@pytest.mark.slow
def test_default_model_server_of_10_blocks_reads_a_third(default_model_dir: Path) -> None:
    info = load_model_info(default_model_dir)
    load_block_span(info, 10, 20)
    blocks = _stored_bytes(default_model_dir, lambda n: _layer(n) is not None and 10 <= _layer(n) < 20)
    assert info.reader.bytes_loaded == blocks
    assert info.reader.tensors_loaded == 10 * 9

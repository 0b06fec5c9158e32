"""Content digests of blocks (`compute/_digest.py`) and their cache next to the weights (`compute/_digest_cache.py`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from petalnode.compute import load_model_info
from petalnode.compute._digest import (
    NON_COMPUTATIONAL_CONFIG_KEYS,
    TensorLocation,
    block_digest,
    canonical_config,
    config_digest,
    pins_from_json,
    pins_to_json,
    short_digest,
    span_digest,
)
from petalnode.compute._digest_cache import CACHE_FILE_NAME, cache_path, fingerprint, load_cached, store_cached
from petalnode.errors import ConfigError

NUM_LAYERS = 6


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model (tests change its files), without any digest cache."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns(CACHE_FILE_NAME))
    return copy


def _digests(directory: Path) -> tuple[dict[int, bytes], int]:
    info = load_model_info(directory)
    return info.block_digests(range(info.num_blocks)), info.reader.bytes_hashed


def _flip_one_byte(directory: Path, tensor: str) -> None:
    info = load_model_info(directory)
    where = info.reader.locate(tensor)
    with open(where.path, "r+b") as handle:
        handle.seek(where.begin + 7)
        byte = handle.read(1)
        handle.seek(where.begin + 7)
        handle.write(bytes([byte[0] ^ 0x01]))


# -- the pure part -------------------------------------------------------------------------------------------------
def _location(name: str, data: bytes, dtype: str = "F32") -> TensorLocation:
    return TensorLocation(name=name, dtype=dtype, shape=(len(data) // 4,), path=Path("/nonexistent"), begin=0,
                          end=len(data))


def test_golden_digests_pin_the_format() -> None:
    # Changing what is hashed (tags, field order, lengths) changes every digest in every swarm: it must be a
    # deliberate, versioned change (new tags), so the exact values are pinned here.
    data = {"model.layers.0.mlp.up_proj.weight": bytes(range(16)), "model.layers.0.input_layernorm.weight": b"\1" * 8}
    tensors = [_location(n, d) for n, d in data.items()]
    config = config_digest({"hidden_size": 4, "num_hidden_layers": 1, "model_type": "llama"})
    digest = block_digest(config, tensors, lambda t: [data[t.name][:3], data[t.name][3:]])
    assert block_digest(config, reversed(tensors), lambda t: [data[t.name]]) == digest  # order and chunking free
    assert config.hex() == "13560991ba5d4459e363085b724d3ad1049129da20055d12ef215f06d3de6192"
    assert digest.hex() == "131f903075cd7de385f8a54f7b3e3a12c0018250a6b571d148ff2b391baf0ad1"
    span = span_digest([digest].__getitem__, 0, 1)
    assert span.hex() == "2e47c8a6e170ac493cb9125baeab91011bcf1ec2324b0de766dea13e716fb86a"


def test_every_hashed_field_matters() -> None:
    data = {"a": bytes(range(16))}
    config = config_digest({"hidden_size": 4})
    base = block_digest(config, [_location("a", data["a"])], lambda t: [data["a"]])
    variants = [
        block_digest(config_digest({"hidden_size": 5}), [_location("a", data["a"])], lambda t: [data["a"]]),
        block_digest(config, [_location("b", data["a"])], lambda t: [data["a"]]),
        block_digest(config, [_location("a", data["a"], "I32")], lambda t: [data["a"]]),
        block_digest(config, [TensorLocation("a", "F32", (2, 2), Path("/x"), 0, 16)], lambda t: [data["a"]]),
        block_digest(config, [_location("a", data["a"])], lambda t: [data["a"][:-1] + b"\xff"]),
    ]
    assert len({base, *variants}) == len(variants) + 1
    with pytest.raises(ValueError, match="read 15 bytes, expected 16"):
        block_digest(config, [_location("a", data["a"])], lambda t: [data["a"][:-1]])


def test_config_digest_ignores_what_does_not_change_the_computation() -> None:
    config = {"hidden_size": 64, "rope_theta": 10000.0, "model_type": "llama", "num_hidden_layers": 6}
    noisy = {**{k: "anything" for k in NON_COMPUTATIONAL_CONFIG_KEYS}, "_name_or_path": "/tmp/x",
             **dict(reversed(list(config.items())))}
    assert canonical_config(noisy) == canonical_config(config) == (
        b'{"hidden_size":64,"model_type":"llama","num_hidden_layers":6,"rope_theta":10000.0}')
    assert config_digest({**config, "rope_theta": 500000.0}) != config_digest(config)
    with pytest.raises(ValueError, match="canonically"):
        canonical_config({"x": float("nan")})


def test_span_digest_is_over_the_blocks_in_order() -> None:
    blocks = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
    assert span_digest(blocks.__getitem__, 1, 3) == span_digest({1: blocks[1], 2: blocks[2]}.__getitem__, 1, 3)
    assert span_digest(blocks.__getitem__, 1, 3) != span_digest([blocks[0], blocks[2], blocks[1]].__getitem__, 1, 3)
    assert span_digest(blocks.__getitem__, 0, 2) != span_digest(blocks.__getitem__, 0, 3)
    with pytest.raises(ValueError):
        span_digest(blocks.__getitem__, 2, 2)
    with pytest.raises(ValueError, match="32 bytes"):
        span_digest([b"short"].__getitem__, 0, 1)
    assert short_digest(blocks[0]) == blocks[0].hex()[:12] and short_digest(None) == "-"


# -- a real checkpoint -----------------------------------------------------------------------------------------------
def test_one_changed_byte_changes_exactly_that_blocks_digest(model_dir: Path, tmp_path: Path) -> None:
    before, _ = _digests(model_dir)
    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed, ignore=shutil.ignore_patterns(CACHE_FILE_NAME))
    _flip_one_byte(changed, "model.layers.3.mlp.down_proj.weight")
    after, _ = _digests(changed)
    assert [b for b in range(NUM_LAYERS) if before[b] != after[b]] == [3]
    ours, theirs = load_model_info(model_dir), load_model_info(changed)
    assert ours.span_digest(0, NUM_LAYERS) != theirs.span_digest(0, NUM_LAYERS)
    assert ours.span_digest(2, 4) != theirs.span_digest(2, 4)
    assert ours.span_digest(4, NUM_LAYERS) == theirs.span_digest(4, NUM_LAYERS)  # the same weights there


def test_a_changed_config_changes_every_block(model_dir: Path) -> None:
    before, _ = _digests(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (model_dir / "config.json").write_text(json.dumps(config))
    after, _ = _digests(model_dir)
    assert all(before[b] != after[b] for b in range(NUM_LAYERS))


def test_sharding_does_not_change_the_digests(model_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for extra in model_dir.iterdir():
        if extra.suffix != ".safetensors" and extra.name != CACHE_FILE_NAME:
            shutil.copy(extra, sharded / extra.name)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    names = sorted(tensors, reverse=True)  # another order inside the files, too
    weight_map = {}
    for shard, chunk in (("a.safetensors", names[::2]), ("b.safetensors", names[1::2])):
        save_file({n: tensors[n].contiguous() for n in chunk}, str(sharded / shard))
        weight_map.update(dict.fromkeys(chunk, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _digests(sharded)[0] == _digests(model_dir)[0]


def test_another_stored_dtype_is_another_model(model_dir: Path) -> None:
    before, _ = _digests(model_dir)
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name).to(torch.float16) for name in handle.keys()}
    save_file(tensors, str(path))
    assert all(d != before[b] for b, d in _digests(model_dir)[0].items())


def test_digests_are_the_same_in_another_process(model_dir: Path) -> None:
    code = ("import sys; from petalnode.compute import load_model_info; "
            "print(load_model_info(sys.argv[1]).span_digest(0, 6).hex())")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    (model_dir / CACHE_FILE_NAME).unlink()  # hash again here, not read the other process's result
    info = load_model_info(model_dir)
    assert info.span_digest(0, NUM_LAYERS).hex() == out
    assert info.reader.bytes_hashed > 0


def test_only_the_blocks_asked_for_are_hashed_and_a_cache_hit_reads_nothing(model_dir: Path) -> None:
    first = load_model_info(model_dir)
    span = first.span_digest(2, 4)
    two_blocks = first.reader.bytes_hashed
    assert 0 < two_blocks
    assert first.reader.bytes_loaded == 0  # hashing reads stored bytes; it builds no tensors
    first.span_digest(2, 4)
    assert first.reader.bytes_hashed == two_blocks  # remembered in memory
    second = load_model_info(model_dir)  # a restart: the cache next to the weights answers
    assert second.span_digest(2, 4) == span and second.reader.bytes_hashed == 0
    second.span_digest(0, NUM_LAYERS)  # only the four blocks not cached yet are hashed
    assert second.reader.bytes_hashed == 2 * two_blocks
    third = load_model_info(model_dir)
    third.span_digest(0, NUM_LAYERS)
    assert third.reader.bytes_hashed == 0


def test_the_cache_is_ignored_when_a_file_changes(model_dir: Path) -> None:
    digests, _ = _digests(model_dir)
    weights = model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, touched
    again, hashed = _digests(model_dir)
    assert again == digests and hashed > 0
    _flip_one_byte(model_dir, "model.layers.0.self_attn.q_proj.weight")  # a real change (size unchanged)
    changed, hashed = _digests(model_dir)
    assert hashed > 0 and changed[0] != digests[0] and changed[1] == digests[1]


def test_a_broken_or_foreign_cache_is_ignored(model_dir: Path) -> None:
    digests, everything = _digests(model_dir)
    cache = model_dir / CACHE_FILE_NAME
    valid = json.loads(cache.read_text())
    for broken in ("{not json", json.dumps([1]), json.dumps({**valid, "blocks": {"0": "zz"}}),
                   json.dumps({**valid, "blocks": {"0": "00" * 31}}), json.dumps({**valid, "version": 99})):
        cache.write_text(broken)
        assert _digests(model_dir) == (digests, everything)  # hashed again, same result


def test_a_read_only_model_directory_caches_under_the_cache_dir(model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETALNODE_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_path(model_dir, writable=True) == model_dir / CACHE_FILE_NAME
    elsewhere = cache_path(model_dir, writable=False)
    assert elsewhere.parent == tmp_path / "cache" / "digests"
    assert cache_path(tmp_path / "other", writable=False) != elsewhere
    files = [model_dir / "config.json", model_dir / "model.safetensors"]
    current = fingerprint(model_dir, files)
    store_cached(elsewhere, current, {3: b"\3" * 32})
    store_cached(elsewhere, current, {4: b"\4" * 32})  # merged
    assert load_cached(elsewhere, current) == {3: b"\3" * 32, 4: b"\4" * 32}
    assert load_cached(elsewhere, {**current, "config.json": [0, 0, 0]}) == {}


def test_bad_requests_are_refused(model_dir: Path) -> None:
    info = load_model_info(model_dir)
    with pytest.raises(ConfigError, match="outside"):
        info.span_digest(4, NUM_LAYERS + 1)
    with pytest.raises(ConfigError, match="outside"):
        info.block_digests([NUM_LAYERS])


def test_pins_round_trip_and_bad_pin_files_are_refused_with_the_reason() -> None:
    blocks = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    text = pins_to_json("tiny", blocks)
    assert pins_from_json(text) == ("tiny", blocks)
    assert json.loads(text)["digest"] == span_digest(blocks.__getitem__, 0, 3).hex()
    good = json.loads(text)
    for bad, reason in [
        ("[", "invalid JSON"), (json.dumps({**good, "version": 2}), "version 1"),
        (json.dumps({**good, "blocks": []}), "list of 1 to"), (json.dumps({**good, "model": 3}), "model name"),
        (json.dumps({**good, "blocks": [*good["blocks"][:2], "zz" * 32]}), "block 2's pinned digest"),
        (json.dumps({**good, "blocks": [*good["blocks"][:2], 7]}), "block 2's pinned digest"),
        (json.dumps({**good, "blocks": good["blocks"][:2]}), "does not match"),
    ]:
        with pytest.raises(ValueError, match=reason):
            pins_from_json(bad)

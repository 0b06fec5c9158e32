"""Load a model's config, a span of its blocks, or its client head, reading only the tensors needed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from petalnode.compute._budget import activation_reserve_bytes
from petalnode.compute._digest import block_digest, config_digest, span_digest
from petalnode.compute._digest_cache import cache_path, fingerprint, load_cached, store_cached
from petalnode.compute._family import ModelFamily, family_for
from petalnode.compute._model_source import ModelSource, resolve_model
from petalnode.compute._weights import CheckpointReader
from petalnode.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What a node needs to know about a model before loading anything heavy."""

    source: ModelSource
    config: PretrainedConfig
    family: ModelFamily
    reader: CheckpointReader
    # Block digests computed or read from the cache so far (see block_digests).
    _digests: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def num_blocks(self) -> int:
        return self.family.num_blocks(self.config)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def block_weight_bytes(self, index: int, dtype: torch.dtype) -> int:
        """Bytes of block `index`'s weights once cast to `dtype` (from the file headers; nothing loaded)."""
        names = [n for n in self.reader.names() if self.family.is_block_tensor(n, index, index + 1)]
        stored = self.reader.tensor_nbytes(names)
        stored_elem = 4 if self.config.dtype in (None, torch.float32, "float32") else 2
        return stored // stored_elem * torch.empty((), dtype=dtype).element_size()

    def block_digests(self, blocks: Iterable[int]) -> dict[int, bytes]:
        """The content digests of `blocks` (compute/_digest.py): remembered, else from the cache next to the
        weights (compute/_digest_cache.py), else hashed from the stored bytes and then cached.

        Raises:
            ConfigError: a block is outside the model, has no tensors, or config.json cannot be hashed.
        """
        wanted = sorted(set(blocks))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.num_blocks:
            raise ConfigError(f"blocks {wanted[0]}..{wanted[-1]} are outside the model's 0:{self.num_blocks}")
        missing = [b for b in wanted if b not in self._digests]
        if missing:
            directory = self.source.path
            files = [directory / "config.json", *self.reader.file_of.values()]
            if (directory / "model.safetensors.index.json").is_file():
                files.append(directory / "model.safetensors.index.json")
            before = fingerprint(directory, files)
            where = cache_path(directory)
            cached = load_cached(where, before)
            self._digests.update({b: cached[b] for b in missing if b in cached})
            todo = [b for b in missing if b not in self._digests]
            if todo:
                hashed = self._hash_blocks(todo)
                self._digests.update(hashed)
                # Store only if no file changed while we hashed (else the digests match neither version).
                if fingerprint(directory, files) == before:
                    store_cached(where, before, hashed)
        return {b: self._digests[b] for b in wanted}

    def span_digest(self, start: int, end: int) -> bytes:
        """The digest a server announces for blocks [start, end) (hashes only those blocks, at most once)."""
        if not 0 <= start < end <= self.num_blocks:
            raise ConfigError(f"blocks {start}:{end} are outside the model's 0:{self.num_blocks}")
        return span_digest(self.block_digests(range(start, end)).__getitem__, start, end)

    def _hash_blocks(self, blocks: list[int]) -> dict[int, bytes]:
        try:
            raw_config = json.loads((self.source.path / "config.json").read_text())
            config = config_digest(raw_config)
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"cannot hash {self.source.path / 'config.json'}: {e}") from e
        names = self.reader.names()
        out: dict[int, bytes] = {}
        for block in blocks:
            located = [self.reader.locate(n) for n in names if self.family.is_block_tensor(n, block, block + 1)]
            if not located:
                raise ConfigError(f"{self.source.path} has no tensors for block {block}")
            out[block] = block_digest(config, located, self.reader.read_raw)
        return out

    def kv_bytes_per_token_per_block(self, dtype: torch.dtype) -> int:
        return self.family.kv_bytes_per_token_per_block(self.config, dtype)

    def activation_bytes(self, dtype: torch.dtype) -> int:
        return activation_reserve_bytes(
            self.hidden_size, int(self.config.intermediate_size), int(self.config.num_attention_heads),
            torch.empty((), dtype=dtype).element_size(),
        )


def load_model_info(model: str | Path | ModelSource | None = None) -> ModelInfo:
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config = AutoConfig.from_pretrained(source.path, local_files_only=True)
    # Pin one attention kernel for every process so server spans and local references agree.
    config._attn_implementation = "sdpa"
    reader = CheckpointReader.open(source.path)
    return ModelInfo(source=source, config=config, family=family_for(config), reader=reader)


def load_block_span(
    info: ModelInfo, start: int, end: int, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    """Blocks [start, end) with their weights, and no other block's weights ever read.

    `progress(block_index)` is called after each block's tensors are read (for a progress bar).
    """
    if not 0 <= start < end <= info.num_blocks:
        raise ConfigError(f"blocks {start}:{end} are outside the model's 0:{info.num_blocks}")
    weights: dict[str, torch.Tensor] = {}
    for block in range(start, end):
        weights.update(
            info.reader.load(lambda name, b=block: info.family.is_block_tensor(name, b, b + 1), dtype=dtype,
                             device=device)
        )
        if progress is not None:
            progress(block)
    return info.family.build_span(info.config, start, end, weights)


def load_client_head(
    info: ModelInfo, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """Embeddings, final norm and LM head; no block weights are read."""
    weights = info.reader.load(
        lambda name: info.family.is_client_tensor(name, info.config), dtype=dtype, device=device
    )
    return info.family.build_client_head(info.config, weights)

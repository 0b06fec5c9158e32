"""Load a model's config, a span of its blocks, or its client head, reading only the tensors needed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from petalnode.compute._budget import activation_reserve_bytes
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

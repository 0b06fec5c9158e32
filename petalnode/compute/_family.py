"""The contract between the compute runtime and a model family.

The runtime never touches family-specific classes: it asks the family (a `ModelFamily`) which checkpoint tensors belong
to block i or to the client head, to build a span of blocks from those tensors, and to run the span with a cache.
Adding a family (e.g. Falcon, BLOOM) means one new module in `compute/models/` and one registry line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from petalnode.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.cache_utils import Cache


class BlockSpanModule(Protocol):
    """Blocks [start, end) of a model, with local layer indices 0..end-start-1."""

    def forward_span(
        self, hidden_states: torch.Tensor, cache: Cache | None, position_ids: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [batch, seq, hidden]; position_ids: [1 or batch, seq]; returns [batch, seq, hidden].

        prompts: optional deep prompts [num_blocks, batch or 1, prefix, hidden], added to each block's input at
        absolute positions [0, prefix).
        """
        ...

    def new_cache(self) -> Cache: ...


class ClientHeadModule(Protocol):
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def logits(self, hidden_states: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor: ...


class ModelFamily(Protocol):
    """One model family's checkpoint layout and block builders (not a LoRA adapter: those are `_lora.py`)."""

    model_types: frozenset[str]

    def num_blocks(self, config: PretrainedConfig) -> int: ...
    def is_block_tensor(self, name: str, start: int, end: int) -> bool: ...
    def is_client_tensor(self, name: str, config: PretrainedConfig) -> bool: ...
    def build_span(
        self, config: PretrainedConfig, start: int, end: int, weights: dict[str, torch.Tensor]
    ) -> torch.nn.Module: ...
    def build_client_head(
        self, config: PretrainedConfig, weights: dict[str, torch.Tensor]
    ) -> torch.nn.Module: ...
    def kv_bytes_per_token_per_block(self, config: PretrainedConfig, dtype: torch.dtype) -> int: ...


# Every family, as "module:attribute", imported only when a config asks for it (torch-heavy modules stay lazy).
# One line per family module: the model_types each serves are declared by the family itself.
FAMILY_MODULES: tuple[str, ...] = ("petalnode.compute.models.llama:LLAMA_FAMILY",)


def all_families() -> list[ModelFamily]:
    """Every registered family, imported on demand."""
    import importlib

    families = []
    for entry in FAMILY_MODULES:
        module_name, _, attribute = entry.partition(":")
        families.append(getattr(importlib.import_module(module_name), attribute))
    return families


def family_for(config: PretrainedConfig) -> ModelFamily:
    """The model family serving `config.model_type`, or a clear error naming the supported model types."""
    families = all_families()
    for family in families:
        if config.model_type in family.model_types:
            return family
    supported = sorted(t for family in families for t in family.model_types)
    raise ConfigError(f"model type {config.model_type!r} is not supported yet; supported: {supported}")

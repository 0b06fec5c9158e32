"""The Llama model family: Llama, Mistral, Qwen2 and SmolLM2 share one checkpoint layout.

Blocks are transformers' own decoder layers, rotary embeddings, masks and caches; nothing here re-implements
attention. A span of blocks [start, end) is rebuilt with *local* layer indices 0..k-1 and gets its own
`DynamicCache` built from a span-sized config: reusing the global layer_idx with a per-span cache would make
the cache (and so the causal mask) wrong.

Checkpoint keys: `model.layers.{i}.*` for block i; `model.embed_tokens.weight`, `model.norm.weight` and
`lm_head.weight` (absent when embeddings are tied) for the client head.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from petalnode.errors import ConfigError

_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_CLIENT_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# model_type -> (modeling module, class-name prefix)
_FAMILY_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}


def _cache_keyword(function: Any) -> str:
    """The name a transformers function takes the KV cache by: `cache` in newer 5.x (where `past_key_values` is
    deprecated, to be removed in 5.40), `past_key_values` before. Read once, not per forward."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


_MASK_CACHE_KEYWORD = {builder: _cache_keyword(builder)
                       for builder in (create_causal_mask, create_sliding_window_causal_mask)}


def _classes(config: PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    module_name, prefix = _FAMILY_CLASSES[config.model_type]
    module = importlib.import_module(module_name)
    return (
        getattr(module, f"{prefix}DecoderLayer"),
        getattr(module, f"{prefix}RotaryEmbedding"),
        getattr(module, f"{prefix}RMSNorm"),
    )


def _mask_kinds(config: PretrainedConfig) -> list[str]:
    """Attention kind of every global layer ("full_attention" or "sliding_attention")."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(layer_types)
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * config.num_hidden_layers
    return ["full_attention"] * config.num_hidden_layers


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of `config` describing only layers [start, end), so caches and masks are sized for the span."""
    sub = copy.deepcopy(config)
    sub.num_hidden_layers = end - start
    if getattr(config, "layer_types", None):
        sub.layer_types = list(config.layer_types[start:end])
    return sub


class LlamaBlockSpan(nn.Module):
    """Decoder layers [start, end) plus the rotary embedding they need."""

    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: nn.ModuleList, rotary: nn.Module):
        super().__init__()
        self._full_config = config
        self.config = span_config(config, start, end)
        self.start, self.end = start, end
        self.layers = layers
        self.rotary_emb = rotary
        self.mask_kinds = _mask_kinds(config)[start:end]
        self._layer_cache_keyword = _cache_keyword(type(layers[0]).forward) if len(layers) else "past_key_values"

    def subspan(self, start: int, end: int) -> LlamaBlockSpan:
        """A view of blocks [start, end) sharing this span's layers (no weights copied)."""
        if not self.start <= start < end <= self.end:
            raise ConfigError(f"blocks {start}:{end} are not inside the hosted {self.start}:{self.end}")
        if (start, end) == (self.start, self.end):
            return self
        layers = nn.ModuleList(self.layers[start - self.start : end - self.start])
        return LlamaBlockSpan(self._full_config, start, end, layers, self.rotary_emb)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward_span(
        self, hidden_states: torch.Tensor, cache: DynamicCache | None, position_ids: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the span's layers over one chunk.

        hidden_states: [batch, seq, hidden]; position_ids: [1, seq] absolute positions of this chunk.
        prompts: deep prompt tuning, [num_blocks, batch or 1, prefix, hidden]: prompts[i] is added to the input
            of the span's i-th block at absolute positions [0, prefix) (as Petals does), whichever chunk holds them.
        """
        mask_args: dict[str, Any] = {
            "config": self.config,
            "inputs_embeds": hidden_states,
            "attention_mask": None,
            "position_ids": position_ids,
        }
        masks: dict[str, Any] = {}
        for kind in set(self.mask_kinds):
            builder = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = builder(**mask_args, **{_MASK_CACHE_KEYWORD[builder]: cache})
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        prompt_slice = _prompt_positions(prompts, position_ids) if prompts is not None else None
        for index, (layer, kind) in enumerate(zip(self.layers, self.mask_kinds, strict=True)):
            if prompt_slice is not None:
                hidden_states = _add_prompt(hidden_states, prompts[index], prompt_slice)  # type: ignore[index]
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=cache is not None,
                **{self._layer_cache_keyword: cache},
            )
        return hidden_states

    def forward(
        self, hidden_states: torch.Tensor, cache: DynamicCache | None, position_ids: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_span(hidden_states, cache, position_ids, prompts)


def _prompt_positions(prompts: torch.Tensor, position_ids: torch.Tensor) -> tuple[slice, slice] | None:
    """(chunk slice, prompt slice) where a chunk at `position_ids` overlaps prompt positions [0, prefix)."""
    first = int(position_ids[0, 0])
    overlap = min(prompts.shape[2], first + position_ids.shape[1]) - first
    if overlap <= 0:
        return None
    return slice(0, overlap), slice(first, first + overlap)


def _add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, where: tuple[slice, slice]) -> torch.Tensor:
    # Out of place, so autograd sees the addition and the caller's tensor is never modified.
    chunk, positions = where
    added = hidden[:, chunk] + prompt[:, positions].to(hidden.dtype)
    return torch.cat([added, hidden[:, chunk.stop :]], dim=1)


class LlamaClientHead(nn.Module):
    """Embeddings, final norm and LM head: the only weights a client holds."""

    def __init__(self, embed_tokens: nn.Embedding, norm: nn.Module, lm_head_weight: torch.Tensor | None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.norm = norm
        # None means tied embeddings: the LM head reuses the embedding matrix.
        self.lm_head_weight = nn.Parameter(lm_head_weight, requires_grad=False) if lm_head_weight is not None else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden_states: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Final norm over every position, then the LM head over the last `logits_to_keep` (0: all), as HF does."""
        weight = self.lm_head_weight if self.lm_head_weight is not None else self.embed_tokens.weight
        normed = self.norm(hidden_states)
        if logits_to_keep:
            normed = normed[:, -logits_to_keep:, :]
        return nn.functional.linear(normed, weight)


class LlamaFamily:
    """The `ModelFamily` for every model type in `_FAMILY_CLASSES`."""

    model_types = frozenset(_FAMILY_CLASSES)

    def num_blocks(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def is_block_tensor(self, name: str, start: int, end: int) -> bool:
        match = _BLOCK_KEY.match(name)
        return match is not None and start <= int(match.group(1)) < end

    def is_client_tensor(self, name: str, config: PretrainedConfig) -> bool:
        return name in _CLIENT_KEYS

    def build_span(
        self, config: PretrainedConfig, start: int, end: int, weights: dict[str, torch.Tensor]
    ) -> LlamaBlockSpan:
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ConfigError(f"block range [{start}, {end}) is outside 0..{config.num_hidden_layers}")
        layer_cls, rotary_cls, _ = _classes(config)
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(end - start)]
        for name, tensor in weights.items():
            match = _BLOCK_KEY.match(name)
            if match is None or not start <= int(match.group(1)) < end:
                raise ConfigError(f"tensor {name} does not belong to blocks [{start}, {end})")
            per_layer[int(match.group(1)) - start][match.group(2)] = tensor
        sub = span_config(config, start, end)
        dtype = next(iter(weights.values())).dtype if weights else torch.float32
        layers = nn.ModuleList()
        for local_idx, state in enumerate(per_layer):
            # Build on the meta device so no random weights are allocated, then adopt the loaded tensors.
            with torch.device("meta"):
                layer = layer_cls(sub, local_idx)
            layer.load_state_dict(state, strict=True, assign=True)
            layers.append(layer)
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
        rotary = rotary_cls(config=config).to(device)
        span = LlamaBlockSpan(config, start, end, layers, rotary)
        span.requires_grad_(False)
        span.eval()  # never dropout on a server, whatever the client is doing
        return span.to(dtype=dtype) if dtype.is_floating_point else span

    def build_client_head(self, config: PretrainedConfig, weights: dict[str, torch.Tensor]) -> LlamaClientHead:
        _, _, norm_cls = _classes(config)
        embed_weight = weights["model.embed_tokens.weight"]
        embed = nn.Embedding(embed_weight.shape[0], embed_weight.shape[1], _weight=embed_weight)
        norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps).to(embed_weight.device, embed_weight.dtype)
        norm.weight.data = weights["model.norm.weight"]
        tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in weights
        head = LlamaClientHead(embed, norm, None if tied else weights["lm_head.weight"])
        head.requires_grad_(False)
        return head

    def kv_bytes_per_token_per_block(self, config: PretrainedConfig, dtype: torch.dtype) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


LLAMA_FAMILY = LlamaFamily()

"""Compute: load an assigned block range (or the client head) and run it with KV-cache sessions.

Importing the package is light: the memory budget and model sources (no torch) are imported at once, the
torch-based parts on first access (PEP 562), so a daemon that hosts no blocks (`petalnode bootstrap`) never
loads torch or transformers.
"""

import typing

from petalnode import _lazy
from petalnode.compute._budget import (
    DEFAULT_CACHE_TOKENS_PER_BLOCK,
    BlockPlan,
    ServePlan,
    format_size,
    parse_size,
    plan_blocks,
    plan_serving,
)
from petalnode.compute._digest import DIGEST_BYTES, pins_from_json, pins_to_json, short_digest, span_digest
from petalnode.compute._model_source import (
    DEFAULT_MODEL,
    ModelSource,
    cache_dir,
    ensure_default_model,
    resolve_model,
)

if typing.TYPE_CHECKING:
    from petalnode.compute._device import choose_device, choose_dtype, configure_threads, parse_dtype
    from petalnode.compute._family import ModelFamily, family_for
    from petalnode.compute._identity import span_digest_for
    from petalnode.compute._loader import ModelInfo, load_block_span, load_client_head, load_model_info
    from petalnode.compute._lora import LoraAdapter, active_adapter, attach_adapters, load_lora_adapter, span_adapters
    from petalnode.compute._session import DEFAULT_IDLE_TIMEOUT_S, InferenceSession, SessionManager
    from petalnode.compute._training import span_backward, span_forward
    from petalnode.compute._weights import CheckpointReader

__all__ = [
    "DEFAULT_CACHE_TOKENS_PER_BLOCK",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MODEL",
    "DIGEST_BYTES",
    "BlockPlan",
    "CheckpointReader",
    "InferenceSession",
    "LoraAdapter",
    "ModelFamily",
    "ModelInfo",
    "ModelSource",
    "ServePlan",
    "SessionManager",
    "active_adapter",
    "attach_adapters",
    "cache_dir",
    "choose_device",
    "choose_dtype",
    "configure_threads",
    "ensure_default_model",
    "family_for",
    "format_size",
    "load_block_span",
    "load_client_head",
    "load_lora_adapter",
    "load_model_info",
    "parse_dtype",
    "parse_size",
    "pins_from_json",
    "pins_to_json",
    "plan_blocks",
    "plan_serving",
    "resolve_model",
    "short_digest",
    "span_adapters",
    "span_backward",
    "span_digest",
    "span_digest_for",
    "span_forward",
]

# The torch-based parts: loaded on first access, then cached in the package namespace.
__getattr__, __dir__ = _lazy.exports(__name__, globals(), {
    "petalnode.compute._device": ("choose_device", "choose_dtype", "configure_threads", "parse_dtype"),
    "petalnode.compute._family": ("ModelFamily", "family_for"),
    "petalnode.compute._identity": ("span_digest_for",),
    "petalnode.compute._loader": ("ModelInfo", "load_block_span", "load_client_head", "load_model_info"),
    "petalnode.compute._lora": ("LoraAdapter", "active_adapter", "attach_adapters", "load_lora_adapter",
                                "span_adapters"),
    "petalnode.compute._session": ("DEFAULT_IDLE_TIMEOUT_S", "InferenceSession", "SessionManager"),
    "petalnode.compute._training": ("span_backward", "span_forward"),
    "petalnode.compute._weights": ("CheckpointReader",),
})

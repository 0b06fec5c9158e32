"""Compute: load an assigned block range (or the client head) and run it with KV-cache sessions."""

from petalnode.compute._budget import (
    DEFAULT_CACHE_TOKENS_PER_BLOCK,
    BlockPlan,
    ServePlan,
    format_size,
    parse_size,
    plan_blocks,
    plan_serving,
)
from petalnode.compute._device import choose_device, choose_dtype, configure_threads, parse_dtype
from petalnode.compute._family import FamilyAdapter, adapter_for
from petalnode.compute._loader import ModelInfo, load_block_span, load_client_head, load_model_info
from petalnode.compute._lora import LoraAdapter, active_adapter, attach_adapters, load_lora_adapter, span_adapters
from petalnode.compute._model_source import (
    DEFAULT_MODEL,
    ModelSource,
    cache_dir,
    ensure_default_model,
    resolve_model,
)
from petalnode.compute._session import DEFAULT_IDLE_TIMEOUT_S, InferenceSession, SessionManager
from petalnode.compute._training import span_backward, span_forward
from petalnode.compute._weights import CheckpointReader

__all__ = [
    "DEFAULT_CACHE_TOKENS_PER_BLOCK",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MODEL",
    "BlockPlan",
    "CheckpointReader",
    "FamilyAdapter",
    "InferenceSession",
    "LoraAdapter",
    "ModelInfo",
    "ModelSource",
    "ServePlan",
    "SessionManager",
    "active_adapter",
    "adapter_for",
    "attach_adapters",
    "cache_dir",
    "choose_device",
    "choose_dtype",
    "configure_threads",
    "ensure_default_model",
    "format_size",
    "load_block_span",
    "load_client_head",
    "load_lora_adapter",
    "load_model_info",
    "parse_dtype",
    "parse_size",
    "plan_blocks",
    "plan_serving",
    "resolve_model",
    "span_adapters",
    "span_backward",
    "span_forward",
]

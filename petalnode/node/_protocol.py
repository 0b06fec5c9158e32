"""Wire messages between clients and block servers (RPC verbs "inference", "forward", "backward", "info").

Inference is a stream: the client sends `OpenInference`, the server answers `InferenceOpened` (or a typed error:
busy, out of cache memory, bad request), then each `InferenceStep` gets one `InferenceResult`. Hidden states
travel as tensors in whatever codec the sender chose (the receiver decodes any known codec, within limits).

Fine-tuning uses the stateless unary verbs: "forward" returns a span's output for whole sequences, "backward"
recomputes that forward and returns the gradients for the span's input and deep prompts. Every request may name a
LoRA adapter (`adapter`) the server announced, and may carry deep prompts for the span's blocks
([num_blocks, batch or 1, prefix, hidden]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from petalnode.codecs import Message, register_message, wire_field

# The "info" messages are torch-free (a bootstrap's health page probes servers with them); re-exported here.
from petalnode.node._info import MAX_MODEL_NAME, InfoRequest, ServerInfo  # noqa: F401

MAX_SEQUENCE = 1 << 16
MAX_BATCH = 64
MAX_ADAPTER_NAME = 64


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class OpenInference(Message):
    KIND: ClassVar[str] = "node.inference.open"
    VERSION: ClassVar[int] = 2
    # A newer peer's extra fields (prompts, adapters, ...) change what is computed: never ignore them.
    ACCEPT_NEWER: ClassVar[bool] = False
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=1)
    max_length: int = wire_field(min_value=1, max_value=MAX_SEQUENCE)
    batch_size: int = wire_field(default=1, min_value=1, max_value=MAX_BATCH)
    reply_codec: str = wire_field(default="raw", max_len=8)
    adapter: str | None = wire_field(default=None, max_len=MAX_ADAPTER_NAME)
    prompts: torch.Tensor | None = wire_field(default=None, shape=(None, None, None, None))


@register_message
class InferenceOpened(Message):
    KIND: ClassVar[str] = "node.inference.opened"
    VERSION: ClassVar[int] = 1
    session_id: str = wire_field(max_len=64)
    max_length: int = wire_field(min_value=1)


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class InferenceStep(Message):
    KIND: ClassVar[str] = "node.inference.step"
    VERSION: ClassVar[int] = 1
    hidden: torch.Tensor = wire_field(shape=(None, None, None))
    start_position: int = wire_field(min_value=0, max_value=MAX_SEQUENCE)


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class InferenceResult(Message):
    KIND: ClassVar[str] = "node.inference.result"
    VERSION: ClassVar[int] = 1
    hidden: torch.Tensor = wire_field(shape=(None, None, None))
    position: int = wire_field(min_value=0, max_value=MAX_SEQUENCE)


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ForwardRequest(Message):
    """A stateless pass of whole sequences through blocks [start_block, end_block) (no cache kept)."""

    KIND: ClassVar[str] = "node.forward"
    VERSION: ClassVar[int] = 2
    # A newer peer's extra fields (prompts, adapters, ...) change what is computed: never ignore them.
    ACCEPT_NEWER: ClassVar[bool] = False
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=1)
    hidden: torch.Tensor = wire_field(shape=(None, None, None))
    prompts: torch.Tensor | None = wire_field(default=None, shape=(None, None, None, None))
    adapter: str | None = wire_field(default=None, max_len=MAX_ADAPTER_NAME)


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ForwardResult(Message):
    KIND: ClassVar[str] = "node.forward.result"
    VERSION: ClassVar[int] = 1
    hidden: torch.Tensor = wire_field(shape=(None, None, None))


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class BackwardRequest(Message):
    """Gradients through blocks [start_block, end_block): the server recomputes the forward from `hidden`."""

    KIND: ClassVar[str] = "node.backward"
    VERSION: ClassVar[int] = 1
    # A newer peer's extra fields (prompts, adapters, ...) change what is computed: never ignore them.
    ACCEPT_NEWER: ClassVar[bool] = False
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=1)
    hidden: torch.Tensor = wire_field(shape=(None, None, None))
    grad_output: torch.Tensor = wire_field(shape=(None, None, None))
    prompts: torch.Tensor | None = wire_field(default=None, shape=(None, None, None, None))
    adapter: str | None = wire_field(default=None, max_len=MAX_ADAPTER_NAME)


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class BackwardResult(Message):
    KIND: ClassVar[str] = "node.backward.result"
    VERSION: ClassVar[int] = 1
    grad_hidden: torch.Tensor = wire_field(shape=(None, None, None))
    grad_prompts: torch.Tensor | None = wire_field(default=None, shape=(None, None, None, None))

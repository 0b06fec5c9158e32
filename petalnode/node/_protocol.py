"""Wire messages between clients and block servers (RPC verbs "inference", "forward", "info").

Inference is a stream: the client sends `OpenInference`, the server answers `InferenceOpened` (or a typed error:
busy, out of cache memory, bad request), then each `InferenceStep` gets one `InferenceResult`. Hidden states
travel as tensors in whatever codec the sender chose (the receiver decodes any known codec, within limits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from petalnode.codecs import Message, register_message, wire_field

MAX_MODEL_NAME = 128
MAX_SEQUENCE = 1 << 16
MAX_BATCH = 64


@register_message
class OpenInference(Message):
    KIND: ClassVar[str] = "node.inference.open"
    VERSION: ClassVar[int] = 1
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=1)
    max_length: int = wire_field(min_value=1, max_value=MAX_SEQUENCE)
    batch_size: int = wire_field(default=1, min_value=1, max_value=MAX_BATCH)
    reply_codec: str = wire_field(default="raw", max_len=8)


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
    VERSION: ClassVar[int] = 1
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=1)
    hidden: torch.Tensor = wire_field(shape=(None, None, None))


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ForwardResult(Message):
    KIND: ClassVar[str] = "node.forward.result"
    VERSION: ClassVar[int] = 1
    hidden: torch.Tensor = wire_field(shape=(None, None, None))


@register_message
class InfoRequest(Message):
    KIND: ClassVar[str] = "node.info"
    VERSION: ClassVar[int] = 1


@register_message
class ServerInfo(Message):
    KIND: ClassVar[str] = "node.info.result"
    VERSION: ClassVar[int] = 1
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=0)
    throughput: float = wire_field(min_value=0.0)
    cache_tokens_left: int = wire_field(min_value=0)
    sessions: int = wire_field(min_value=0)
    version: str = wire_field(max_len=32)

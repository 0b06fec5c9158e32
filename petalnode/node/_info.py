"""The "info" verb's messages: what a block server says about itself when asked.

Kept apart from `_protocol.py` (which needs torch for its tensor fields) so a torch-free process (a bootstrap
serving the health page, `monitor/`) can probe servers with them; `_protocol.py` re-exports both.
"""

from __future__ import annotations

from typing import ClassVar

from petalnode.codecs import Message, register_message, wire_field

MAX_MODEL_NAME = 128


@register_message
class InfoRequest(Message):
    KIND: ClassVar[str] = "node.info"
    VERSION: ClassVar[int] = 1


@register_message
class ServerInfo(Message):
    KIND: ClassVar[str] = "node.info.result"
    VERSION: ClassVar[int] = 2
    model: str = wire_field(max_len=MAX_MODEL_NAME)
    start_block: int = wire_field(min_value=0)
    end_block: int = wire_field(min_value=0)
    throughput: float = wire_field(min_value=0.0)
    cache_tokens_left: int = wire_field(min_value=0)
    sessions: int = wire_field(min_value=0)
    version: str = wire_field(max_len=32)
    # The dtype the blocks compute in ("float32", "bfloat16", ...): verifying clients pick their tolerance by it.
    dtype: str = wire_field(default="", max_len=16)

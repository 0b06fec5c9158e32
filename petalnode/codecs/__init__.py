"""petalnode.codecs: tensors and messages <-> bytes.

Everything that crosses the wire goes through here. A message is msgpack of an envelope
``{"k": KIND, "v": VERSION, "b": {field: value, ...}}`` whose body is checked against the message class's field
annotations; a tensor is a map ``{"dt", "sh", "c", ["bs"], ["z"], "d"}`` (dtype, shape, codec, int8 block size,
zstd, little-endian payload). The formats are specified in the headers of ``_schema.py`` and ``_tensor.py`` and
pinned by golden files in tests/unit/golden/codecs.

Decoders never trust their input: sizes are checked against `CodecLimits` before anything is allocated, and
every failure is a `petalnode.errors.CodecError`.

The message layer does not import torch (DHT and bootstrap processes never load it). The tensor functions and
constants below are loaded on first access (PEP 562), and a message class with a `torch.Tensor` field loads them
when its schema is compiled.

Example::

    @register_message
    class Forward(Message):
        KIND: ClassVar[str] = "compute.forward"
        VERSION: ClassVar[int] = 1
        session: bytes
        hidden: torch.Tensor = wire_field(dtype=torch.float32, shape=(1, None, 576))
        position: int = wire_field(default=0, min_value=0)

    data = encode_message(Forward(session=b"...", hidden=h), tensor_codec=TensorCodec.INT8)
    msg = decode_message(data, expected=Forward)
"""

import typing

from petalnode import _lazy
from petalnode.codecs._limits import DEFAULT_LIMITS, CodecLimits
from petalnode.codecs._message import decode_message, encode_message, register_message
from petalnode.codecs._msgpack import packb, unpackb
from petalnode.codecs._registry import Message, registered_messages
from petalnode.codecs._schema import wire_field
from petalnode.codecs._tensor_codec import TensorCodec

if typing.TYPE_CHECKING:
    from petalnode.codecs._int8 import INT8_BLOCK_SIZE, int8_error_bound
    from petalnode.codecs._tensor import ZSTD_LEVEL, decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_LIMITS",
    "INT8_BLOCK_SIZE",
    "ZSTD_LEVEL",
    "CodecLimits",
    "Message",
    "TensorCodec",
    "decode_message",
    "decode_tensor",
    "encode_message",
    "encode_tensor",
    "int8_error_bound",
    "packb",
    "register_message",
    "registered_messages",
    "unpackb",
    "wire_field",
]

# Names that need torch: loaded on first access, then cached in the module namespace.
__getattr__, __dir__ = _lazy.exports(__name__, globals(), {
    "petalnode.codecs._int8": ("INT8_BLOCK_SIZE", "int8_error_bound"),
    "petalnode.codecs._tensor": ("ZSTD_LEVEL", "decode_tensor", "encode_tensor"),
})

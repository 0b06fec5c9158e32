# Messages <-> bytes: registration, and the two entry points that every wire protocol in petalnode uses.
#
# Invariants:
# - encode_message output is msgpack of one envelope (see _schema.py) and always decodes under the same limits.
# - decode_message raises only CodecError for any input bytes: size limits and the msgpack scan run first, then
#   the kind is looked up (and checked against `expected`) before the body is decoded.
# - Tensor data across all tensors of one message is bounded by CodecLimits.max_decoded_bytes.

from __future__ import annotations

import dataclasses
from typing import TypeVar

from petalnode.codecs._limits import DEFAULT_LIMITS, CodecLimits, DecodeBudget
from petalnode.codecs._msgpack import packb, unpackb
from petalnode.codecs._registry import Message, add
from petalnode.codecs._schema import DecodeContext, EncodeContext, decode_envelope, encode_envelope, schema_of
from petalnode.codecs._schema import forget_schema as _forget_schema
from petalnode.codecs._tensor_codec import TensorCodec
from petalnode.errors import CodecError

M = TypeVar("M", bound=Message)


def register_message(cls: type[M]) -> type[M]:
    """Class decorator: make `cls` a wire message known by its KIND.

    Applies `@dataclass(frozen=True, slots=True, kw_only=True)` when `cls` is not already a dataclass itself
    (so put this decorator outermost), checks the class, compiles its schema when its annotations can be
    resolved already (otherwise on first use), and registers it.

    Raises:
        TypeError: not a Message subclass, a bad KIND or VERSION, a dataclass that is not frozen, slotted and
            keyword-only, an unsupported field annotation, or a KIND taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Message)) or cls is Message:
        raise TypeError(f"@register_message needs a subclass of Message, got {cls!r}")
    if "__dataclass_fields__" not in cls.__dict__:
        cls = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
    name = cls.__qualname__
    params = cls.__dict__["__dataclass_params__"]
    if not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{name} must be a frozen, slotted dataclass: @dataclass(frozen=True, slots=True, ...)")
    if any(not f.kw_only for f in dataclasses.fields(cls)):
        raise TypeError(f"{name} must have keyword-only fields: @dataclass(kw_only=True, ...)")
    if type(cls.VERSION) is not int or cls.VERSION < 0:
        raise TypeError(f"{name}.VERSION must be a non-negative int, got {cls.VERSION!r}")
    if type(cls.ACCEPT_NEWER) is not bool:
        raise TypeError(f"{name}.ACCEPT_NEWER must be a bool")
    _forget_schema(cls)
    try:
        schema_of(cls)
    except NameError:
        pass  # a forward reference to a class defined later; compiled on first use
    add(cls)
    return cls


def encode_message(
    msg: Message,
    *,
    tensor_codec: TensorCodec = TensorCodec.RAW,
    zstd: bool = False,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> bytes:
    """Serialize a registered message to bytes.

    Args:
        msg: an instance of a registered Message class.
        tensor_codec: codec for floating tensor fields that do not choose their own (integer and bool tensors
            always travel RAW unless a field says otherwise).
        zstd: compress tensor payloads, for fields that do not choose themselves.
        limits: the result must fit these (the receiver's) limits.

    Raises:
        CodecError: a field value that does not match its annotation, an unregistered class, a tensor the codec
            refuses (see encode_tensor), or a result over the limits.
    """
    if not isinstance(msg, Message):
        raise CodecError(f"expected a Message, got {type(msg).__name__}")
    if not isinstance(tensor_codec, TensorCodec):
        raise CodecError(f"expected a TensorCodec, got {tensor_codec!r}")
    try:
        obj = encode_envelope(msg, EncodeContext(tensor_codec, bool(zstd)))
    except RecursionError:  # a self-nesting message far deeper than any receiver's max_depth
        raise CodecError("message nesting is too deep to encode") from None
    return packb(obj, limits)


def decode_message(
    data: bytes | bytearray | memoryview,
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    expected: type[Message] | tuple[type[Message], ...] | None = None,
) -> Message:
    """Parse and validate one message from untrusted bytes.

    Args:
        data: exactly one encoded message.
        limits: size limits (message, tokens, depth, tensor elements, decoded tensor bytes).
        expected: if given, the message's class must be (a subclass of) this class or one of these classes.

    Returns:
        An instance of the registered class for the message's KIND.

    Raises:
        CodecError: for anything malformed, unknown, unexpected or over a limit; never another exception type.
    """
    if isinstance(expected, type):
        expected = (expected,)
    obj = unpackb(data, limits)
    return decode_envelope(obj, DecodeContext(limits, DecodeBudget(limits.max_decoded_bytes)), expected)

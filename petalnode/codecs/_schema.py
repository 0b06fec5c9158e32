# Message schemas: field annotations compiled into encode/decode converters, and the envelope around a body.
#
# Envelope (a msgpack map with exactly these keys, in this order):
#   "k": str   the message KIND
#   "v": int   the sender's VERSION of that kind (>= 0)
#   "b": map   the body: field name -> value, in declaration order (a field's `wire_name` replaces its name
#              as the key: short keys for records that must stay small, such as the DHT announcement; a
#              field declared with `omit_default` is left out while it equals its default)
# A nested Message field is itself an envelope, so a field typed with a base class accepts any registered
# subclass. A torch.Tensor field is a tensor map (see _tensor.py).
#
# Supported annotations: bool, int, float, str, bytes, None, X | None (Optional[X]), list[X], tuple[X, ...],
# tuple[X, Y, ...], dict[str, X], enum.Enum subclasses with all-int or all-str values, Message subclasses (and
# unions of them), torch.Tensor. Anything else is a TypeError when the class is registered.
#
# This module never imports torch, so messages without tensors (DHT, signaling, RPC control) cost no torch import.
# torch.Tensor is a field type registered by _tensor.py (`register_field_type`), which is imported on first need:
# when a field annotated torch.Tensor is compiled, torch is necessarily loaded already, so it costs nothing more.
#
# Invariants:
# - Decoding checks every value against its annotation: bool is not int; ints lie in [min_value, max_value]
#   (int64 by default); floats are finite unless allow_nonfinite (an int is accepted for a float); a
#   field's max_len bounds its top-level str/bytes/list/tuple/dict; tensors match the field's dtype and shape.
# - Encoding applies the same checks, so whatever encodes also decodes (under the same limits).
# - Missing fields with defaults get them (from the dataclass); a missing required field is an error; unknown
#   fields are ignored only when the sender's VERSION is newer than ours (so newer peers stay compatible).
# - Every decoding failure is a CodecError naming the path, e.g. "rpc.forward.hidden: tensor dtype ...".

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from petalnode.codecs._limits import CodecLimits, DecodeBudget
from petalnode.codecs._registry import Message, lookup
from petalnode.codecs._tensor_codec import TensorCodec
from petalnode.errors import CodecError

if TYPE_CHECKING:
    import torch

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_SHORT_REPR = 60


def short(value: object) -> str:
    """repr() of untrusted data, cut short so an error message stays readable."""
    text = repr(value)
    return text if len(text) <= _SHORT_REPR else text[:_SHORT_REPR] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Field options


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """Per-field wire options, read from `dataclasses.field(metadata=...)` (plain keys, see `wire_field`)."""

    codec: TensorCodec | None = None
    zstd: bool | None = None
    dtype: torch.dtype | None = None
    shape: tuple[int | None, ...] | None = None
    min_value: int | float | None = None
    max_value: int | float | None = None
    max_len: int | None = None
    allow_nonfinite: bool = False

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], where: str) -> FieldSpec:
        spec = cls(**{f.name: metadata[f.name] for f in dataclasses.fields(cls) if f.name in metadata})
        checks = [
            (spec.codec is None or isinstance(spec.codec, TensorCodec), "codec must be a TensorCodec"),
            (spec.zstd is None or type(spec.zstd) is bool, "zstd must be a bool"),
            (spec.dtype is None or _is_torch_dtype(spec.dtype), "dtype must be a torch.dtype"),
            (
                spec.shape is None
                or (isinstance(spec.shape, tuple) and all(d is None or type(d) is int for d in spec.shape)),
                "shape must be a tuple of int or None",
            ),
            (spec.max_len is None or type(spec.max_len) is int, "max_len must be an int"),
            (
                all(b is None or type(b) in (int, float) for b in (spec.min_value, spec.max_value)),
                "min_value and max_value must be numbers",
            ),
            (type(spec.allow_nonfinite) is bool, "allow_nonfinite must be a bool"),
        ]
        for ok, message in checks:
            if not ok:
                raise TypeError(f"{where}: {message}")
        if spec.dtype is not None:
            from petalnode.codecs._tensor import dtype_name  # torch is loaded: spec.dtype is a torch.dtype

            dtype_name(spec.dtype)
        return spec


def _is_torch_dtype(value: object) -> bool:
    torch = sys.modules.get("torch")  # no torch loaded: nothing can be a torch.dtype
    return torch is not None and isinstance(value, torch.dtype)


def wire_field(
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    codec: TensorCodec | None = None,
    zstd: bool | None = None,
    dtype: torch.dtype | None = None,
    shape: tuple[int | None, ...] | None = None,
    min_value: int | float | None = None,
    max_value: int | float | None = None,
    max_len: int | None = None,
    allow_nonfinite: bool = False,
    wire_name: str | None = None,
    omit_default: bool = False,
) -> Any:
    """A `dataclasses.field` carrying wire options for a Message field.

    Args:
        default, default_factory: as for `dataclasses.field`; a field with either is optional on the wire.
        codec: tensor codec for this field, overriding the `tensor_codec` passed to `encode_message`
            (e.g. RAW for token ids or logits that must stay exact).
        zstd: compress this field's tensors, overriding the call's `zstd`.
        dtype, shape: the tensor's required original dtype and shape (None entries match any size).
        min_value, max_value: bounds for int and float values (ints default to the int64 range).
        max_len: most characters/bytes/items of the field's top-level str, bytes, list, tuple or dict.
        allow_nonfinite: accept NaN and infinity in float values (refused by default).
        wire_name: the field's key in the encoded body, instead of its name (e.g. one letter, where every byte
            counts); the name still appears in error messages. Changing it changes the wire format.
        omit_default: leave the field out of the body while its value equals its default (the decoder fills
            the default back in); for optional fields that are usually empty, again where every byte counts.
    """
    metadata = {
        key: value
        for key, value in (
            ("codec", codec),
            ("zstd", zstd),
            ("dtype", dtype),
            ("shape", shape),
            ("min_value", min_value),
            ("max_value", max_value),
            ("max_len", max_len),
        )
        if value is not None
    }
    if allow_nonfinite:
        metadata["allow_nonfinite"] = True
    if wire_name is not None:
        metadata["wire_name"] = wire_name
    if omit_default:
        metadata["omit_default"] = True
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# Converters


@dataclass(frozen=True, slots=True)
class EncodeContext:
    tensor_codec: TensorCodec
    zstd: bool


@dataclass(slots=True)
class DecodeContext:
    limits: CodecLimits
    budget: DecodeBudget


Encoder = Callable[[Any, EncodeContext], Any]
Decoder = Callable[[Any, DecodeContext], Any]
Converter = tuple[Encoder, Decoder]


def _expect(ok: bool, what: str, value: object) -> None:
    if not ok:
        raise CodecError(f"expected {what}, got {type(value).__name__} {short(value)}")


def _check_len(value: Any, spec: FieldSpec, top: bool) -> None:
    if top and spec.max_len is not None and len(value) > spec.max_len:
        raise CodecError(f"length {len(value)} exceeds the field's max_len of {spec.max_len}")


def _scalar(check: Callable[[Any], Any]) -> Converter:
    def convert(value: Any, _ctx: Any) -> Any:
        return check(value)

    return convert, convert


def _compile_int(spec: FieldSpec) -> Converter:
    lo = INT64_MIN if spec.min_value is None else spec.min_value
    hi = INT64_MAX if spec.max_value is None else spec.max_value

    def check(value: Any) -> int:
        _expect(type(value) is int, "int", value)
        if not lo <= value <= hi:
            raise CodecError(f"int {short(value)} is outside [{lo}, {hi}]")
        return value

    return _scalar(check)


def _compile_float(spec: FieldSpec) -> Converter:
    def check(value: Any) -> float:
        _expect(type(value) is float or type(value) is int, "float", value)
        try:
            value = float(value)
        except OverflowError:
            raise CodecError(f"int {short(value)} does not fit a float") from None
        if not spec.allow_nonfinite and not math.isfinite(value):
            raise CodecError(f"float {value} is not finite")
        if (spec.min_value is not None and value < spec.min_value) or (
            spec.max_value is not None and value > spec.max_value
        ):
            raise CodecError(f"float {value} is outside [{spec.min_value}, {spec.max_value}]")
        return value

    return _scalar(check)


# Field types that other modules of this package supply (torch.Tensor, from _tensor.py): type -> compiler.
_FIELD_TYPES: dict[type, Callable[[FieldSpec], Converter]] = {}


def register_field_type(tp: type, compile_field: Callable[[FieldSpec], Converter]) -> None:
    """Make `tp` a supported annotation, converted by `compile_field(spec)`'s (encode, decode) pair."""
    _FIELD_TYPES[tp] = compile_field


def _field_type(tp: Any) -> Callable[[FieldSpec], Converter] | None:
    compile_field = _FIELD_TYPES.get(tp) if isinstance(tp, type) else None
    torch = sys.modules.get("torch")
    if compile_field is None and torch is not None and tp is torch.Tensor:
        import petalnode.codecs._tensor  # noqa: F401  (registers torch.Tensor; torch itself is loaded already)

        compile_field = _FIELD_TYPES.get(tp)
    return compile_field


def _compile_enum(tp: type[enum.Enum], where: str) -> Converter:
    value_types = {type(member.value) for member in tp}
    if value_types not in ({int}, {str}):
        raise TypeError(f"{where}: enum {tp.__qualname__} must have all-int or all-str values")
    (value_type,) = value_types

    def encode(value: Any, _ctx: EncodeContext) -> Any:
        _expect(isinstance(value, tp), tp.__qualname__, value)
        return value.value

    def decode(value: Any, _ctx: DecodeContext) -> Any:
        _expect(type(value) is value_type, f"{tp.__qualname__} value", value)
        try:
            return tp(value)
        except ValueError:
            raise CodecError(f"{short(value)} is not a {tp.__qualname__}") from None

    return encode, decode


def _compile_messages(classes: tuple[type[Message], ...]) -> Converter:
    names = " | ".join(c.__qualname__ for c in classes)

    def encode(value: Any, ctx: EncodeContext) -> Any:
        _expect(isinstance(value, classes), names, value)
        return encode_envelope(value, ctx)

    def decode(value: Any, ctx: DecodeContext) -> Message:
        return decode_envelope(value, ctx, classes)

    return encode, decode


def _compile_optional(inner: Converter) -> Converter:
    enc, dec = inner

    def encode(value: Any, ctx: EncodeContext) -> Any:
        return None if value is None else enc(value, ctx)

    def decode(value: Any, ctx: DecodeContext) -> Any:
        return None if value is None else dec(value, ctx)

    return encode, decode


def _compile_sequence(item: Converter, spec: FieldSpec, top: bool, as_tuple: bool) -> Converter:
    enc, dec = item

    def encode(value: Any, ctx: EncodeContext) -> Any:
        _expect(isinstance(value, list | tuple), "tuple" if as_tuple else "list", value)
        _check_len(value, spec, top)
        return [enc(v, ctx) for v in value]

    def decode(value: Any, ctx: DecodeContext) -> Any:
        _expect(type(value) is list, "array", value)
        _check_len(value, spec, top)
        items = [dec(v, ctx) for v in value]
        return tuple(items) if as_tuple else items

    return encode, decode


def _compile_fixed_tuple(items: list[Converter]) -> Converter:
    def encode(value: Any, ctx: EncodeContext) -> Any:
        _expect(isinstance(value, list | tuple) and len(value) == len(items), f"{len(items)}-tuple", value)
        return [enc(v, ctx) for (enc, _), v in zip(items, value, strict=True)]

    def decode(value: Any, ctx: DecodeContext) -> Any:
        _expect(type(value) is list and len(value) == len(items), f"array of {len(items)}", value)
        return tuple(dec(v, ctx) for (_, dec), v in zip(items, value, strict=True))

    return encode, decode


def _compile_dict(item: Converter, spec: FieldSpec, top: bool) -> Converter:
    enc, dec = item

    def encode(value: Any, ctx: EncodeContext) -> Any:
        _expect(isinstance(value, dict), "dict", value)
        _check_len(value, spec, top)
        for k in value:
            _expect(type(k) is str, "str key", k)
        return {k: enc(v, ctx) for k, v in value.items()}

    def decode(value: Any, ctx: DecodeContext) -> Any:
        _expect(type(value) is dict, "map", value)
        _check_len(value, spec, top)
        return {k: dec(v, ctx) for k, v in value.items()}

    return encode, decode


def _is_message_class(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, Message)


def compile_type(tp: Any, spec: FieldSpec, where: str, top: bool = True) -> Converter:
    """Build the (encode, decode) pair for one annotation; TypeError if it is not supported."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return _scalar(lambda v: (_expect(type(v) is bool, "bool", v), v)[1])
    if tp is int:
        return _compile_int(spec)
    if tp is float:
        return _compile_float(spec)
    if tp is str:

        def check_str(v: Any) -> str:
            _expect(type(v) is str, "str", v)
            _check_len(v, spec, top)
            return v

        return _scalar(check_str)
    if tp is bytes:

        def encode_bytes(v: Any, _ctx: EncodeContext) -> bytes:
            _expect(isinstance(v, bytes | bytearray | memoryview), "bytes", v)
            v = bytes(v)
            _check_len(v, spec, top)
            return v

        def decode_bytes(v: Any, _ctx: DecodeContext) -> bytes:
            _expect(type(v) is bytes, "bytes", v)
            _check_len(v, spec, top)
            return v

        return encode_bytes, decode_bytes
    if tp is None or tp is type(None):
        return _scalar(lambda v: (_expect(v is None, "None", v), v)[1])
    compile_field = _field_type(tp)
    if compile_field is not None:
        return compile_field(spec)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _compile_enum(tp, where)
    if _is_message_class(tp):
        return _compile_messages((tp,))
    if origin is Union or origin is types.UnionType:
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) == 1:
            inner = compile_type(rest[0], spec, where, top)
        elif all(_is_message_class(a) for a in rest):
            inner = _compile_messages(rest)
        else:
            raise TypeError(f"{where}: unions other than X | None or of Message classes are not supported: {tp}")
        return _compile_optional(inner) if len(rest) < len(args) else inner
    if origin is list and len(args) == 1:
        return _compile_sequence(compile_type(args[0], spec, where, False), spec, top, as_tuple=False)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _compile_sequence(compile_type(args[0], spec, where, False), spec, top, as_tuple=True)
    if origin is tuple and args and Ellipsis not in args:
        return _compile_fixed_tuple([compile_type(a, spec, where, False) for a in args])
    if origin is dict and len(args) == 2 and args[0] is str:
        return _compile_dict(compile_type(args[1], spec, where, False), spec, top)
    raise TypeError(f"{where}: annotation {tp!r} is not supported on the wire")


# ---------------------------------------------------------------------------------------------------------------
# Message schemas and envelopes


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str  # in the encoded body: the wire_name, else the name
    omit: Callable[[Any], bool] | None  # omit_default: whether a value equals the default
    encode: Encoder
    decode: Decoder
    required: bool


@dataclass(frozen=True, slots=True)
class MessageSchema:
    fields: tuple[_Field, ...]
    keys: frozenset[str]


_SCHEMAS: dict[type[Message], MessageSchema] = {}


def _same_value(default: Any, value: Any) -> bool:
    return type(value) is type(default) and bool(value == default)


def schema_of(cls: type[Message]) -> MessageSchema:
    """The compiled schema of a message class (cached; compiled on first use so forward references work).

    Raises:
        TypeError: an unsupported annotation or field option.
        NameError: an annotation names something that does not exist (yet).
    """
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            where = f"{cls.__qualname__}.{f.name}"
            if not f.init:
                raise TypeError(f"{where}: init=False fields cannot travel on the wire")
            spec = FieldSpec.from_metadata(f.metadata, where)
            encode, decode = compile_type(hints[f.name], spec, where)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            key = f.metadata.get("wire_name", f.name)
            if type(key) is not str or not key:
                raise TypeError(f"{where}: wire_name must be a non-empty str")
            if any(key == other.key for other in fields):
                raise TypeError(f"{where}: wire key {key!r} is already used by another field")
            omit = None
            if f.metadata.get("omit_default"):
                if required:
                    raise TypeError(f"{where}: omit_default needs a default")
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                # Same type too: 0 == False and 1 == 1.0, but they travel differently.
                omit = functools.partial(_same_value, default)
            fields.append(_Field(f.name, key, omit, encode, decode, required))
        schema = MessageSchema(tuple(fields), frozenset(f.key for f in fields))
        _SCHEMAS[cls] = schema
    return schema


def forget_schema(cls: type[Message]) -> None:
    _SCHEMAS.pop(cls, None)


def encode_envelope(msg: Message, ctx: EncodeContext) -> dict[str, Any]:
    cls = type(msg)
    if lookup(cls.KIND) is not cls:
        raise CodecError(f"{cls.__qualname__} is not a registered message (use @register_message)")
    body: dict[str, Any] = {}
    for f in schema_of(cls).fields:
        value = getattr(msg, f.name)
        if f.omit is not None and f.omit(value):
            continue
        try:
            body[f.key] = f.encode(value, ctx)
        except CodecError as e:
            raise CodecError(f"{cls.KIND}.{f.name}: {e}") from None
    return {"k": cls.KIND, "v": cls.VERSION, "b": body}


_ENVELOPE_KEYS = frozenset({"k", "v", "b"})


def decode_envelope(obj: Any, ctx: DecodeContext, expected: tuple[type[Message], ...] | None) -> Message:
    if type(obj) is not dict or obj.keys() != _ENVELOPE_KEYS:
        raise CodecError("a message must be a map with exactly the keys 'k', 'v' and 'b'")
    kind, version, body = obj["k"], obj["v"], obj["b"]
    _expect(type(kind) is str, "message kind (str)", kind)
    cls = lookup(kind)
    if cls is None:
        raise CodecError(f"unknown message kind {short(kind)}")
    if expected is not None and not issubclass(cls, expected):
        names = " | ".join(c.__qualname__ for c in expected)
        raise CodecError(f"expected a {names} message, got {kind!r}")
    if type(version) is not int or version < 0:
        raise CodecError(f"{kind}: version must be a non-negative int, got {short(version)}")
    if version > cls.VERSION and not cls.ACCEPT_NEWER:
        raise CodecError(f"{kind}: version {version} is newer than the supported {cls.VERSION}")
    if type(body) is not dict:
        raise CodecError(f"{kind}: the body must be a map, got {type(body).__name__}")
    schema = schema_of(cls)
    kwargs: dict[str, Any] = {}
    for f in schema.fields:
        if f.key in body:
            try:
                kwargs[f.name] = f.decode(body[f.key], ctx)
            except CodecError as e:
                raise CodecError(f"{kind}.{f.name}: {e}") from None
        elif f.required:
            named = f"{f.name!r}" if f.key == f.name else f"{f.name!r} (key {f.key!r})"
            raise CodecError(f"{kind}: missing required field {named}")
    if version <= cls.VERSION and len(kwargs) != len(body):
        unknown = sorted(short(k) for k in body.keys() - schema.keys)
        raise CodecError(f"{kind}: unknown fields {', '.join(unknown)} at version {version}")
    try:
        return cls(**kwargs)
    except CodecError:
        raise
    except Exception as e:  # a subclass's __post_init__ may validate further; its refusal is a decode error
        raise CodecError(f"{kind}: rejected by {cls.__qualname__}: {type(e).__name__}: {e}") from e

# Tensors <-> msgpack-ready dicts: dtype + shape + codec + payload, validated on the way in.
#
# Wire form (a msgpack map; keys in this order, all required unless noted):
#   "dt": str        original dtype name, e.g. "float32" (see _DTYPES); the decoder returns this dtype
#   "sh": [int]      shape, 0 <= ndim <= max_ndim, each dim >= 0
#   "c":  str        codec: "raw" (payload in dtype "dt"), "fp16", "bf16" (payload in that dtype) or "int8"
#   "bs": int        only for "int8": elements per block, 1..65536
#   "z":  "zstd"     optional: the payload is one zstd frame that declares its content size
#   "d":  bin        payload, little-endian; for "int8": num_blocks fp32 scales, then numel int8 values
#
# Invariants:
# - decode_tensor checks everything before allocating: known keys only, known dtype and codec, codec allowed for
#   the dtype, element count and decoded size under the limits, exact payload length (after zstd, whose declared
#   content size must equal the expected size before it runs), int8 scales and values in range.
# - decode_tensor returns a fresh, contiguous, writable CPU tensor in the original dtype that shares no memory
#   with the input; raw codecs round-trip bit for bit (NaN payloads, -0.0 and subnormals included).
# - fp16/bf16 codecs: decode(encode(x)) == x.to(fp16 or bf16).to(x.dtype); a finite value that would overflow
#   to infinity is refused at encode time. int8: see _int8.py for the error bound and non-finite handling.
# - Every failure is a CodecError.
# - Importing this module registers torch.Tensor as a message field type (_schema.py imports it on first need);
#   it is the only module of petalnode.codecs, with _int8.py, that imports torch.

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import zstandard

from petalnode.codecs._int8 import INT8_BLOCK_SIZE, MAX_INT8_BLOCK_SIZE, dequantize_int8, num_blocks, quantize_int8
from petalnode.codecs._limits import DEFAULT_LIMITS, CodecLimits, DecodeBudget
from petalnode.codecs._schema import Converter, DecodeContext, EncodeContext, FieldSpec, _expect, register_field_type
from petalnode.codecs._tensor_codec import TensorCodec
from petalnode.errors import CodecError

ZSTD_LEVEL = 1
"""On (1, 512, 576) activations levels 1, 3 and 6 compress equally (bf16 to 78 %, int8 to 96 %, fp32 and fp16 to
92 %) while level 1 is the fastest (1 ms for bf16, 0.5 ms for int8); negative levels do not compress at all."""

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_FLOAT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
_CODECS = {codec.value: codec for codec in TensorCodec}
_CAST_DTYPE = {TensorCodec.FP16: torch.float16, TensorCodec.BF16: torch.bfloat16}
_REQUIRED_KEYS = frozenset({"dt", "sh", "c", "d"})
_ALLOWED_KEYS = _REQUIRED_KEYS | {"bs", "z"}
_ZSTD = "zstd"


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a supported dtype."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} is not supported on the wire") from None


# ---------------------------------------------------------------------------------------------------------------
# Little-endian byte views. torch has no byte-order option, so swap explicitly on a big-endian host.


def _to_le_bytes(flat: torch.Tensor) -> bytes:
    u8 = flat.view(torch.uint8)
    size = flat.element_size()
    if not _LITTLE_ENDIAN_HOST and size > 1:
        u8 = u8.view(-1, size).flip(1).reshape(-1)
    return u8.numpy().tobytes()


def _from_le_bytes(buf: bytearray, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """A 1-D tensor of `count` values read from `buf` (which it shares memory with) at byte `offset`."""
    size = torch.empty((), dtype=dtype).element_size()
    if count == 0:
        return torch.empty(0, dtype=dtype)
    u8 = torch.frombuffer(buf, dtype=torch.uint8, count=count * size, offset=offset)
    if not _LITTLE_ENDIAN_HOST and size > 1:
        u8 = u8.view(-1, size).flip(1).reshape(-1)
    return u8.view(dtype)


def _all_finite(t: torch.Tensor) -> bool:
    return t.numel() == 0 or math.isfinite(float(t.abs().amax()))


# ---------------------------------------------------------------------------------------------------------------
# Encode


def encode_tensor(
    tensor: torch.Tensor,
    codec: TensorCodec = TensorCodec.RAW,
    *,
    zstd: bool = False,
    block_size: int = INT8_BLOCK_SIZE,
    zstd_level: int = ZSTD_LEVEL,
) -> dict[str, Any]:
    """Encode a tensor as a msgpack-ready dict (see the module header for the wire form).

    Args:
        tensor: any supported dtype, any device, contiguous or not; gradients are not tracked.
        codec: value codec; FP16, BF16 and INT8 need a floating dtype.
        zstd: compress the payload with zstd (worth it for int8 and sparse or low-entropy data).
        block_size: INT8 only, elements per scale.
        zstd_level: zstd compression level.

    Raises:
        CodecError: unsupported dtype or codec, a codec that does not fit the dtype, a finite value that
            overflows fp16/bf16, or NaN/infinity with INT8.
    """
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(codec, TensorCodec):
        raise CodecError(f"expected a TensorCodec, got {codec!r}")
    if tensor.layout != torch.strided:
        raise CodecError(f"only dense tensors can be encoded, got layout {tensor.layout}")
    name = dtype_name(tensor.dtype)
    if codec is not TensorCodec.RAW and tensor.dtype not in _FLOAT_DTYPES:
        raise CodecError(f"codec {codec.value} needs a floating tensor, got {name}")
    flat = tensor.detach().to("cpu").reshape(-1)
    obj: dict[str, Any] = {"dt": name, "sh": list(tensor.shape), "c": codec.value}
    if codec is TensorCodec.RAW:
        payload = _to_le_bytes(flat.contiguous())
    elif codec is TensorCodec.INT8:
        if type(block_size) is not int or not 1 <= block_size <= MAX_INT8_BLOCK_SIZE:
            raise CodecError(f"int8 block size must be an int in 1..{MAX_INT8_BLOCK_SIZE}, got {block_size!r}")
        scales, q = quantize_int8(flat, block_size)
        obj["bs"] = block_size
        payload = _to_le_bytes(scales) + _to_le_bytes(q)
    else:
        cast = flat.to(_CAST_DTYPE[codec])
        # amax propagates NaN and is ~20x faster than isfinite().all(); do the exact check only when needed.
        if not _all_finite(cast) and bool((torch.isfinite(flat) & ~torch.isfinite(cast)).any()):
            raise CodecError(f"a finite value overflows {codec.value}; use bf16 or raw")
        payload = _to_le_bytes(cast.contiguous())
    if zstd:
        payload = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(payload)
        obj["z"] = _ZSTD
    obj["d"] = payload
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Decode


def _check_shape(shape: object, limits: CodecLimits) -> tuple[list[int], int]:
    if not isinstance(shape, list | tuple):
        raise CodecError(f"tensor shape must be a list, got {type(shape).__name__}")
    if len(shape) > limits.max_ndim:
        raise CodecError(f"tensor has {len(shape)} dimensions, more than the limit of {limits.max_ndim}")
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise CodecError(f"tensor dimensions must be non-negative ints, got {dim!r}")
        numel *= dim
        # A zero later in the shape would make the product small again, so check the dims one by one too.
        if dim > limits.max_tensor_elements or numel > limits.max_tensor_elements:
            raise CodecError(f"tensor of shape {list(shape)} exceeds {limits.max_tensor_elements} elements")
    return list(shape), numel


def _check_expected_shape(shape: list[int], expected: tuple[int | None, ...]) -> None:
    if len(shape) != len(expected) or any(e is not None and e != s for s, e in zip(shape, expected, strict=True)):
        pattern = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise CodecError(f"tensor of shape {tuple(shape)} does not match the expected {pattern}")


def _decompress(data: bytes, expected_size: int) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as e:
        raise CodecError(f"bad zstd frame header: {e}") from e
    # Without this check a small frame could declare (and make zstd allocate) any size.
    if declared != expected_size:
        raise CodecError(f"zstd frame declares {declared} bytes, expected {expected_size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"bad zstd payload: {e}") from e
    if len(out) != expected_size:
        raise CodecError(f"zstd payload decompressed to {len(out)} bytes, expected {expected_size}")
    return out


def decode_tensor_with_budget(
    obj: object,
    limits: CodecLimits,
    budget: DecodeBudget,
    expected_shape: tuple[int | None, ...] | None = None,
    expected_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`decode_tensor`, charging the decoded size to a budget shared by the tensors of one message."""
    if not isinstance(obj, dict):
        raise CodecError(f"a tensor must be a map, got {type(obj).__name__}")
    keys = obj.keys()
    if not keys >= _REQUIRED_KEYS or not keys <= _ALLOWED_KEYS:
        missing, unknown = sorted(_REQUIRED_KEYS - keys), sorted(map(repr, keys - _ALLOWED_KEYS))
        raise CodecError(f"tensor map has missing keys {missing} or unknown keys {unknown}")
    dt = obj["dt"]
    dtype = _DTYPES.get(dt) if isinstance(dt, str) else None
    if dtype is None:
        raise CodecError(f"unknown tensor dtype {dt!r}")
    if expected_dtype is not None and dtype != expected_dtype:
        raise CodecError(f"tensor dtype {dt} does not match the expected {dtype_name(expected_dtype)}")
    shape, numel = _check_shape(obj["sh"], limits)
    if expected_shape is not None:
        _check_expected_shape(shape, expected_shape)
    c = obj["c"]
    codec = _CODECS.get(c) if isinstance(c, str) else None
    if codec is None:
        raise CodecError(f"unknown tensor codec {c!r}")
    if codec is not TensorCodec.RAW and dtype not in _FLOAT_DTYPES:
        raise CodecError(f"codec {c} is only valid for floating dtypes, not {dt}")
    if (codec is TensorCodec.INT8) != ("bs" in obj):
        raise CodecError("the int8 codec needs a block size ('bs') and other codecs must not have one")
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget.spend(numel * itemsize)
    if codec is TensorCodec.INT8:
        block_size = obj["bs"]
        if type(block_size) is not int or not 1 <= block_size <= MAX_INT8_BLOCK_SIZE:
            raise CodecError(f"int8 block size must be an int in 1..{MAX_INT8_BLOCK_SIZE}, got {block_size!r}")
        n_scales = num_blocks(numel, block_size)
        payload_size = 4 * n_scales + numel
    elif codec is TensorCodec.RAW:
        payload_size = numel * itemsize
    else:
        payload_size = numel * 2
    if "z" in obj and obj["z"] != _ZSTD:
        raise CodecError(f"unknown tensor compression {obj['z']!r}")
    data = obj["d"]
    if not isinstance(data, bytes | bytearray):
        raise CodecError(f"tensor payload must be bytes, got {type(data).__name__}")
    if "z" in obj:
        data = _decompress(bytes(data), payload_size)
    elif len(data) != payload_size:
        raise CodecError(f"tensor payload has {len(data)} bytes, expected {payload_size}")
    buf = bytearray(data)  # one copy: the result must own writable memory
    if codec is TensorCodec.RAW:
        if dtype == torch.bool:
            as_u8 = _from_le_bytes(buf, torch.uint8, numel)
            if numel and int(as_u8.max()) > 1:
                raise CodecError("bool tensor payload has bytes other than 0 and 1")
            flat = as_u8.view(torch.bool)
        else:
            flat = _from_le_bytes(buf, dtype, numel)
    elif codec is TensorCodec.INT8:
        scales = _from_le_bytes(buf, torch.float32, n_scales)
        q = _from_le_bytes(buf, torch.int8, numel, offset=4 * n_scales)
        flat = dequantize_int8(scales, q, block_size).to(dtype)
    else:
        flat = _from_le_bytes(buf, _CAST_DTYPE[codec], numel).to(dtype)
    return flat.view(shape)


def decode_tensor(
    obj: object,
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    expected_shape: tuple[int | None, ...] | None = None,
    expected_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode and validate a tensor map produced by `encode_tensor` (and parsed by `unpackb`).

    Args:
        obj: the map, from untrusted input.
        limits: element count, dimensions and decoded-size limits.
        expected_shape: if given, the shape must have this many dims and match every non-None entry.
        expected_dtype: if given, the original dtype must be this one.

    Returns:
        A fresh, contiguous, writable CPU tensor in the original dtype (fp32 stays fp32 even over int8).

    Raises:
        CodecError: for anything malformed, unexpected or over a limit.
    """
    return decode_tensor_with_budget(
        obj, limits, DecodeBudget(limits.max_decoded_bytes), expected_shape, expected_dtype
    )


# ---------------------------------------------------------------------------------------------------------------
# torch.Tensor as a message field type (see _schema.py: registered when this module is first imported)


def _compile_tensor_field(spec: FieldSpec) -> Converter:
    def encode(value: Any, ctx: EncodeContext) -> Any:
        _expect(isinstance(value, torch.Tensor), "torch.Tensor", value)
        if spec.dtype is not None and value.dtype != spec.dtype:
            raise CodecError(f"tensor dtype {value.dtype} is not the field's {spec.dtype}")
        if spec.shape is not None and (
            value.dim() != len(spec.shape)
            or any(e is not None and e != s for s, e in zip(value.shape, spec.shape, strict=True))
        ):
            raise CodecError(f"tensor shape {tuple(value.shape)} does not match the field's {spec.shape}")
        codec = spec.codec
        if codec is None:
            codec = ctx.tensor_codec if value.is_floating_point() else TensorCodec.RAW
        return encode_tensor(value, codec, zstd=ctx.zstd if spec.zstd is None else spec.zstd)

    def decode(value: Any, ctx: DecodeContext) -> torch.Tensor:
        return decode_tensor_with_budget(value, ctx.limits, ctx.budget, spec.shape, spec.dtype)

    return encode, decode


register_field_type(torch.Tensor, _compile_tensor_field)

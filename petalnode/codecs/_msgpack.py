# msgpack with strict, bounded options: the only way petalnode turns untrusted bytes into Python objects.
#
# Invariants:
# - `unpackb` returns only None, bool, int, float, str, bytes, list and dict with str keys, from exactly one
#   msgpack object that spans the whole input (no trailing bytes), and raises only CodecError.
# - Before msgpack allocates anything, `_scan` walks the tokens (skipping str/bin bodies in O(1)) and enforces
#   every CodecLimits bound: total length, token count, depth, container, str and bin lengths, no ext types
#   (which also rules out msgpack's Timestamp), str-only map keys. Scanning stops after `max_objects` tokens,
#   so its cost is bounded too. A map with a duplicate key is refused after parsing (ambiguous on the wire).
# - `packb` output is always accepted by `unpackb` under the same limits: it is scanned before it is returned.
#
# Format reference: https://github.com/msgpack/msgpack/blob/master/spec.md ("Formats" table).

from __future__ import annotations

import struct
from typing import Any, NoReturn

import msgpack

from petalnode.codecs._limits import DEFAULT_LIMITS, CodecLimits
from petalnode.errors import CodecError

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# Token classes for the scanner.
_SCALAR, _STR, _BIN, _ARRAY, _MAP, _EXT, _BAD = range(7)

# Fixed-width scalars after the type byte: type byte -> payload length.
_FIXED_WIDTH = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float 32 / 64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint 8..64
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int 8..64
}  # fmt: skip
# Variable-length heads: type byte -> (token class, width of the big-endian length that follows).
_LENGTH_HEAD = {
    0xC4: (_BIN, 1), 0xC5: (_BIN, 2), 0xC6: (_BIN, 4),
    0xD9: (_STR, 1), 0xDA: (_STR, 2), 0xDB: (_STR, 4),
    0xDC: (_ARRAY, 2), 0xDD: (_ARRAY, 4),
    0xDE: (_MAP, 2), 0xDF: (_MAP, 4),
}  # fmt: skip
_LENGTH_STRUCT = {1: _U8, 2: _U16, 4: _U32}
_KIND_NAME = {_SCALAR: "scalar", _STR: "str", _BIN: "bin", _ARRAY: "array", _MAP: "map"}


def _fail(message: str) -> NoReturn:
    raise CodecError(message)


def _scan(data: bytes | bytearray | memoryview, limits: CodecLimits) -> None:
    """Check that `data` is exactly one msgpack object within `limits`, without building it."""
    end = len(data)
    if end > limits.max_message_bytes:
        _fail(f"message of {end} bytes exceeds the limit of {limits.max_message_bytes}")
    pos = 0
    objects = 0
    # One [items_left, is_map] per open container; a map counts keys and values, so an even count left
    # means the next token is a key.
    stack: list[list[Any]] = []
    while True:
        if pos >= end:
            _fail(f"truncated msgpack at byte {pos}")
        objects += 1
        if objects > limits.max_objects:
            _fail(f"more than {limits.max_objects} msgpack objects")
        is_key = False
        if stack:
            top = stack[-1]
            is_key = top[1] and top[0] % 2 == 0
            top[0] -= 1
        head = data[pos]
        pos += 1
        if head <= 0x7F or head >= 0xE0:
            kind, length = _SCALAR, 0
        elif head <= 0x8F:
            kind, length = _MAP, head & 0x0F
        elif head <= 0x9F:
            kind, length = _ARRAY, head & 0x0F
        elif head <= 0xBF:
            kind, length = _STR, head & 0x1F
        elif head in _FIXED_WIDTH:
            kind, length = _SCALAR, 0
            pos += _FIXED_WIDTH[head]
        elif head in _LENGTH_HEAD:
            kind, width = _LENGTH_HEAD[head]
            if pos + width > end:
                _fail(f"truncated msgpack length at byte {pos}")
            (length,) = _LENGTH_STRUCT[width].unpack_from(data, pos)
            pos += width
        elif 0xC7 <= head <= 0xC9 or 0xD4 <= head <= 0xD8:
            _fail("msgpack ext types are not accepted")
        else:  # 0xC1 is the only byte left: "never used" in the spec
            _fail(f"invalid msgpack type byte 0x{head:02x}")
        if is_key and kind != _STR:
            _fail(f"map keys must be str, got {_KIND_NAME[kind]}")
        if kind == _STR or kind == _BIN:
            limit = limits.max_str_len if kind == _STR else limits.max_bytes_len
            if length > limit:
                _fail(f"{_KIND_NAME[kind]} of {length} bytes exceeds the limit of {limit}")
            pos += length
        elif kind == _ARRAY or kind == _MAP:
            if length > limits.max_container_len:
                _fail(f"{_KIND_NAME[kind]} of {length} items exceeds the limit of {limits.max_container_len}")
            if len(stack) >= limits.max_depth:
                _fail(f"msgpack nesting deeper than {limits.max_depth}")
            if length:
                stack.append([2 * length if kind == _MAP else length, kind == _MAP])
        if pos > end:
            _fail(f"truncated msgpack: {pos - end} bytes missing")
        while stack and stack[-1][0] == 0:
            stack.pop()
        if not stack:
            break
    if pos != end:
        _fail(f"{end - pos} trailing bytes after the msgpack object")


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    # Unreachable after _scan; kept so msgpack never builds an ExtType or Timestamp even if _scan had a bug.
    raise CodecError("msgpack ext types are not accepted")


def _unique_map(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise CodecError("duplicate key in msgpack map")
    return result


def unpackb(data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS) -> Any:
    """Parse one msgpack object from untrusted bytes.

    Args:
        data: the whole message; trailing bytes are an error.
        limits: size limits, checked before allocation.

    Returns:
        None, bool, int, float, str, bytes, list or dict (str keys only), nested.

    Raises:
        CodecError: anything malformed or over a limit; never another exception type.
    """
    if isinstance(data, memoryview) and data.format != "B":
        try:
            data = data.cast("B")  # the scanner indexes single bytes
        except TypeError as e:
            raise CodecError(f"cannot read a non-contiguous memoryview as bytes: {e}") from e
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    _scan(data, limits)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_unique_map,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bytes_len,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except CodecError:
        raise
    except Exception as e:  # msgpack documents that "other exceptions can be raised"; UTF-8 errors are one
        raise CodecError(f"malformed msgpack: {type(e).__name__}: {e}") from e


def _refuse_default(obj: object) -> NoReturn:
    raise CodecError(f"cannot encode {type(obj).__name__} as msgpack")


def packb(obj: Any, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Serialize plain data (None, bool, int, float, str, bytes, list/tuple, dict with str keys) to msgpack.

    Raises:
        CodecError: an unsupported type, an int outside msgpack's range, a str that is not valid Unicode, or
            a result that `unpackb` would refuse under `limits` (non-str key, too deep, too large, ...).
    """
    try:
        data = msgpack.packb(obj, use_bin_type=True, default=_refuse_default)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode as msgpack: {e}") from e
    _scan(data, limits)
    return data

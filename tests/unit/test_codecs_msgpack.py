"""Strict msgpack: plain data round-trips; anything else, however malformed, is a CodecError."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petalnode.codecs import CodecLimits, packb, unpackb
from petalnode.errors import CodecError

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
plain_data = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@PROPERTY
@given(obj=plain_data)
def test_plain_data_round_trips(obj: object) -> None:
    assert unpackb(packb(obj)) == obj


@PROPERTY
@given(obj=plain_data)
def test_scanner_agrees_with_msgpack_on_valid_input(obj: object) -> None:
    # Our pre-scan must accept every valid message msgpack itself would parse, including non-canonical
    # (wider than needed) encodings that another implementation might emit.
    data = msgpack.packb(obj, use_bin_type=True)
    assert unpackb(data) == obj
    wide = wide_encode(obj)
    assert msgpack.unpackb(wide, raw=False) == obj
    assert unpackb(wide) == obj


def wide_encode(obj: object) -> bytes:
    """msgpack with the widest header of every kind: a different byte layout for the same data."""
    if obj is None or isinstance(obj, bool):
        return msgpack.packb(obj)
    if isinstance(obj, int):
        return b"\xd3" + struct.pack(">q", obj) if obj < 2**63 else b"\xcf" + struct.pack(">Q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        raw = obj.encode()
        return b"\xdb" + struct.pack(">I", len(raw)) + raw
    if isinstance(obj, bytes):
        return b"\xc6" + struct.pack(">I", len(obj)) + obj
    if isinstance(obj, list):
        return b"\xdd" + struct.pack(">I", len(obj)) + b"".join(wide_encode(v) for v in obj)
    assert isinstance(obj, dict)
    return b"\xdf" + struct.pack(">I", len(obj)) + b"".join(wide_encode(k) + wide_encode(v) for k, v in obj.items())


def test_every_type_byte_is_handled() -> None:
    samples = [
        b"\x00", b"\x7f", b"\xe0", b"\xff", b"\xc0", b"\xc2", b"\xc3",
        b"\xcc\x01", b"\xcd\x00\x01", b"\xce\x00\x00\x00\x01", b"\xcf" + bytes(8),
        b"\xd0\xff", b"\xd1\xff\xff", b"\xd2" + bytes(4), b"\xd3" + bytes(8),
        b"\xca" + struct.pack(">f", 1.5), b"\xcb" + struct.pack(">d", 1.5),
        b"\xa1a", b"\xd9\x01a", b"\xda\x00\x01a", b"\xdb\x00\x00\x00\x01a",
        b"\xc4\x01a", b"\xc5\x00\x01a", b"\xc6\x00\x00\x00\x01a",
        b"\x91\x01", b"\xdc\x00\x01\x01", b"\xdd\x00\x00\x00\x01\x01",
        b"\x81\xa1a\x01", b"\xde\x00\x01\xa1a\x01", b"\xdf\x00\x00\x00\x01\xa1a\x01",
        b"\x90", b"\x80",
    ]  # fmt: skip
    for data in samples:
        assert unpackb(data) == msgpack.unpackb(data), data.hex()
    for head in range(256):  # no type byte makes anything other than a CodecError escape
        for tail in (b"", b"\x00" * 9):
            try:
                unpackb(bytes([head]) + tail)
            except CodecError:
                pass


BAD = {
    "empty": b"",
    "never-used byte": b"\xc1",
    "truncated array": b"\x92\x01",
    "truncated str": b"\xa5ab",
    "truncated length": b"\xda\x00",
    "truncated float": b"\xcb\x00\x00",
    "trailing bytes": b"\x01\x02",
    "two objects": b"\x90\x90",
    "fixext timestamp": b"\xd6\xff\x00\x00\x00\x00",
    "ext8": b"\xc7\x01\x05a",
    "ext32": b"\xc9\x00\x00\x00\x01\x05a",
    "int key": b"\x81\x01\x02",
    "bytes key": b"\x81\xc4\x01a\x02",
    "nil key": b"\x81\xc0\x02",
    "array key": b"\x81\x90\x02",
    "nested int key": b"\x91\x81\x01\x02",
    "duplicate key": b"\x82\xa1a\x01\xa1a\x02",
    "invalid utf-8": b"\xa2\xff\xfe",
    "lone surrogate": b"\xa3\xed\xa0\x80",
    "huge declared array": b"\xdd\xff\xff\xff\xff",
    "huge declared bin": b"\xc6\xff\xff\xff\xff",
    "deep nesting": b"\x91" * 33 + b"\xc0",
    "msgpack-stack-deep nesting": b"\x91" * 5000 + b"\xc0",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_bytes_raise_codec_error(name: str) -> None:
    with pytest.raises(CodecError):
        unpackb(BAD[name])


def test_limits_are_enforced_before_parsing() -> None:
    obj = {"s": "x" * 100, "b": b"y" * 100, "l": list(range(100)), "m": {str(i): i for i in range(10)}}
    data = packb(obj)
    assert unpackb(data, CodecLimits(max_message_bytes=len(data))) == obj
    for limits in (
        CodecLimits(max_message_bytes=len(data) - 1),
        CodecLimits(max_str_len=99),
        CodecLimits(max_bytes_len=99),
        CodecLimits(max_container_len=99),
        CodecLimits(max_objects=100),
        CodecLimits(max_depth=1),
    ):
        with pytest.raises(CodecError):
            unpackb(data, limits)
    assert unpackb(b"\x91" * 32 + b"\xc0") is not None  # exactly max_depth = 32 is fine


def test_many_tiny_objects_are_refused_quickly() -> None:
    # 1 MiB of empty arrays would be 64 MiB of Python lists; the scan stops at max_objects.
    data = b"\xdd" + struct.pack(">I", 2**20) + b"\x90" * 2**20
    with pytest.raises(CodecError, match="objects"):
        unpackb(data)


def test_unpackb_refuses_non_bytes() -> None:
    for value in ("text", 5, None, [1]):
        with pytest.raises(CodecError):
            unpackb(value)  # type: ignore[arg-type]
    assert unpackb(bytearray(b"\x01")) == 1
    assert unpackb(memoryview(b"\x01")) == 1


def test_packb_refuses_what_unpackb_would() -> None:
    for obj in ({1: 2}, {b"k": 1}, {1.5}, object(), 2**64, -(2**63) - 1, "\ud800", [[[[]]]]):
        with pytest.raises(CodecError):
            packb(obj, CodecLimits(max_depth=3))
    assert packb((1, 2)) == packb([1, 2])  # tuples travel as arrays
    assert unpackb(packb(math.inf)) == math.inf


@PROPERTY
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_codec_error(data: bytes) -> None:
    try:
        unpackb(data)
    except CodecError:
        pass


@PROPERTY
@given(obj=plain_data, data=st.data())
def test_mutated_messages_only_ever_raise_codec_error(obj: object, data: st.DataObject) -> None:
    packed = bytearray(packb(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, len(packed)))
        if op == "flip" and at < len(packed):
            packed[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del packed[at:]
        elif op == "insert":
            packed[at:at] = data.draw(st.binary(min_size=1, max_size=5))
        elif at < len(packed):
            del packed[at]
    try:
        result = unpackb(bytes(packed))
    except CodecError:
        return
    assert msgpack.packb(result) == msgpack.packb(msgpack.unpackb(bytes(packed), raw=False))


def test_memoryviews_of_any_format_are_read_as_bytes() -> None:
    import array

    data = packb([1, 2])
    assert unpackb(memoryview(array.array("B", data)).cast("B")) == [1, 2]
    words = array.array("H", b"\x92\x01\x02\xc0")  # 2 items of 2 bytes: [1, 2] then a trailing nil
    with pytest.raises(CodecError, match="trailing"):
        unpackb(memoryview(words))
    with pytest.raises(CodecError):
        unpackb(memoryview(b"\x92\x01\x02\x00")[::2])  # not contiguous

"""Multiplexer frames: golden bytes, limits, and Hypothesis fuzzing of the parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petalnode.errors import LocalProtocolError, RemoteProtocolError
from petalnode.transport import _frames as f
from petalnode.transport._frames import FrameKind


def test_golden_bytes() -> None:
    assert f.encode_data(1, b"hi", end_of_message=True) == bytes.fromhex("0001 00000001") + b"hi"
    assert f.encode_data(3, b"", end_of_message=False) == bytes.fromhex("0000 00000003")
    assert f.encode_control(FrameKind.OPEN, 2) == bytes.fromhex("0100 00000002")
    assert f.encode_control(FrameKind.CLOSE, 2) == bytes.fromhex("0200 00000002")
    assert f.encode_reset(5, "no") == bytes.fromhex("0300 00000005") + b"no"
    assert f.encode_window(7, 65536) == bytes.fromhex("0400 00000007 00010000")
    assert f.encode_ping(FrameKind.PING, 1) == bytes.fromhex("0500 00000000 0000000000000001")
    assert f.encode_goaway("bye") == bytes.fromhex("0700 00000000") + b"bye"


def test_round_trip() -> None:
    frame = f.parse_frame(f.encode_data(9, b"payload", end_of_message=True))
    assert (frame.kind, frame.stream_id, frame.end_of_message, frame.payload) == (FrameKind.DATA, 9, True, b"payload")
    assert f.parse_frame(f.encode_window(1, 5)).window_increment == 5
    assert f.parse_frame(f.encode_reset(1, "x" * 1000)).reason == "x" * f.MAX_REASON_BYTES


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x00",  # short header
        bytes.fromhex("0900 00000001"),  # unknown kind
        bytes.fromhex("0000 00000000") + b"x",  # DATA on stream 0
        bytes.fromhex("0500 00000001") + bytes(8),  # PING on a stream
        bytes.fromhex("0002 00000001"),  # unknown DATA flag
        bytes.fromhex("0101 00000001"),  # flags on OPEN
        bytes.fromhex("0100 00000001") + b"x",  # OPEN with payload
        bytes.fromhex("0400 00000001 000000"),  # short WINDOW
        bytes.fromhex("0400 00000001 00000000"),  # zero increment
        bytes.fromhex("0400 00000001 80000000"),  # increment too big
        bytes.fromhex("0500 00000000 00"),  # short PING
        bytes.fromhex("0300 00000001") + b"x" * 300,  # long reset reason
    ],
)
def test_malformed_frames_are_refused(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        f.parse_frame(data)


def test_local_limits() -> None:
    with pytest.raises(LocalProtocolError):
        f.encode_window(1, 0)
    with pytest.raises(LocalProtocolError):
        f.encode_data(2**32, b"", end_of_message=True)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_parse_never_raises_anything_else(data: bytes) -> None:
    try:
        frame = f.parse_frame(data)
    except RemoteProtocolError:
        return
    # Whatever parses re-encodes to the same bytes.
    if frame.kind is FrameKind.DATA:
        again = f.encode_data(frame.stream_id, frame.payload, end_of_message=frame.end_of_message)
    elif frame.kind in (FrameKind.OPEN, FrameKind.CLOSE):
        again = f.encode_control(frame.kind, frame.stream_id)
    elif frame.kind is FrameKind.RESET:
        again = f.encode_reset(frame.stream_id, frame.payload.decode("utf-8", "replace"))
    elif frame.kind is FrameKind.GOAWAY:
        again = f.encode_goaway(frame.payload.decode("utf-8", "replace"))
    elif frame.kind is FrameKind.WINDOW:
        again = f.encode_window(frame.stream_id, frame.window_increment)
    else:
        again = f.encode_ping(frame.kind, int.from_bytes(frame.payload, "big"))
    if frame.kind not in (FrameKind.RESET, FrameKind.GOAWAY):
        assert again == data

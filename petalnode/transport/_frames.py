# Multiplexer frames: the plaintext unit inside one transport frame (an AEAD record on TCP, a queue item in
# memory, a data-channel message on WebRTC). Sans-IO: bytes in, `Frame` out, no asyncio.
#
# Layout (big-endian), loosely after yamux / HTTP/2 (RFC 9113 section 4.1):
#     kind: u8 | flags: u8 | stream_id: u32 | payload
# Invariants:
# - `parse_frame` accepts exactly what `encode_*` produces and raises `RemoteProtocolError` for anything else
#   (unknown kind, stray flags, a payload of the wrong size, a stream frame on stream 0 or vice versa).
# - DATA carries one chunk of a message; flag END_OF_MESSAGE marks its last chunk. An empty message is one empty
#   DATA frame with that flag.

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from petalnode.errors import LocalProtocolError, RemoteProtocolError

_HEADER = struct.Struct(">BBI")
HEADER_BYTES = _HEADER.size
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW_INCREMENT = 2**31 - 1
# Reset and goaway reasons are for logs only; keep them short.
MAX_REASON_BYTES = 256

END_OF_MESSAGE = 0x01


class FrameKind(enum.IntEnum):
    DATA = 0
    OPEN = 1
    CLOSE = 2  # the sender will send no more messages on this stream (half-close)
    RESET = 3  # abort the stream both ways
    WINDOW = 4  # grant the sender more bytes of credit
    PING = 5  # connection keepalive, stream 0, 8 opaque bytes
    PONG = 6
    GOAWAY = 7  # the sender is closing the connection, stream 0


_STREAM_KINDS = {FrameKind.DATA, FrameKind.OPEN, FrameKind.CLOSE, FrameKind.RESET, FrameKind.WINDOW}


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    stream_id: int
    flags: int = 0
    payload: bytes = b""

    @property
    def end_of_message(self) -> bool:
        return bool(self.flags & END_OF_MESSAGE)

    @property
    def window_increment(self) -> int:
        return int(_U32.unpack(self.payload)[0])

    @property
    def reason(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


def _header(kind: FrameKind, stream_id: int, flags: int = 0) -> bytes:
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id out of range: {stream_id}")
    return _HEADER.pack(kind, flags, stream_id)


def encode_data(stream_id: int, chunk: bytes | memoryview, *, end_of_message: bool) -> bytes:
    return _header(FrameKind.DATA, stream_id, END_OF_MESSAGE if end_of_message else 0) + chunk


def encode_control(kind: FrameKind, stream_id: int) -> bytes:
    """OPEN or CLOSE."""
    return _header(kind, stream_id)


def encode_reset(stream_id: int, reason: str) -> bytes:
    return _header(FrameKind.RESET, stream_id) + _short_reason(reason)


def encode_goaway(reason: str) -> bytes:
    return _header(FrameKind.GOAWAY, 0) + _short_reason(reason)


def encode_window(stream_id: int, increment: int) -> bytes:
    if not 0 < increment <= MAX_WINDOW_INCREMENT:
        raise LocalProtocolError(f"window increment out of range: {increment}")
    return _header(FrameKind.WINDOW, stream_id) + _U32.pack(increment)


def encode_ping(kind: FrameKind, opaque: int) -> bytes:
    return _header(kind, 0) + _U64.pack(opaque)


def _short_reason(reason: str) -> bytes:
    return reason.encode("utf-8")[:MAX_REASON_BYTES]


def parse_frame(data: bytes) -> Frame:
    """Decode one frame.

    Raises:
        RemoteProtocolError: the bytes are not a valid frame.
    """
    if len(data) < HEADER_BYTES:
        raise RemoteProtocolError(f"frame of {len(data)} bytes is shorter than its {HEADER_BYTES}-byte header")
    raw_kind, flags, stream_id = _HEADER.unpack_from(data)
    try:
        kind = FrameKind(raw_kind)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame kind {raw_kind}") from None
    payload = data[HEADER_BYTES:]
    if kind in _STREAM_KINDS:
        if stream_id == 0:
            raise RemoteProtocolError(f"{kind.name} frame on stream 0")
    elif stream_id != 0:
        raise RemoteProtocolError(f"{kind.name} frame on stream {stream_id} (must be 0)")
    if flags & ~(END_OF_MESSAGE if kind is FrameKind.DATA else 0):
        raise RemoteProtocolError(f"{kind.name} frame with unknown flags {flags:#x}")
    if kind in (FrameKind.OPEN, FrameKind.CLOSE) and payload:
        raise RemoteProtocolError(f"{kind.name} frame with a payload")
    if kind in (FrameKind.RESET, FrameKind.GOAWAY) and len(payload) > MAX_REASON_BYTES:
        raise RemoteProtocolError(f"{kind.name} reason longer than {MAX_REASON_BYTES} bytes")
    if kind is FrameKind.WINDOW:
        if len(payload) != _U32.size:
            raise RemoteProtocolError(f"WINDOW payload of {len(payload)} bytes (must be 4)")
        increment = _U32.unpack(payload)[0]
        if not 0 < increment <= MAX_WINDOW_INCREMENT:
            raise RemoteProtocolError(f"WINDOW increment out of range: {increment}")
    if kind in (FrameKind.PING, FrameKind.PONG) and len(payload) != _U64.size:
        raise RemoteProtocolError(f"{kind.name} payload of {len(payload)} bytes (must be 8)")
    return Frame(kind=kind, stream_id=stream_id, flags=flags, payload=bytes(payload))

# RPC envelopes: the first byte of every message on an RPC stream says what it is. Sans-IO.
#
#     CALL   0x01 | verb_len u8 | verb | body     first and only request message of a unary call
#     OPEN   0x02 | verb_len u8 | verb            first message of a bidirectional stream
#     RESULT 0x03 | body                          the reply of a unary call
#     ERROR  0x04 | code_len u8 | code | text     a typed error (petalnode.errors.RemoteError code), then the end
#     MSG    0x05 | body                          a stream message, either direction
#     PING   0x06                                 heartbeat on a long-lived stream
# Invariants:
# - `body` is a petalnode.codecs message, decoded separately (with limits and an expected type) by the RPC layer.
# - `parse_envelope` accepts exactly what the encoders produce and raises `RemoteProtocolError` otherwise;
#   error text is capped and only ever displayed.

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from petalnode.errors import LocalProtocolError, RemoteProtocolError

MAX_VERB_LEN = 64
MAX_CODE_LEN = 32
MAX_ERROR_TEXT_BYTES = 1024
_VERB_RE = re.compile(rb"[a-z][a-z0-9_.]{0,63}")
_CODE_RE = re.compile(rb"[a-z][a-z0-9_]{0,31}")


class EnvelopeKind(enum.IntEnum):
    CALL = 1
    OPEN = 2
    RESULT = 3
    ERROR = 4
    MSG = 5
    PING = 6


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: EnvelopeKind
    verb: str = ""  # CALL, OPEN
    body: bytes = b""  # CALL, RESULT, MSG
    code: str = ""  # ERROR
    text: str = ""  # ERROR


def check_verb(verb: str) -> str:
    if not isinstance(verb, str) or not _VERB_RE.fullmatch(verb.encode("ascii", "replace")):
        raise LocalProtocolError(f"RPC verb must match [a-z][a-z0-9_.]{{0,63}}, got {verb!r}")
    return verb


def encode_call(verb: str, body: bytes) -> bytes:
    raw = check_verb(verb).encode("ascii")
    return bytes((EnvelopeKind.CALL, len(raw))) + raw + body


def encode_open(verb: str) -> bytes:
    raw = check_verb(verb).encode("ascii")
    return bytes((EnvelopeKind.OPEN, len(raw))) + raw


def encode_result(body: bytes) -> bytes:
    return bytes((EnvelopeKind.RESULT,)) + body


def encode_msg(body: bytes) -> bytes:
    return bytes((EnvelopeKind.MSG,)) + body


PING = bytes((EnvelopeKind.PING,))


def encode_error(code: str, text: str) -> bytes:
    raw_code = code.encode("ascii", "replace")
    if not _CODE_RE.fullmatch(raw_code):
        raise LocalProtocolError(f"bad error code {code!r}")
    raw_text = text.encode("utf-8")[:MAX_ERROR_TEXT_BYTES]
    return bytes((EnvelopeKind.ERROR, len(raw_code))) + raw_code + raw_text


def _prefixed(data: bytes, pattern: re.Pattern[bytes], what: str) -> tuple[str, bytes]:
    if len(data) < 2:
        raise RemoteProtocolError(f"RPC envelope too short for its {what}")
    length = data[1]
    raw = data[2 : 2 + length]
    if len(raw) != length or not pattern.fullmatch(raw):
        raise RemoteProtocolError(f"RPC envelope has a malformed {what}: {raw[:MAX_VERB_LEN]!r}")
    return raw.decode("ascii"), data[2 + length :]


def parse_envelope(data: bytes) -> Envelope:
    """Decode one RPC envelope.

    Raises:
        RemoteProtocolError: the bytes are not a valid envelope.
    """
    if not data:
        raise RemoteProtocolError("empty RPC envelope")
    try:
        kind = EnvelopeKind(data[0])
    except ValueError:
        raise RemoteProtocolError(f"unknown RPC envelope kind {data[0]}") from None
    if kind is EnvelopeKind.CALL:
        verb, body = _prefixed(data, _VERB_RE, "verb")
        return Envelope(kind, verb=verb, body=body)
    if kind is EnvelopeKind.OPEN:
        verb, rest = _prefixed(data, _VERB_RE, "verb")
        if rest:
            raise RemoteProtocolError("RPC OPEN envelope with trailing bytes")
        return Envelope(kind, verb=verb)
    if kind is EnvelopeKind.ERROR:
        code, text = _prefixed(data, _CODE_RE, "error code")
        if len(text) > MAX_ERROR_TEXT_BYTES:
            raise RemoteProtocolError(f"RPC error text longer than {MAX_ERROR_TEXT_BYTES} bytes")
        return Envelope(kind, code=code, text=text.decode("utf-8", errors="replace"))
    if kind is EnvelopeKind.PING:
        if len(data) != 1:
            raise RemoteProtocolError("RPC PING envelope with a payload")
        return Envelope(kind)
    return Envelope(kind, body=data[1:])

# DHT datagram parsing with strict limits: bytes in, plain validated values out (sans-IO).
#
# Framing is rpcudp's: 1 kind byte (0 request, 1 response), a 20-byte message id, then msgpack. A request body is
# [name, args]; a response body is whatever the handler returned. Everything decoded here is untrusted, so:
# - msgpack is unpacked with explicit size limits (no ext types, string map keys only);
# - nothing leaves this module unvalidated: node ids are 20 bytes, contacts are (id, host, port) with a real
#   host string and port, so a `(id, None, None)` contact never reaches a socket call;
# - every failure raises `RemoteProtocolError` (or `CodecError` for undecodable bytes), never anything else.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from petalnode.errors import CodecError, LocalProtocolError, RemoteProtocolError

KIND_REQUEST = 0x00
KIND_RESPONSE = 0x01
MSG_ID_BYTES = 20
NODE_ID_BYTES = 20
# rpcudp refuses to send a request whose packed body exceeds 8192 bytes; we hold responses to the same bound.
MAX_BODY_BYTES = 8192
MAX_DATAGRAM_BYTES = 1 + MSG_ID_BYTES + MAX_BODY_BYTES
MAX_HOST_CHARS = 255
# Pages and contact lists are a few dozen entries at most; anything larger is hostile.
_MAX_ARRAY_LEN = 256
_MAX_MAP_LEN = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Datagram:
    kind: int
    msg_id: bytes
    body: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    name: str
    args: list[Any]


Contact = tuple[bytes, str, int]


def pack_body(obj: object) -> bytes:
    """Pack a request or response body; raises `LocalProtocolError` if it would not fit a datagram."""
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_BODY_BYTES:
        raise LocalProtocolError(f"DHT message of {len(data)} bytes exceeds {MAX_BODY_BYTES}")
    return data


def unpack_body(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, max_str_len=MAX_BODY_BYTES,
            max_bin_len=MAX_BODY_BYTES, max_array_len=_MAX_ARRAY_LEN, max_map_len=_MAX_MAP_LEN, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, StackError, FormatError...)
        raise CodecError(f"undecodable DHT datagram body: {type(e).__name__}") from e


def parse_datagram(data: bytes) -> Datagram:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("DHT datagram is not bytes")
    data = bytes(data)
    if len(data) < 1 + MSG_ID_BYTES + 1:
        raise CodecError(f"DHT datagram of {len(data)} bytes is too short")
    if len(data) > MAX_DATAGRAM_BYTES:
        raise CodecError(f"DHT datagram of {len(data)} bytes exceeds {MAX_DATAGRAM_BYTES}")
    kind = data[0]
    if kind not in (KIND_REQUEST, KIND_RESPONSE):
        raise CodecError(f"unknown DHT datagram kind {kind}")
    return Datagram(kind=kind, msg_id=data[1 : 1 + MSG_ID_BYTES], body=unpack_body(data[1 + MSG_ID_BYTES :]))


def parse_request(body: Any) -> Request:
    if not isinstance(body, list) or len(body) != 2 or not isinstance(body[0], str) or not isinstance(body[1], list):
        raise RemoteProtocolError("a DHT request is [name, [args...]]")
    return Request(name=body[0], args=body[1])


def parse_node_id(obj: Any, *, optional: bool = False) -> bytes | None:
    """A 20-byte node id; `None` is allowed only where a client-mode sender may omit it."""
    if obj is None and optional:
        return None
    if not isinstance(obj, bytes) or len(obj) != NODE_ID_BYTES:
        raise RemoteProtocolError("a DHT node id is 20 bytes")
    return obj


def parse_key(obj: Any) -> bytes:
    if not isinstance(obj, bytes) or len(obj) != NODE_ID_BYTES:
        raise RemoteProtocolError("a DHT key is 20 bytes")
    return obj


def parse_contact(obj: Any) -> Contact:
    if not isinstance(obj, list | tuple) or len(obj) != 3:
        raise RemoteProtocolError("a DHT contact is [id, host, port]")
    node_id, host, port = obj
    parse_node_id(node_id)
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_CHARS or any(c in host for c in "\x00/ "):
        raise RemoteProtocolError("a DHT contact host is a non-empty string")
    if type(port) is not int or not 0 < port < 65536:
        raise RemoteProtocolError("a DHT contact port is an int in 1..65535")
    return (node_id, host, port)


def parse_contacts(obj: Any, *, max_len: int) -> list[Contact]:
    if not isinstance(obj, list) or len(obj) > max_len:
        raise RemoteProtocolError(f"a DHT contact list is an array of at most {max_len}")
    return [parse_contact(c) for c in obj]

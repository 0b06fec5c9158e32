# DHT datagram parsing with strict limits: bytes in, plain validated values out (sans-IO).
#
# Framing is rpcudp's: 1 kind byte (0 request, 1 response), a 20-byte message id, then msgpack. A request body is
# [name, args]; a response body is whatever the handler returned. Everything decoded here is untrusted, so:
# - the body goes through petalnode.codecs' bounded msgpack decoder (the one every wire format uses) under
#   DHT_LIMITS: at most 8192 bytes, 256 items per array or map, nesting depth 8, one object spanning the whole
#   body, no ext types, str map keys only, no duplicate keys. Its pure-Python pre-scan is the price: measured
#   ~150 us to pack and ~175 us to parse a full 6.5 KB FIND_VALUE page (bare C msgpack: 7-8 us);
# - nothing leaves this module unvalidated: node ids are 20 bytes, contacts are (id, host, port) with a real
#   host string and port, so a `(id, None, None)` contact never reaches a socket call;
# - every failure raises `RemoteProtocolError` (or `CodecError` for undecodable bytes), never anything else.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petalnode.codecs import CodecLimits, packb, unpackb
from petalnode.errors import CodecError, LocalProtocolError, RemoteProtocolError

KIND_REQUEST = 0x00
KIND_RESPONSE = 0x01
MSG_ID_BYTES = 20
NODE_ID_BYTES = 20
# rpcudp refuses to send a request whose packed body exceeds 8192 bytes; we hold responses to the same bound.
MAX_BODY_BYTES = 8192
MAX_DATAGRAM_BYTES = 1 + MSG_ID_BYTES + MAX_BODY_BYTES
MAX_HOST_CHARS = 255
# Pages and contact lists are a few dozen entries at most, and the deepest legitimate body is a STORE request,
# [name, [id, key, [record [fields]]]] (depth 4); anything larger or deeper is hostile.
DHT_LIMITS = CodecLimits(
    max_message_bytes=MAX_BODY_BYTES, max_str_len=MAX_BODY_BYTES, max_bytes_len=MAX_BODY_BYTES,
    max_container_len=256, max_depth=8, max_objects=MAX_BODY_BYTES,
)


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
    """Pack a request or response body; raises `LocalProtocolError` if a peer would refuse it (too large...)."""
    try:
        return packb(obj, DHT_LIMITS)
    except CodecError as e:
        raise LocalProtocolError(f"cannot send DHT message: {e}") from None


def unpack_body(data: bytes) -> Any:
    """Parse a datagram body under DHT_LIMITS; raises `CodecError`."""
    try:
        return unpackb(data, DHT_LIMITS)
    except CodecError as e:
        raise CodecError(f"undecodable DHT datagram body: {e}") from None


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

"""DHT datagram parsing (`dht/_wire.py`): the codecs' bounded msgpack decoder, under the DHT's own limits."""

from __future__ import annotations

import msgpack
import pytest

from petalnode.dht._wire import KIND_REQUEST, MAX_BODY_BYTES, pack_body, parse_datagram
from petalnode.errors import CodecError, LocalProtocolError

MSG_ID = bytes(range(20))


def datagram(body: bytes) -> bytes:
    return bytes([KIND_REQUEST]) + MSG_ID + body


def nested(depth: int) -> object:
    obj: object = 0
    for _ in range(depth):  # `depth` nested arrays
        obj = [obj]
    return obj


def test_a_request_round_trips() -> None:
    body = ["store", [bytes(20), bytes(20), [[b"k", b"p", b"v", 1.5, 3, b"s"]]]]
    parsed = parse_datagram(datagram(pack_body(body)))
    assert parsed.kind == KIND_REQUEST and parsed.msg_id == MSG_ID and parsed.body == body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (msgpack.packb(nested(9)), "nesting deeper than 8"),  # old decoder: accepted up to msgpack's own 1024
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate key"),  # {"a": 1, "a": 2}: old decoder kept the last
        (msgpack.packb({b"records": []}), "map keys must be str"),
        (msgpack.packb([1]) + b"\x00", "trailing bytes"),
        (msgpack.packb(list(range(257))), "257 items exceeds the limit of 256"),
        (b"\xd4\x01\x00", "ext types"),
        (b"\xc1", "invalid msgpack type byte"),
    ],
)
def test_malformed_bodies_are_refused_with_a_codec_error(body: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        parse_datagram(datagram(body))


def test_what_we_send_fits_what_peers_accept() -> None:
    assert parse_datagram(datagram(pack_body(nested(8)))).body == nested(8)
    with pytest.raises(LocalProtocolError, match="exceeds the limit of 8192"):
        pack_body([b"x" * MAX_BODY_BYTES])
    with pytest.raises(LocalProtocolError, match="nesting deeper than 8"):
        pack_body(nested(9))

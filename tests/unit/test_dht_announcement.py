"""The announcement (`dht/_announcement.py`): its registered, versioned wire form, golden bytes and block keys.

Golden files are in tests/unit/golden/dht/<case>.msgpack. Checking never writes them; after an intended format
change, regenerate them as a separate step and review the diff (changed bytes: old peers no longer read new
announcements):
    PYTHONPATH=. .venv/bin/python -m tests.unit.test_dht_announcement
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest

from petalnode.codecs import Message, encode_message, packb, register_message, unpackb
from petalnode.dht import (
    BLOCKS_PER_KEY,
    MAX_ADAPTERS,
    MAX_VALUE_BYTES,
    Announcement,
    ServerState,
    block_key,
    block_keys,
    model_keys,
)
from petalnode.dht._announcement import (
    MAX_ADAPTER_CHARS,
    MAX_ADDRESS_CHARS,
    MAX_MODEL_CHARS,
    MAX_PUBLIC_NAME_CHARS,
    MAX_VERSION_CHARS,
)
from petalnode.errors import CodecError

GOLDEN_DIR = Path(__file__).parent / "golden" / "dht"
PEER = "tcp://203.0.113.5:31337/3iyc5d3ozg5yl4kbhfmgsmhqc4edqsoy"
DIGEST = bytes(range(32))  # a span digest (compute/_digest.py); any 32 bytes on the wire
# Files written by VERSION 1 (before span digests), kept to prove that today's readers still read them.
V1_GOLDEN = {"announcement_typical_v1"}


def announcement(**overrides: object) -> Announcement:
    fields: dict[str, object] = dict(
        state=ServerState.ONLINE, model="smollm2-135m", start_block=4, end_block=12, throughput=123.5,
        cache_tokens_left=8192, addresses=("tcp://203.0.113.5:31337",), version="0.1.0", public_name="alice",
    )
    fields.update(overrides)
    return Announcement(**fields)  # type: ignore[arg-type]


# What servers announce: today's typical record (one address with the peer id, the span digest, no name, no
# adapters), one with a name and adapters (no digest: a joining server has not hashed yet), and the largest the
# limits allow (every text at its longest, MAX_ADAPTERS adapters, a digest; a second address of the longest kind
# would not fit MAX_VALUE_BYTES, which to_bytes refuses).
CASES: dict[str, Announcement] = {
    "announcement_typical": announcement(model="SmolLM2-135M-Instruct", start_block=0, end_block=30,
                                         throughput=123.456789, cache_tokens_left=122880, addresses=(PEER,),
                                         public_name=None, span_digest=DIGEST),
    "announcement_named_with_adapters": announcement(state=ServerState.JOINING, adapters=("chat-lora", "sql-lora")),
    "announcement_offline": announcement(state=ServerState.OFFLINE, throughput=0.0, cache_tokens_left=0),
    "announcement_largest": announcement(
        model="m" * MAX_MODEL_CHARS, start_block=99_000, end_block=99_999, throughput=1e300,
        cache_tokens_left=2**53 - 1, addresses=("a" * MAX_ADDRESS_CHARS,), version="v" * MAX_VERSION_CHARS,
        public_name="n" * MAX_PUBLIC_NAME_CHARS,
        adapters=tuple(f"{i}".ljust(MAX_ADAPTER_CHARS, "a") for i in range(MAX_ADAPTERS)), span_digest=DIGEST,
    ),
}


def newer_version_bytes() -> bytes:
    """What a VERSION 3 server might send: a field this version does not know ("q")."""
    envelope = unpackb(CASES["announcement_named_with_adapters"].to_bytes())
    envelope["v"] = 3
    envelope["b"]["q"] = {"quantization": "nf4", "blocks": [4, 5]}
    return packb(envelope)


def write_golden() -> None:
    """Rewrite the golden files from the cases (a separate step, never run by the tests)."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name, ann in CASES.items():
        (GOLDEN_DIR / f"{name}.msgpack").write_bytes(ann.to_bytes())
    (GOLDEN_DIR / "announcement_from_version_3.msgpack").write_bytes(newer_version_bytes())


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoding_matches_golden_bytes_and_decodes_back(name: str) -> None:
    golden = (GOLDEN_DIR / f"{name}.msgpack").read_bytes()
    assert CASES[name].to_bytes() == golden
    assert Announcement.from_bytes(golden) == CASES[name]


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN_DIR.glob("*.msgpack")} == {*CASES, *V1_GOLDEN, "announcement_from_version_3"}


def test_a_version_1_record_is_still_read_without_a_digest() -> None:
    old = (GOLDEN_DIR / "announcement_typical_v1.msgpack").read_bytes()
    assert unpackb(old)["v"] == 1 and "d" not in unpackb(old)["b"]
    assert Announcement.from_bytes(old) == dataclasses.replace(CASES["announcement_typical"], span_digest=None)


def test_the_span_digest_is_32_bytes_under_d() -> None:
    wire = unpackb(CASES["announcement_typical"].to_bytes())
    assert wire["v"] == 2 and wire["b"]["d"] == DIGEST
    assert Announcement.from_bytes(CASES["announcement_typical"].to_bytes()).span_digest == DIGEST
    for bad in (b"", b"x" * 31, b"x" * 33, "00" * 32):
        with pytest.raises(CodecError, match="span_digest"):
            announcement(span_digest=bad)
        with pytest.raises(CodecError, match="span_digest"):
            Announcement.from_bytes(_body(d=bad))


def test_wire_form_is_a_versioned_envelope_with_one_letter_keys() -> None:
    wire = unpackb(CASES["announcement_named_with_adapters"].to_bytes())
    assert (wire["k"], wire["v"]) == ("dht.announcement", 2)
    assert list(wire["b"]) == ["s", "m", "a", "b", "t", "c", "x", "v", "n", "l"]
    assert wire["b"]["s"] == 1 and wire["b"]["l"] == ["chat-lora", "sql-lora"]
    # No public name and no adapters: left out, so a typical record pays nothing for them.
    assert list(unpackb(CASES["announcement_typical"].to_bytes())["b"]) == ["s", "m", "a", "b", "t", "c", "x", "v",
                                                                           "d"]


def test_sizes_stay_compact() -> None:
    # Measured: 182 bytes typical (146 at VERSION 1 without the digest, 121 in the unversioned one-letter map
    # before), 1017 the largest (997 at VERSION 1 with 64-character names, 972 before).
    assert len(CASES["announcement_typical"].to_bytes()) <= 185
    assert len(CASES["announcement_largest"].to_bytes()) <= MAX_VALUE_BYTES
    with pytest.raises(CodecError, match="exceeds the limit of 1024"):
        announcement(addresses=("a" * MAX_ADDRESS_CHARS,) * 2, **{
            k: getattr(CASES["announcement_largest"], k) for k in ("model", "version", "public_name", "adapters")
        }).to_bytes()


def test_a_newer_version_is_read_and_its_unknown_fields_ignored() -> None:
    golden = (GOLDEN_DIR / "announcement_from_version_3.msgpack").read_bytes()
    assert golden == newer_version_bytes()
    assert Announcement.from_bytes(golden) == CASES["announcement_named_with_adapters"]


def test_a_newer_version_that_drops_a_field_we_need_is_refused_with_the_reason() -> None:
    envelope = unpackb(newer_version_bytes())
    del envelope["b"]["m"]
    with pytest.raises(CodecError, match=r"dht\.announcement: missing required field 'model' \(key 'm'\)"):
        Announcement.from_bytes(packb(envelope))


def test_unknown_fields_at_our_own_version_are_refused() -> None:
    envelope = unpackb(CASES["announcement_typical"].to_bytes())
    envelope["b"]["q"] = 1
    with pytest.raises(CodecError, match="unknown fields 'q' at version 2"):
        Announcement.from_bytes(packb(envelope))


def test_other_messages_and_the_old_unversioned_form_are_refused() -> None:
    old_form = bytes.fromhex(  # the one-letter map that announcements were before they were versioned
        "89a17302a16dac736d6f6c6c6d322d3133356da16104a1620ca174cb405ee00000000000a163cd2000a17891b7"
        "7463703a2f2f3230332e302e3131332e353a3331333337a176a5302e312e30a16ea5616c696365"
    )
    with pytest.raises(CodecError, match="exactly the keys 'k', 'v' and 'b'"):
        Announcement.from_bytes(old_form)
    with pytest.raises(CodecError, match=r"expected a Announcement message, got 'test\.dht\.other'"):
        Announcement.from_bytes(encode_message(Other()))


@register_message
class Other(Message):
    KIND: ClassVar[str] = "test.dht.other"


def _body(**changes: object) -> bytes:
    envelope = unpackb(announcement().to_bytes())
    for key, value in changes.items():
        if value is None:
            del envelope["b"][key]
        else:
            envelope["b"][key] = value
    return packb(envelope)


@pytest.mark.parametrize(
    "changes",
    [{"m": None}, {"s": 9}, {"a": 20}, {"t": "fast"}, {"x": ["a" * 500]}, {"c": True}, {"t": -1.0},
     {"l": "lora"}, {"l": [""]}, {"l": ["x" * 65]}, {"l": [f"a{i}" for i in range(9)]}, {"l": [3]},
     {"a": -1}, {"c": 2**53}, {"n": ""}, {"x": [f"tcp://10.0.0.{i}:1" for i in range(9)]}],
)
def test_bad_fields_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(CodecError, match="announcement"):
        Announcement.from_bytes(_body(**changes))


def test_non_finite_throughput_is_refused() -> None:
    envelope = unpackb(announcement().to_bytes())
    envelope["b"]["t"] = float("inf")
    with pytest.raises(CodecError, match="not finite"):
        Announcement.from_bytes(packb(envelope))


def test_garbage_and_oversize_are_refused() -> None:
    for data in (b"", b"\xc1", packb([1, 2]), b"\x00" * (MAX_VALUE_BYTES + 1)):
        with pytest.raises(CodecError):
            Announcement.from_bytes(data)
    with pytest.raises(CodecError, match="an announcement is bytes"):
        Announcement.from_bytes(bytearray(announcement().to_bytes()))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="addresses must be a tuple of at most 8"):
        announcement(addresses=tuple(f"tcp://10.0.0.{i}:1" for i in range(20)))


def test_round_trips_and_block_keys() -> None:
    ann = announcement()
    assert Announcement.from_bytes(ann.to_bytes()) == ann
    assert Announcement.from_bytes(announcement(public_name=None).to_bytes()).public_name is None
    assert ann.block_keys() == ["smollm2-135m.0:8", "smollm2-135m.8:16"]  # blocks 4-11 overlap two groups of 8


@pytest.mark.parametrize(
    ("start", "end", "keys"),
    [(0, 1, ["m.0:8"]), (0, 8, ["m.0:8"]), (7, 9, ["m.0:8", "m.8:16"]), (8, 30, ["m.8:16", "m.16:24", "m.24:32"])],
)
def test_a_server_announces_under_one_key_per_group_of_blocks(start: int, end: int, keys: list[str]) -> None:
    assert BLOCKS_PER_KEY == 8
    assert block_keys("m", start, end) == keys
    assert all(block_key("m", b) in keys for b in range(start, end))


def test_a_reader_looks_up_every_group_of_the_model_once() -> None:
    assert model_keys("m", 30) == {"m.0:8": (0, 8), "m.8:16": (8, 16), "m.16:24": (16, 24), "m.24:32": (24, 30)}
    assert model_keys("m", 8) == {"m.0:8": (0, 8)}
    # Every block of the model is covered by exactly one key, and that key is where its servers announce.
    for num_blocks in (1, 7, 8, 9, 80):
        groups = model_keys("m", num_blocks)
        for block in range(num_blocks):
            assert [k for k, (a, b) in groups.items() if a <= block < b] == [block_key("m", block)]
    with pytest.raises(ValueError):
        block_key("m", -1)


if __name__ == "__main__":
    write_golden()
    print(f"rewrote the golden files in {GOLDEN_DIR}; review the diff before committing")

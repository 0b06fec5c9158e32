"""Message envelopes: typed schemas, versioning rules, tensor fields, and a decoder that only raises CodecError."""

# wire_field returns a dataclasses.field; until pyproject lists it in flake8-bugbear's extend-immutable-calls,
# ruff cannot see that and flags every use.
# ruff: noqa: RUF009, RUF100

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import petalnode.codecs
from petalnode.codecs import (
    CodecLimits,
    Message,
    TensorCodec,
    decode_message,
    encode_message,
    packb,
    register_message,
    registered_messages,
    unpackb,
    wire_field,
)
from petalnode.errors import CodecError

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class Priority(enum.IntEnum):
    LOW = 0
    HIGH = 5


@register_message
class Ping(Message):
    KIND: ClassVar[str] = "test.codecs.ping"
    VERSION: ClassVar[int] = 1
    nonce: int


@register_message
class Peer(Message):
    KIND: ClassVar[str] = "test.codecs.peer"
    VERSION: ClassVar[int] = 1
    peer_id: bytes = wire_field(max_len=20)
    role: Role = Role.SERVER
    throughput: float = wire_field(default=0.0, min_value=0.0)


@register_message
class SpecialPeer(Peer):
    KIND: ClassVar[str] = "test.codecs.special_peer"
    note: str = ""


@register_message
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Everything(Message):
    KIND: ClassVar[str] = "test.codecs.everything"
    VERSION: ClassVar[int] = 3
    count: int = wire_field(min_value=0, max_value=1000)
    ratio: float
    name: str = wire_field(max_len=16)
    blob: bytes
    flag: bool
    maybe: int | None = None
    legacy: Optional[str] = None  # noqa: UP045 - both spellings must work
    items: list[int] = wire_field(default_factory=list)
    frozen_items: tuple[str, ...] = ()
    pair: tuple[int, str] = (0, "")
    table: dict[str, list[float]] = wire_field(default_factory=dict)
    role: Role = Role.CLIENT
    priority: Priority = Priority.LOW
    peer: Peer | None = None
    peers: list[Peer] = wire_field(default_factory=list)
    any_ping: Ping | Peer | None = None
    hidden: torch.Tensor = wire_field(dtype=torch.float32, shape=(1, None, 8))
    ids: torch.Tensor | None = None
    logits: torch.Tensor | None = wire_field(default=None, codec=TensorCodec.RAW)
    loose: float = wire_field(default=math.nan, allow_nonfinite=True)


def everything(**changes: object) -> Everything:
    fields = {
        "count": 7,
        "ratio": 0.25,
        "name": "hello",
        "blob": b"\x00\xff",
        "flag": True,
        "maybe": -3,
        "legacy": "old",
        "items": [1, 2, 3],
        "frozen_items": ("a", "b"),
        "pair": (9, "nine"),
        "table": {"x": [1.5, -2.0]},
        "role": Role.SERVER,
        "priority": Priority.HIGH,
        "peer": Peer(peer_id=b"p" * 20, throughput=10.0),
        "peers": [Peer(peer_id=b"a"), SpecialPeer(peer_id=b"b", note="n")],
        "any_ping": Ping(nonce=5),
        "hidden": torch.linspace(-4, 4, 24).reshape(1, 3, 8),
        "ids": torch.tensor([[1, 2, 3]]),
        "logits": torch.tensor([0.1, 0.2]),
        "loose": math.inf,
    }
    fields.update(changes)
    return Everything(**fields)


def assert_same_everything(a: Everything, b: Everything, atol: float = 0.0) -> None:
    for f in dataclasses.fields(Everything):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, f.name
            assert torch.allclose(x, y, atol=atol, rtol=0), f.name
        else:
            assert x == y and type(x) is type(y), f.name


def body_of(data: bytes) -> dict:
    return unpackb(data)["b"]


def envelope(kind: str, version: object, body: object) -> bytes:
    return packb({"k": kind, "v": version, "b": body})


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_every_field_kind_round_trips() -> None:
    msg = everything()
    back = decode_message(encode_message(msg), expected=Everything)
    assert isinstance(back, Everything)
    assert_same_everything(msg, back)
    assert type(back.peers[1]) is SpecialPeer and type(back.frozen_items) is tuple and type(back.pair) is tuple


def test_tensor_codec_choice_per_call_and_per_field() -> None:
    msg = everything()
    data = encode_message(msg, tensor_codec=TensorCodec.INT8, zstd=True)
    body = body_of(data)
    assert (body["hidden"]["c"], body["hidden"].get("z")) == ("int8", "zstd")
    assert body["ids"]["c"] == "raw"  # integer tensors stay exact
    assert body["logits"]["c"] == "raw"  # the field pins its codec
    back = decode_message(data)
    assert back.hidden.dtype == torch.float32  # the original dtype comes back
    assert_same_everything(msg, back, atol=4 / 254 + 1e-6)
    assert torch.equal(back.logits, msg.logits)


def test_defaults_fill_missing_optional_fields() -> None:
    data = envelope("test.codecs.peer", 1, {"peer_id": b"x"})
    assert decode_message(data) == Peer(peer_id=b"x", role=Role.SERVER, throughput=0.0)
    minimal = body_of(encode_message(everything()))
    required = {k: minimal[k] for k in ("count", "ratio", "name", "blob", "flag", "hidden")}
    back = decode_message(envelope("test.codecs.everything", 3, required))
    assert back.items == [] and back.table == {} and back.peer is None and math.isnan(back.loose)


@PROPERTY
@given(
    nonce=st.integers(-(2**63), 2**63 - 1),
    peer_id=st.binary(max_size=20),
    throughput=st.floats(min_value=0, allow_infinity=False),
    note=st.text(max_size=50),
    role=st.sampled_from(Role),
)
def test_generated_messages_round_trip(nonce: int, peer_id: bytes, throughput: float, note: str, role: Role) -> None:
    for msg in (Ping(nonce=nonce), SpecialPeer(peer_id=peer_id, throughput=throughput, note=note, role=role)):
        assert decode_message(encode_message(msg)) == msg


def test_encoding_is_deterministic_and_ordered() -> None:
    data = encode_message(Peer(peer_id=b"id", throughput=1.5))
    assert data == encode_message(Peer(peer_id=b"id", throughput=1.5))
    assert data == packb(
        {"k": "test.codecs.peer", "v": 1, "b": {"peer_id": b"id", "role": "server", "throughput": 1.5}}
    )


# ---------------------------------------------------------------------------------------------------------------
# Versioning


@register_message
class NewerPing(Message):
    KIND: ClassVar[str] = "test.codecs.strict_ping"
    VERSION: ClassVar[int] = 2
    ACCEPT_NEWER: ClassVar[bool] = False
    nonce: int


def test_newer_version_with_unknown_fields_is_accepted_and_they_are_ignored() -> None:
    data = envelope("test.codecs.ping", 7, {"nonce": 1, "added_in_v7": [1, 2]})
    assert decode_message(data) == Ping(nonce=1)


def test_unknown_fields_at_a_known_version_are_refused() -> None:
    for version in (0, 1):
        with pytest.raises(CodecError, match="unknown fields"):
            decode_message(envelope("test.codecs.ping", version, {"nonce": 1, "typo": 2}))
    assert decode_message(envelope("test.codecs.ping", 0, {"nonce": 1})) == Ping(nonce=1)


def test_schema_can_refuse_newer_versions() -> None:
    assert decode_message(envelope("test.codecs.strict_ping", 2, {"nonce": 1})) == NewerPing(nonce=1)
    with pytest.raises(CodecError, match="newer"):
        decode_message(envelope("test.codecs.strict_ping", 3, {"nonce": 1}))


def test_missing_required_field_is_refused_at_any_version() -> None:
    for version in (1, 9):
        with pytest.raises(CodecError, match="missing required field 'nonce'"):
            decode_message(envelope("test.codecs.ping", version, {}))


@register_message
class Short(Message):
    KIND: ClassVar[str] = "test.codecs.short"
    VERSION: ClassVar[int] = 2
    start_block: int = wire_field(wire_name="a", min_value=0)
    note: str = wire_field(default="", wire_name="n")
    plain: int = 0


def test_wire_names_are_the_body_keys() -> None:
    msg = Short(start_block=3, note="x", plain=1)
    assert unpackb(encode_message(msg))["b"] == {"a": 3, "n": "x", "plain": 1}
    assert decode_message(encode_message(msg)) == msg
    assert decode_message(envelope("test.codecs.short", 3, {"a": 1, "start_block": 9})) == Short(start_block=1)
    with pytest.raises(CodecError, match="unknown fields 'start_block'"):
        decode_message(envelope("test.codecs.short", 2, {"a": 1, "start_block": 9}))
    with pytest.raises(CodecError, match="missing required field 'start_block' \\(key 'a'\\)"):
        decode_message(envelope("test.codecs.short", 2, {"n": "x"}))
    with pytest.raises(CodecError, match=r"test\.codecs\.short\.start_block: int -1 is outside"):
        decode_message(envelope("test.codecs.short", 2, {"a": -1}))


@register_message
class Sparse(Message):
    KIND: ClassVar[str] = "test.codecs.sparse"
    name: str | None = wire_field(default=None, omit_default=True)
    tags: tuple[str, ...] = wire_field(default=(), wire_name="t", omit_default=True)
    flag: bool = wire_field(default=False, omit_default=True)


def test_omit_default_leaves_default_values_out_of_the_body() -> None:
    assert unpackb(encode_message(Sparse()))["b"] == {}
    msg = Sparse(name="x", tags=("a",), flag=True)
    assert unpackb(encode_message(msg))["b"] == {"name": "x", "t": ["a"], "flag": True}
    assert decode_message(encode_message(msg)) == msg
    assert decode_message(encode_message(Sparse())) == Sparse()
    with pytest.raises(TypeError, match="omit_default needs a default"):

        @register_message
        class Required(Message):
            KIND: ClassVar[str] = "test.codecs.omit_required"
            x: int = wire_field(omit_default=True)


def test_wire_names_must_be_unique_non_empty_strings() -> None:
    with pytest.raises(TypeError, match="already used"):

        @register_message
        class Clash(Message):
            KIND: ClassVar[str] = "test.codecs.clash"
            first: int = wire_field(wire_name="x")
            x: int

    with pytest.raises(TypeError, match="non-empty str"):

        @register_message
        class Empty(Message):
            KIND: ClassVar[str] = "test.codecs.empty_wire_name"
            first: int = wire_field(wire_name="")


# ---------------------------------------------------------------------------------------------------------------
# Validation


BAD_BODIES = {
    "bool for int": {"count": True},
    "float for int": {"count": 1.0},
    "int over max": {"count": 1001},
    "int under min": {"count": -1},
    "str for float": {"ratio": "1"},
    "bool for float": {"ratio": False},
    "nan float": {"ratio": math.nan},
    "inf float": {"ratio": math.inf},
    "int for bool": {"flag": 1},
    "name too long": {"name": "x" * 17},
    "bytes for str": {"name": b"x"},
    "str for bytes": {"blob": "x"},
    "list for optional int": {"maybe": [1]},
    "wrong item type": {"items": [1, "2"]},
    "items not a list": {"items": {"a": 1}},
    "tuple wrong length": {"pair": [1]},
    "tuple wrong item": {"pair": ["1", "x"]},
    "dict value type": {"table": {"x": [1.5, "y"]}},
    "dict not a map": {"table": [1]},
    "unknown enum value": {"role": "admin"},
    "enum value wrong type": {"priority": "5"},
    "bool for int enum": {"priority": True},
    "nested wrong kind": {"peer": {"k": "test.codecs.ping", "v": 1, "b": {"nonce": 1}}},
    "nested unknown kind": {"peer": {"k": "test.codecs.nope", "v": 1, "b": {}}},
    "nested not envelope": {"peer": {"peer_id": b"x"}},
    "nested bad field": {"peers": [{"k": "test.codecs.peer", "v": 1, "b": {"peer_id": b"x" * 21}}]},
    "nested negative float": {"peer": {"k": "test.codecs.peer", "v": 1, "b": {"peer_id": b"", "throughput": -1.0}}},
    "union not matching": {"any_ping": {"k": "test.codecs.everything", "v": 3, "b": {}}},
    "tensor wrong dtype": {"hidden": {"dt": "float64", "sh": [1, 1, 8], "c": "raw", "d": bytes(64)}},
    "tensor wrong shape": {"hidden": {"dt": "float32", "sh": [1, 1, 7], "c": "raw", "d": bytes(28)}},
    "tensor not a map": {"hidden": b"\x00" * 32},
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_field_type_violations_raise_codec_error(name: str) -> None:
    body = body_of(encode_message(everything()))
    assert decode_message(envelope("test.codecs.everything", 3, body))  # the baseline is valid
    body.update(BAD_BODIES[name])
    with pytest.raises(CodecError, match=r"test\.codecs\.everything\.\w+: "):
        decode_message(envelope("test.codecs.everything", 3, body))


BAD_ENVELOPES = {
    "not a map": packb([1, 2]),
    "missing body": packb({"k": "test.codecs.ping", "v": 1}),
    "extra key": packb({"k": "test.codecs.ping", "v": 1, "b": {"nonce": 1}, "x": 0}),
    "unknown kind": envelope("test.codecs.unknown", 1, {}),
    "kind not str": envelope(b"test.codecs.ping", 1, {"nonce": 1}),  # type: ignore[arg-type]
    "bool version": envelope("test.codecs.ping", True, {"nonce": 1}),
    "negative version": envelope("test.codecs.ping", -1, {"nonce": 1}),
    "float version": envelope("test.codecs.ping", 1.0, {"nonce": 1}),
    "body not map": envelope("test.codecs.ping", 1, [1]),
    "trailing bytes": encode_message(Ping(nonce=1)) + b"\x00",
    "truncated": encode_message(Ping(nonce=1))[:-1],
}


@pytest.mark.parametrize("name", sorted(BAD_ENVELOPES))
def test_malformed_envelopes_raise_codec_error(name: str) -> None:
    with pytest.raises(CodecError):
        decode_message(BAD_ENVELOPES[name])


def test_expected_kinds() -> None:
    data = encode_message(SpecialPeer(peer_id=b"x"))
    assert isinstance(decode_message(data, expected=Peer), SpecialPeer)  # subclasses match
    assert isinstance(decode_message(data, expected=(Ping, SpecialPeer)), SpecialPeer)
    with pytest.raises(CodecError, match="expected a Ping"):
        decode_message(data, expected=Ping)


@register_message
class Validated(Message):
    KIND: ClassVar[str] = "test.codecs.validated"
    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low > high")


def test_post_init_refusal_becomes_codec_error() -> None:
    assert decode_message(envelope("test.codecs.validated", 1, {"low": 1, "high": 2})) == Validated(low=1, high=2)
    with pytest.raises(CodecError, match="low > high"):
        decode_message(envelope("test.codecs.validated", 1, {"low": 3, "high": 2}))


def test_tensor_bytes_are_bounded_per_message() -> None:
    msg = everything(ids=torch.zeros(1, 100, dtype=torch.int64), logits=torch.zeros(100))
    data = encode_message(msg)
    decode_message(data, limits=CodecLimits(max_decoded_bytes=96 + 800 + 400))
    with pytest.raises(CodecError, match="per-message limit"):
        decode_message(data, limits=CodecLimits(max_decoded_bytes=96 + 800 + 399))


def test_encode_refuses_invalid_messages() -> None:
    bad = [
        everything(count=True),
        everything(count=5000),
        everything(ratio=math.nan),
        everything(name=123),
        everything(hidden=torch.zeros(1, 3, 7)),
        everything(hidden=torch.zeros(1, 3, 8, dtype=torch.float64)),
        everything(peers=[Ping(nonce=1)]),
        everything(table={1: [1.0]}),
        everything(role="server"),
        everything(hidden=torch.full((1, 1, 8), math.nan)),  # with INT8 below
    ]
    for msg in bad:
        with pytest.raises(CodecError):
            encode_message(msg, tensor_codec=TensorCodec.INT8)
    with pytest.raises(CodecError, match="exceeds"):
        encode_message(everything(), limits=CodecLimits(max_message_bytes=100))
    with pytest.raises(CodecError):
        encode_message("ping")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Registration


def test_register_message_checks_the_class() -> None:
    with pytest.raises(TypeError, match="subclass of Message"):
        register_message(int)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="already registered"):

        @register_message
        class Impostor(Message):
            KIND: ClassVar[str] = "test.codecs.ping"
            nonce: int

    with pytest.raises(TypeError, match="frozen"):

        @register_message
        @dataclass(kw_only=True)
        class Mutable(Message):
            KIND: ClassVar[str] = "test.codecs.mutable"

    with pytest.raises(TypeError, match="keyword-only"):

        @register_message
        @dataclass(frozen=True, slots=True)
        class Positional(Message):
            KIND: ClassVar[str] = "test.codecs.positional"
            x: int

    with pytest.raises(TypeError, match="not supported"):

        @register_message
        class Unsupported(Message):
            KIND: ClassVar[str] = "test.codecs.unsupported"
            x: set[int]

    with pytest.raises(TypeError, match="KIND"):

        @register_message
        class BadKind(Message):
            KIND: ClassVar[str] = "Has Spaces"

    assert registered_messages()["test.codecs.ping"] is Ping
    assert "test.codecs.unsupported" not in registered_messages()


def test_registered_messages_are_frozen_slotted_keyword_only() -> None:
    ping = Ping(nonce=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ping.nonce = 2  # type: ignore[misc]
    assert not hasattr(ping, "__dict__")
    with pytest.raises(TypeError):
        Ping(1)  # type: ignore[misc]


def test_unregistered_message_cannot_be_encoded() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Loose(Message):
        KIND: ClassVar[str] = "test.codecs.loose"

    with pytest.raises(CodecError, match="not a registered message"):
        encode_message(Loose())


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: untrusted bytes only ever produce CodecError


@PROPERTY
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_codec_error(data: bytes) -> None:
    try:
        decode_message(data)
    except CodecError:
        pass


FIELD_NAMES = [f.name for f in dataclasses.fields(Everything)] + ["k", "v", "b", "dt", "sh", "c", "d", "peer_id"]
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=40)
    | st.sampled_from(["float32", "raw", "int8", "server", "test.codecs.peer"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(
    kind=st.sampled_from(sorted(k for k in registered_messages() if k.startswith("test.codecs."))),
    version=st.integers(-1, 5) | st.booleans(),
    body=st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=8),
)
def test_arbitrary_envelopes_only_ever_raise_codec_error(kind: str, version: int, body: dict) -> None:
    try:
        msg = decode_message(envelope(kind, version, body))
    except CodecError:
        return
    assert isinstance(msg, Message)


@PROPERTY
@given(data=st.data(), codec=st.sampled_from(TensorCodec), zstd=st.booleans())
def test_mutated_messages_only_ever_raise_codec_error(data: st.DataObject, codec: TensorCodec, zstd: bool) -> None:
    packed = bytearray(encode_message(everything(), tensor_codec=codec, zstd=zstd))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(packed) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            packed[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del packed[at:]
            break
        else:
            packed[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    try:
        msg = decode_message(bytes(packed))
    except CodecError:
        return
    assert isinstance(msg, Message)


def test_all_is_sorted_and_complete() -> None:
    exported = petalnode.codecs.__all__

    def isort_style(name: str) -> tuple[int, str]:  # ruff's RUF022 order: CONSTANTS, Classes, functions
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert exported == sorted(exported, key=isort_style)
    # dir(), not vars(): the tensor names are loaded on first access (PEP 562) and may not be loaded yet.
    public = {name for name in dir(petalnode.codecs) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(petalnode.codecs, name)).__name__ == "module"}
    assert set(exported) == public - modules


@register_message
class Chain(Message):
    KIND: ClassVar[str] = "test.codecs.chain"
    next: Chain | None = None


def test_recursive_messages_nest_up_to_the_depth_limit() -> None:
    chain = Chain()
    for _ in range(10):
        chain = Chain(next=chain)
    assert decode_message(encode_message(chain)) == chain
    for _ in range(3000):
        chain = Chain(next=chain)
    with pytest.raises(CodecError):
        encode_message(chain)
    deep = packb({"k": "test.codecs.chain", "v": 1, "b": {}})
    for _ in range(20):
        deep = b"\x83\xa1k\xb1test.codecs.chain\xa1v\x01\xa1b\x81\xa4next" + deep
    with pytest.raises(CodecError, match="nesting"):
        decode_message(deep)

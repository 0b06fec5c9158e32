"""Golden bytes for every wire format: an accidental format change fails here.

Each case encodes a fixed input and compares the bytes with tests/unit/golden/codecs/<case>.msgpack, then
decodes the stored bytes and compares the result with the input (raw codecs) and with the SHA-256 of the decoded
value recorded in manifest.json (all codecs). zstd frames are compared after decompression, because another
zstd release may compress differently while staying compatible.

Checking never writes the files. After an intended format change, regenerate them as a separate step
    PYTHONPATH=. .venv/bin/python -m tests.unit.test_codecs_golden
then run the tests and review the diff: changed bytes mean old peers can no longer talk to new ones. (The old way,
PETALNODE_REGEN_GOLDEN=1 under pytest, rewrote the files in the very run that checked them, so it always passed.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import zstandard

from petalnode.codecs import (
    Message,
    TensorCodec,
    decode_message,
    decode_tensor,
    encode_message,
    encode_tensor,
    packb,
    register_message,
    unpackb,
    wire_field,
)

GOLDEN_DIR = Path(__file__).parent / "golden" / "codecs"
MANIFEST = GOLDEN_DIR / "manifest.json"


def pattern(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Values exactly representable in every float dtype (multiples of 1/8 in [-6.25, 6.25]); no libm calls,
    so the input is identical on every machine and torch version."""
    return (((torch.arange(n, dtype=torch.int64) * 37) % 101 - 50).to(torch.float64) / 8).to(dtype)


def specials(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [math.nan, math.inf, -math.inf, -0.0, 0.0, info.tiny, info.tiny / 4, info.max, -info.max, 1 / 3]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def ints(dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    return torch.tensor([info.min, info.max, 0, 1, -1 if info.min < 0 else 2, 12345 % (info.max + 1)], dtype=dtype)


TENSOR_CASES: dict[str, tuple[Callable[[], torch.Tensor], TensorCodec, bool, int]] = {
    "raw_float32": (lambda: torch.cat([specials(torch.float32), pattern(10, torch.float32)]).reshape(4, 5),
                    TensorCodec.RAW, False, 64),
    "raw_float64": (lambda: specials(torch.float64), TensorCodec.RAW, False, 64),
    "raw_float16": (lambda: specials(torch.float16), TensorCodec.RAW, False, 64),
    "raw_bfloat16": (lambda: specials(torch.bfloat16).reshape(2, 5), TensorCodec.RAW, False, 64),
    "raw_int64": (lambda: ints(torch.int64), TensorCodec.RAW, False, 64),
    "raw_int32": (lambda: ints(torch.int32), TensorCodec.RAW, False, 64),
    "raw_int16": (lambda: ints(torch.int16), TensorCodec.RAW, False, 64),
    "raw_int8": (lambda: ints(torch.int8), TensorCodec.RAW, False, 64),
    "raw_uint8": (lambda: ints(torch.uint8), TensorCodec.RAW, False, 64),
    "raw_bool": (lambda: torch.tensor([[True, False, True], [False, False, True]]), TensorCodec.RAW, False, 64),
    "raw_scalar": (lambda: torch.tensor(2.5), TensorCodec.RAW, False, 64),
    "raw_empty": (lambda: torch.empty(0, 3, dtype=torch.float16), TensorCodec.RAW, False, 64),
    "raw_float32_zstd": (lambda: pattern(300, torch.float32).reshape(1, 3, 100), TensorCodec.RAW, True, 64),
    "fp16_from_float32": (lambda: torch.cat([specials(torch.float16).float(), pattern(6, torch.float32) / 3]),
                          TensorCodec.FP16, False, 64),
    "bf16_from_float32": (lambda: torch.cat([specials(torch.bfloat16).float(), pattern(6, torch.float32) / 3]),
                          TensorCodec.BF16, False, 64),
    "int8_float32": (lambda: (pattern(130, torch.float32) / 3).reshape(2, 65), TensorCodec.INT8, False, 64),
    "int8_bfloat16_block16": (lambda: pattern(40, torch.bfloat16), TensorCodec.INT8, False, 16),
    "int8_float32_zstd": (lambda: pattern(200, torch.float32) * 7, TensorCodec.INT8, True, 64),
}  # fmt: skip


@register_message
class GoldenInner(Message):
    KIND: ClassVar[str] = "test.codecs.golden_inner"
    VERSION: ClassVar[int] = 1
    name: str
    weight: float = 1.0


@register_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class GoldenMessage(Message):
    KIND: ClassVar[str] = "test.codecs.golden"
    VERSION: ClassVar[int] = 4
    small: int
    big: int = wire_field(min_value=0, max_value=2**64 - 1)
    negative: int
    ratio: float
    text: str
    blob: bytes
    flag: bool
    nothing: int | None
    numbers: list[int]
    pair: tuple[str, float]
    table: dict[str, bool]
    inner: GoldenInner
    inners: list[GoldenInner]
    hidden: torch.Tensor
    ids: torch.Tensor


def golden_message() -> GoldenMessage:
    return GoldenMessage(
        small=5,
        big=2**64 - 1,
        negative=-(2**40),
        ratio=-0.1,
        text="héllo ✓",
        blob=bytes(range(8)),
        flag=False,
        nothing=None,
        numbers=[0, 127, 128, -32, -33, 65536],
        pair=("x", 2.5),
        table={"a": True, "b": False},
        inner=GoldenInner(name="in"),
        inners=[GoldenInner(name="a", weight=0.5), GoldenInner(name="b")],
        hidden=pattern(2 * 3 * 16, torch.float32).reshape(2, 3, 16),
        ids=torch.tensor([[1, 2, 49151]]),
    )


MESSAGE_CASES: dict[str, tuple[TensorCodec, bool]] = {
    "message_raw": (TensorCodec.RAW, False),
    "message_int8_zstd": (TensorCodec.INT8, True),
    "message_bf16": (TensorCodec.BF16, False),
}


# ---------------------------------------------------------------------------------------------------------------


def normalize(obj: Any) -> Any:
    """The parsed message with every zstd payload decompressed (compressed bytes may differ across zstd)."""
    if isinstance(obj, dict):
        out = {k: normalize(v) for k, v in obj.items()}
        if out.get("z") == "zstd":
            out["d"] = zstandard.ZstdDecompressor().decompress(out["d"])
        return out
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    return obj


def tensor_digest(t: torch.Tensor) -> str:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + data).hexdigest()


def message_digest(msg: Message) -> str:
    return hashlib.sha256(encode_message(msg)).hexdigest()  # RAW: captures every decoded field exactly


def encode_case(name: str) -> bytes:
    if name in TENSOR_CASES:
        build, codec, zstd, block_size = TENSOR_CASES[name]
        return packb(encode_tensor(build(), codec, zstd=zstd, block_size=block_size))
    codec, zstd = MESSAGE_CASES[name]
    return encode_message(golden_message(), tensor_codec=codec, zstd=zstd)


def decode_case(name: str, data: bytes) -> str:
    if name in TENSOR_CASES:
        return tensor_digest(decode_tensor(unpackb(data)))
    return message_digest(decode_message(data, expected=GoldenMessage))


ALL_CASES = sorted([*TENSOR_CASES, *MESSAGE_CASES])


def load_manifest() -> dict[str, str]:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def write_golden() -> None:
    """Rewrite every golden file and the manifest from the cases (a separate step, never run by the tests)."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in ALL_CASES:
        data = encode_case(name)
        (GOLDEN_DIR / f"{name}.msgpack").write_bytes(data)
        manifest[name] = decode_case(name, data)
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("name", ALL_CASES)
def test_encoding_matches_golden_bytes(name: str) -> None:
    golden = (GOLDEN_DIR / f"{name}.msgpack").read_bytes()
    encoded = encode_case(name)
    if "zstd" in name:
        assert normalize(unpackb(encoded)) == normalize(unpackb(golden))
    else:
        assert encoded == golden


@pytest.mark.parametrize("name", ALL_CASES)
def test_golden_bytes_decode_to_the_recorded_value(name: str) -> None:
    golden = (GOLDEN_DIR / f"{name}.msgpack").read_bytes()
    assert decode_case(name, golden) == load_manifest()[name]


@pytest.mark.parametrize("name", sorted(n for n, case in TENSOR_CASES.items() if case[1] is TensorCodec.RAW))
def test_raw_golden_bytes_decode_to_the_exact_input(name: str) -> None:
    golden = (GOLDEN_DIR / f"{name}.msgpack").read_bytes()
    assert tensor_digest(decode_tensor(unpackb(golden))) == tensor_digest(TENSOR_CASES[name][0]())


def test_every_golden_file_has_a_case() -> None:
    # A stale file means a case was removed or renamed: its format is no longer pinned.
    files = {p.stem for p in GOLDEN_DIR.glob("*.msgpack")}
    assert files == set(ALL_CASES)
    assert set(load_manifest()) == set(ALL_CASES)
    codecs_covered = {case[1] for case in TENSOR_CASES.values()}
    assert codecs_covered == set(TensorCodec)


if __name__ == "__main__":
    write_golden()
    print(f"rewrote the golden files in {GOLDEN_DIR}; run the tests and review the diff before committing")

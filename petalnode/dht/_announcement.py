# What a server announces under the keys of the blocks it hosts (Petals' ServerInfo, signed), and those keys.
#
# Invariants:
# - Blocks are announced in groups of BLOCKS_PER_KEY consecutive blocks: one key `{model}.{first}:{end}` per
#   group (Petals uses one key per block). A server writes one record per group its range overlaps, and a
#   reader does one lookup per group of the model, so a swarm view of an 80-block model is 10 lookups, not 80,
#   and a refresh of a 20-block span is 3-4 stores, not 20. The announcement inside says which blocks of the
#   group the server really hosts; readers drop it where its range misses the group it was found under.
# - The group size is part of the key text, so peers that group differently never misread each other's keys.
# - Wire form is a msgpack map with one-letter string keys; keys we do not know (a newer version's fields)
#   are ignored, keys we require must be present with the right type and range.
# - The encoded announcement always fits a DHT record value (MAX_VALUE_BYTES), checked at encode time.
# - Decoding never evaluates anything and uses strict msgpack size limits.
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from petalnode.dht._record import MAX_VALUE_BYTES
from petalnode.errors import CodecError

MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 160
MAX_VERSION_CHARS = 32
MAX_PUBLIC_NAME_CHARS = 64
MAX_MODEL_CHARS = 128
MAX_BLOCKS = 100_000
MAX_ADAPTERS = 8
MAX_ADAPTER_CHARS = 64


class ServerState(enum.IntEnum):
    """A server's lifecycle as announced (Petals: joining, online, offline); ints on the wire."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


# Servers host spans of about 4-40 blocks and models have 24-80, so 8 blocks per key makes a swarm view a handful
# of lookups and a refresh one to five stores; a key then holds the servers of 8 blocks (see the storage caps).
BLOCKS_PER_KEY = 8


def block_key(model: str, block: int) -> str:
    """The DHT key under which servers hosting `block` announce: that of its group, `{model}.{first}:{end}`."""
    if type(block) is not int or block < 0:
        raise ValueError(f"a block index is a non-negative int, got {block!r}")
    first = block - block % BLOCKS_PER_KEY
    return f"{model}.{first}:{first + BLOCKS_PER_KEY}"


def block_keys(model: str, start: int, end: int) -> list[str]:
    """The keys a server hosting blocks [start, end) announces under: one per group the range overlaps."""
    return list(dict.fromkeys(block_key(model, block) for block in range(start, end)))


def model_keys(model: str, num_blocks: int) -> dict[str, tuple[int, int]]:
    """Every key of a `num_blocks` model, with the blocks [first, end) it covers (the last group may be short)."""
    return {
        block_key(model, first): (first, min(first + BLOCKS_PER_KEY, num_blocks))
        for first in range(0, num_blocks, BLOCKS_PER_KEY)
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """One server's state for its contiguous block range [start_block, end_block)."""

    state: ServerState
    model: str
    start_block: int
    end_block: int
    throughput: float
    cache_tokens_left: int
    addresses: tuple[str, ...]
    version: str
    public_name: str | None = None
    # Names of the LoRA adapters this server can apply (clients asking for one route only through such servers).
    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.state, ServerState):
            raise CodecError(f"announcement state must be a ServerState, got {self.state!r}")
        _check_text("model", self.model, MAX_MODEL_CHARS, allow_empty=False)
        for name in ("start_block", "end_block", "cache_tokens_left"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**53:
                raise CodecError(f"announcement {name} must be a non-negative int, got {value!r}")
        if not self.start_block < self.end_block <= self.start_block + MAX_BLOCKS:
            raise CodecError(f"announcement block range [{self.start_block}, {self.end_block}) is invalid")
        if not isinstance(self.throughput, float) or not math.isfinite(self.throughput) or self.throughput < 0:
            raise CodecError(f"announcement throughput must be a finite float >= 0, got {self.throughput!r}")
        if not isinstance(self.addresses, tuple) or len(self.addresses) > MAX_ADDRESSES:
            raise CodecError(f"announcement addresses must be a tuple of at most {MAX_ADDRESSES}")
        for address in self.addresses:
            _check_text("address", address, MAX_ADDRESS_CHARS, allow_empty=False)
        _check_text("version", self.version, MAX_VERSION_CHARS, allow_empty=True)
        if self.public_name is not None:
            _check_text("public_name", self.public_name, MAX_PUBLIC_NAME_CHARS, allow_empty=False)
        if not isinstance(self.adapters, tuple) or len(self.adapters) > MAX_ADAPTERS:
            raise CodecError(f"announcement adapters must be a tuple of at most {MAX_ADAPTERS}")
        for adapter in self.adapters:
            _check_text("adapter", adapter, MAX_ADAPTER_CHARS, allow_empty=False)

    def block_keys(self) -> list[str]:
        """The keys this announcement belongs under (see `block_keys`)."""
        return block_keys(self.model, self.start_block, self.end_block)

    def to_bytes(self) -> bytes:
        wire: dict[str, Any] = {
            "s": int(self.state), "m": self.model, "a": self.start_block, "b": self.end_block,
            "t": self.throughput, "c": self.cache_tokens_left, "x": list(self.addresses), "v": self.version,
        }
        if self.public_name is not None:
            wire["n"] = self.public_name
        if self.adapters:
            wire["l"] = list(self.adapters)
        data = msgpack.packb(wire, use_bin_type=True)
        if len(data) > MAX_VALUE_BYTES:
            raise CodecError(f"announcement of {len(data)} bytes exceeds {MAX_VALUE_BYTES}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Announcement:
        """Parse and validate; fields unknown to this version are ignored. Raises `CodecError`."""
        if not isinstance(data, bytes) or len(data) > MAX_VALUE_BYTES:
            raise CodecError("announcement must be bytes within the DHT value limit")
        try:
            wire = msgpack.unpackb(
                data, raw=False, strict_map_key=True, max_str_len=MAX_VALUE_BYTES, max_bin_len=MAX_VALUE_BYTES,
                max_array_len=64, max_map_len=64, max_ext_len=0,
            )
        except Exception as e:  # msgpack raises several unrelated types
            raise CodecError(f"undecodable announcement: {type(e).__name__}") from e
        if not isinstance(wire, dict):
            raise CodecError("announcement must be a map")
        try:
            state = ServerState(_get(wire, "s", int))
        except ValueError as e:
            raise CodecError(f"unknown announcement state {wire.get('s')!r}") from e
        throughput = _get(wire, "t", (int, float))
        addresses = _get(wire, "x", list)
        name = wire.get("n")
        adapters = wire.get("l", [])
        if not isinstance(adapters, list):
            raise CodecError("announcement field 'l' has the wrong type")
        return cls(
            state=state, model=_get(wire, "m", str), start_block=_get(wire, "a", int), end_block=_get(wire, "b", int),
            throughput=float(throughput), cache_tokens_left=_get(wire, "c", int), addresses=tuple(addresses),
            version=_get(wire, "v", str), public_name=name, adapters=tuple(adapters),
        )


def _get(wire: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in wire:
        raise CodecError(f"announcement is missing field {key!r}")
    value = wire[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise CodecError(f"announcement field {key!r} has the wrong type")
    return value


def _check_text(name: str, value: object, max_chars: int, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or len(value) > max_chars or (not value and not allow_empty):
        raise CodecError(f"announcement {name} must be a string of at most {max_chars} characters")

# What a server announces under the keys of the blocks it hosts (Petals' ServerInfo, signed), and those keys.
#
# Invariants:
# - Blocks are announced in groups of BLOCKS_PER_KEY consecutive blocks: one key `{model}.{first}:{end}` per
#   group (Petals uses one key per block). A server writes one record per group its range overlaps, and a
#   reader does one lookup per group of the model, so a swarm view of an 80-block model is 10 lookups, not 80,
#   and a refresh of a 20-block span is 3-4 stores, not 20. The announcement inside says which blocks of the
#   group the server really hosts; readers drop it where its range misses the group it was found under.
# - The group size is part of the key text, so peers that group differently never misread each other's keys.
# - Wire form: a registered petalnode.codecs message (KIND "dht.announcement", VERSION 2), so the envelope
#   {"k": kind, "v": version, "b": body}, with one-letter body keys (`wire_name`) to keep records small:
#   s state, m model, a start_block, b end_block, t throughput, c cache_tokens_left, x addresses, v version,
#   n public_name, l adapters, d span_digest (n, l and d left out while None / empty). Record.value is exactly
#   these bytes, and the record signature covers them.
# - VERSION 2 added d: the content digest of blocks [a, b) of the weights the server loaded (compute/_digest.py,
#   32 bytes); "m" stays the human-readable name. A VERSION 1 record reads with span_digest None (clients that
#   check identity do not route through it).
# - Versions: a reader decodes an announcement of a newer VERSION, ignoring body keys it does not know (fields
#   added later), and checks the ones it knows as usual; one that then fails (a field it requires is missing or
#   has another type) is refused with a CodecError naming the field, and a swarm lookup skips just that record
#   (node/_swarm.py). A change that alters the meaning of existing fields needs a new KIND, not a new VERSION.
# - The encoded announcement always fits a DHT record value (MAX_VALUE_BYTES), checked at encode time.
# - Decoding never evaluates anything and uses the codecs' bounded msgpack decoder under ANNOUNCEMENT_LIMITS.
from __future__ import annotations

import enum
import math
from typing import ClassVar

from petalnode.codecs import CodecLimits, Message, decode_message, encode_message, register_message, wire_field
from petalnode.dht._record import MAX_VALUE_BYTES
from petalnode.errors import CodecError

MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 160
MAX_VERSION_CHARS = 32
# 48, not 64 as in VERSION 1: the 34 bytes of the span digest (VERSION 2) must still fit the largest record in
# MAX_VALUE_BYTES (1017 bytes with every field at its limit; 1033 with a 64-character name).
MAX_PUBLIC_NAME_CHARS = 48
MAX_MODEL_CHARS = 128
MAX_BLOCKS = 100_000
MAX_ADAPTERS = 8
MAX_ADAPTER_CHARS = 64
SPAN_DIGEST_BYTES = 32  # sha256 (compute/_digest.py DIGEST_BYTES; dht does not import compute)
# An announcement is one record value: at most MAX_VALUE_BYTES, a handful of maps and arrays (the envelope, the
# body, addresses, adapters), each at most 64 items; depth 8 leaves room for nested fields of later versions.
ANNOUNCEMENT_LIMITS = CodecLimits(
    max_message_bytes=MAX_VALUE_BYTES, max_str_len=MAX_VALUE_BYTES, max_bytes_len=MAX_VALUE_BYTES,
    max_container_len=64, max_depth=8, max_objects=MAX_VALUE_BYTES,
)


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


@register_message
class Announcement(Message):
    """One server's state for its contiguous block range [start_block, end_block)."""

    KIND: ClassVar[str] = "dht.announcement"
    VERSION: ClassVar[int] = 2

    state: ServerState = wire_field(wire_name="s")
    model: str = wire_field(wire_name="m", max_len=MAX_MODEL_CHARS)
    start_block: int = wire_field(wire_name="a", min_value=0, max_value=2**53 - 1)
    end_block: int = wire_field(wire_name="b", min_value=0, max_value=2**53 - 1)
    throughput: float = wire_field(wire_name="t", min_value=0.0)
    cache_tokens_left: int = wire_field(wire_name="c", min_value=0, max_value=2**53 - 1)
    addresses: tuple[str, ...] = wire_field(wire_name="x", max_len=MAX_ADDRESSES)
    version: str = wire_field(wire_name="v", max_len=MAX_VERSION_CHARS)
    public_name: str | None = wire_field(default=None, wire_name="n", max_len=MAX_PUBLIC_NAME_CHARS, omit_default=True)
    # Names of the LoRA adapters this server can apply (clients asking for one route only through such servers).
    adapters: tuple[str, ...] = wire_field(default=(), wire_name="l", max_len=MAX_ADAPTERS, omit_default=True)
    # VERSION 2: which weights these are (the digest of blocks [start_block, end_block), see compute/_digest.py).
    span_digest: bytes | None = wire_field(default=None, wire_name="d", max_len=SPAN_DIGEST_BYTES, omit_default=True)

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
        if self.span_digest is not None and (
                not isinstance(self.span_digest, bytes) or len(self.span_digest) != SPAN_DIGEST_BYTES):
            raise CodecError(f"announcement span_digest must be {SPAN_DIGEST_BYTES} bytes")

    def block_keys(self) -> list[str]:
        """The keys this announcement belongs under (see `block_keys`)."""
        return block_keys(self.model, self.start_block, self.end_block)

    def to_bytes(self) -> bytes:
        """The record value: the encoded message. Raises `CodecError` if it would not fit a DHT value."""
        return encode_message(self, limits=ANNOUNCEMENT_LIMITS)

    @classmethod
    def from_bytes(cls, data: bytes) -> Announcement:
        """Parse and validate a record value (see the module header for versions). Raises `CodecError`."""
        if not isinstance(data, bytes):
            raise CodecError(f"an announcement is bytes, got {type(data).__name__}")
        return decode_message(data, limits=ANNOUNCEMENT_LIMITS, expected=cls)  # type: ignore[return-value]


def _check_text(name: str, value: object, max_chars: int, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or len(value) > max_chars or (not value and not allow_empty):
        raise CodecError(f"announcement {name} must be a string of at most {max_chars} characters")

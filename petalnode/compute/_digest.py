# Content-addressed model identity: what "the same model" means between a client and a server.
#
# Invariants:
# - A block digest is sha256 over a domain tag, the config digest, and every tensor of the block in sorted name
#   order: its name, dtype, shape and raw stored bytes (safetensors stores little-endian, so the bytes are the
#   same on every machine). Two checkpoints agree on a block's digest iff they agree on the config fields that
#   change the computation and on every byte of that block's tensors, whatever the sharding or file names.
# - The config digest covers the model's config.json minus fields that do not change what a block computes
#   (NON_COMPUTATIONAL_CONFIG_KEYS, and keys starting with "_"). It is read from the file, not from transformers'
#   config object, whose defaults change between transformers versions (peers on different versions still agree).
# - A span digest is sha256 over a domain tag and the block digests of [start, end) in order, so a server
#   announces one 32-byte value for its span and hashes only the blocks it loads.
# - Pure: no file is opened here except through the `read` callable a caller passes (compute/_loader.py reads
#   through CheckpointReader), and nothing depends on the clock or the process.
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIGEST_BYTES = 32
SHORT_HEX_CHARS = 12
_CONFIG_TAG = b"petalnode.config.v1\0"
_BLOCK_TAG = b"petalnode.block.v1\0"
_SPAN_TAG = b"petalnode.span.v1\0"

NON_COMPUTATIONAL_CONFIG_KEYS = frozenset({
    # Bookkeeping written by the tool that saved the file.
    "transformers_version", "architectures", "auto_map", "model_type_version",
    # The stored dtype is covered by each tensor's dtype; the compute dtype is a server's choice.
    "torch_dtype", "dtype",
    # Generation and tokenizer settings: they change what the client does with logits, not what a block computes.
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "task_specific_params",
    "problem_type", "tokenizer_class", "prefix",
})


@dataclass(frozen=True, slots=True)
class TensorLocation:
    """A tensor as stored: bytes [begin, end) of `path`, with its safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int


def canonical_config(config: Mapping[str, Any]) -> bytes:
    """The config fields that change the computation, as canonical JSON (sorted keys, no spaces, ASCII)."""
    kept = {k: v for k, v in config.items() if k not in NON_COMPUTATIONAL_CONFIG_KEYS and not k.startswith("_")}
    try:
        return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model config cannot be hashed canonically: {e}") from e


def config_digest(config: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(_CONFIG_TAG + canonical_config(config)).digest()


def block_digest(
    config_digest_: bytes, tensors: Iterable[TensorLocation], read: Callable[[TensorLocation], Iterable[bytes]],
) -> bytes:
    """sha256 over the config digest and the block's tensors in sorted name order.

    `read(location)` yields the tensor's stored bytes in chunks (at least `end - begin` bytes in total are
    checked here, so a short read cannot go unnoticed).
    """
    _check_digest(config_digest_, "config digest")
    h = hashlib.sha256(_BLOCK_TAG + config_digest_)
    ordered = sorted(tensors, key=lambda t: t.name)
    if not ordered:
        raise ValueError("a block has at least one tensor")
    h.update(struct.pack("<Q", len(ordered)))
    for t in ordered:
        _update_text(h, t.name)
        _update_text(h, t.dtype)
        h.update(struct.pack(f"<Q{len(t.shape)}Q", len(t.shape), *t.shape))
        size = t.end - t.begin
        h.update(struct.pack("<Q", size))
        seen = 0
        for chunk in read(t):
            seen += len(chunk)
            h.update(chunk)
        if seen != size:
            raise ValueError(f"tensor {t.name}: read {seen} bytes, expected {size}")
    return h.digest()


def span_digest(digest_of_block: Callable[[int], bytes], start: int, end: int) -> bytes:
    """The digest a server announces for blocks [start, end): sha256 over those blocks' digests, in order.

    `digest_of_block(i)` is asked only for blocks in [start, end) (e.g. a list's or a dict's `__getitem__`).
    """
    if type(start) is not int or type(end) is not int or not 0 <= start < end:
        raise ValueError(f"blocks [{start}, {end}) are empty or negative")
    h = hashlib.sha256(_SPAN_TAG + struct.pack("<QQ", start, end))
    for index in range(start, end):
        digest = digest_of_block(index)
        _check_digest(digest, f"block {index}'s digest")
        h.update(digest)
    return h.digest()


def short_digest(digest: bytes | None) -> str:
    """The first SHORT_HEX_CHARS hex digits, for display ("-" when there is none)."""
    return "-" if digest is None else digest.hex()[:SHORT_HEX_CHARS]


def _update_text(h: Any, text: str) -> None:
    data = text.encode("utf-8")
    h.update(struct.pack("<Q", len(data)) + data)


def _check_digest(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise ValueError(f"{what} must be {DIGEST_BYTES} bytes")

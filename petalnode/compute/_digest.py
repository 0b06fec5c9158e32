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
# - Pinned digests (`pins_to_json` / `pins_from_json`) are the block digests of a model written by a machine that
#   has its full copy (`petalnode digest`), for a client that does not (only the head, a partial download): the
#   client then checks servers against the pins instead of its own files.
# - Pure: no file is opened here except through the `read` callable a caller passes (compute/_loader.py reads
#   through CheckpointReader), and nothing depends on the clock or the process.
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
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


PINS_VERSION = 1
MAX_PINNED_BLOCKS = 100_000  # as many blocks as an announcement may span (dht/_announcement.py MAX_BLOCKS)


def pins_to_json(model: str, block_digests: Sequence[bytes]) -> str:
    """A pin file: the model's name (for display), its whole-model digest (to compare by eye) and every block's."""
    if not block_digests:
        raise ValueError("a model has at least one block")
    whole = span_digest(block_digests.__getitem__, 0, len(block_digests))
    return json.dumps({"version": PINS_VERSION, "model": model, "digest": whole.hex(),
                       "blocks": [d.hex() for d in block_digests]}, indent=1)


def pins_from_json(text: str) -> tuple[str, list[bytes]]:
    """(model name, block digests) from a pin file. Raises `ValueError` naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not a digest pin file (invalid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("version") != PINS_VERSION:
        raise ValueError(f"not a digest pin file of version {PINS_VERSION}")
    model, blocks, whole = data.get("model"), data.get("blocks"), data.get("digest")
    if not isinstance(model, str) or not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_PINNED_BLOCKS:
        raise ValueError("a digest pin file has a model name and a list of 1 to 100000 block digests")
    digests: list[bytes] = []
    for index, value in enumerate(blocks):
        try:
            digest = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"block {index}'s pinned digest is not {2 * DIGEST_BYTES} hex digits")
        digests.append(digest)
    if whole != span_digest(digests.__getitem__, 0, len(digests)).hex():
        raise ValueError("the pin file's model digest does not match its block digests (edited or truncated?)")
    return model, digests


def short_digest(digest: bytes | None) -> str:
    """The first SHORT_HEX_CHARS hex digits, for display ("-" when there is none)."""
    return "-" if digest is None else digest.hex()[:SHORT_HEX_CHARS]


def _update_text(h: Any, text: str) -> None:
    data = text.encode("utf-8")
    h.update(struct.pack("<Q", len(data)) + data)


def _check_digest(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise ValueError(f"{what} must be {DIGEST_BYTES} bytes")

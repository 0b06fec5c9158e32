# Size limits every decoder in petalnode.codecs enforces on untrusted bytes.
#
# Invariants:
# - Every limit is a positive int, checked *before* the memory it guards is allocated: the message length before
#   parsing, token counts, container lengths and nesting depth during a pre-scan of the msgpack bytes, element
#   counts before a tensor is built, and decompressed sizes before zstd runs.
# - Decoding a message that passes these limits allocates at most a small multiple of
#   `max_message_bytes + max_decoded_bytes` (Python objects for at most `max_objects` msgpack tokens, plus tensors).

from __future__ import annotations

from dataclasses import dataclass

from petalnode.errors import CodecError, ConfigError

MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecLimits:
    """Limits a receiver enforces on every message and tensor it decodes.

    Defaults come from the largest legitimate payload we expect: a long prefill of a big model (say (1, 32768,
    8192) fp32, 1 GiB) must be chunked anyway, and a (1, 1024, 8192) fp32 chunk (32 MiB) fits with room to
    spare. Control messages are tiny, so the per-token limits are far above their needs and far below what
    would hurt the node (2**18 tokens cost about 0.2 s to scan and tens of MiB of Python objects at worst).

    Attributes:
        max_message_bytes: longest encoded message accepted (64 MiB).
        max_tensor_elements: most elements in one tensor (2**26).
        max_ndim: most dimensions of one tensor.
        max_str_len: longest msgpack str, in UTF-8 bytes.
        max_bytes_len: longest msgpack bin (tensor payloads are bins).
        max_container_len: most items in one array, or pairs in one map.
        max_depth: deepest nesting of arrays and maps (an envelope with a tensor field is depth 3).
        max_objects: most msgpack tokens in one message; bounds Python objects allocated while parsing.
        max_decoded_bytes: most bytes of tensor data one message may expand to (zstd and int8 expand).
    """

    max_message_bytes: int = 64 * MIB
    max_tensor_elements: int = 2**26
    max_ndim: int = 8
    max_str_len: int = 1 * MIB
    max_bytes_len: int = 64 * MIB
    max_container_len: int = 2**20
    max_depth: int = 32
    max_objects: int = 2**18
    max_decoded_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"CodecLimits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = CodecLimits()


@dataclass(slots=True)
class DecodeBudget:
    """Bytes of tensor data still allowed for one message (`max_decoded_bytes`); shared by all tensors in it."""

    remaining: int

    def spend(self, nbytes: int) -> None:
        if nbytes > self.remaining:
            raise CodecError(f"tensor data exceeds the per-message limit (needs {nbytes}, {self.remaining} left)")
        self.remaining -= nbytes

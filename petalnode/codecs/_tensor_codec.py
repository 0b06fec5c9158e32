# The names of the tensor value codecs, apart from the tensor code itself so the message layer can name them
# without importing torch (a DHT-only process never loads torch; see _tensor.py for what each codec does).

from __future__ import annotations

import enum


class TensorCodec(enum.Enum):
    """How a floating tensor's values travel; the decoder always restores the original dtype."""

    RAW = "raw"  # keep the dtype, bit-exact
    FP16 = "fp16"  # IEEE half: exact for fp16 input, otherwise rounded
    BF16 = "bf16"  # bfloat16: exact for bf16 input, otherwise rounded
    INT8 = "int8"
    """Blockwise symmetric int8 with an fp32 absmax scale per `block_size` elements (26.6 % of fp32 at 64).

    Error bound per element x of a block with absmax A: |x - x'| <= A / 254 + A * 2**-20 + 2**-126 (half a
    quantization step plus fp32 rounding), plus the rounding of the result into an fp16/bf16 original dtype.
    NaN and infinity are refused at encode time with CodecError (see _int8.py)."""

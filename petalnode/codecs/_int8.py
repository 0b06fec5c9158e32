# Blockwise symmetric 8-bit quantization with one fp32 absmax scale per block (pure tensor functions, no I/O).
#
# Invariants:
# - The flattened tensor is cut into blocks of `block_size` elements; the last block may be short.
#   For each block, scale = fp32(absmax / 127) and q = clamp(round_half_even(x / scale), -127, 127);
#   a block whose scale is 0 quantizes to all zeros. -128 is never produced and never accepted.
# - Error bound, for every element x of a finite block with absmax A (computed in fp32):
#       |x - q * scale| <= A / 254 + A * 2**-20 + 2**-126
#   (half a quantization step, plus fp32 rounding of the scale, the division and the product, plus an absolute
#   floor for blocks so tiny that the scale is subnormal). Results cast to fp16/bf16 add that dtype's rounding.
# - Non-finite input (NaN, +-inf, or float64 beyond fp32 range) is refused at encode time: a single inf would
#   zero its whole block and NaN would poison it, and no one should get that garbage silently.
# - Decoding refuses negative scales, scales with 127 * scale not finite in fp32, and q == -128, so a decoded
#   tensor is always finite and within each block's stated range. The encoder never produces such scales:
#   right below fp32's maximum it steps the scale down an ulp rather than let 127 * scale round to infinity.
#
# Similar in spirit to bitsandbytes' blockwise quantization (Dettmers et al., "8-bit Optimizers via Block-wise
# Quantization", 2022), minus the dynamic (non-linear) code book: a linear code keeps decode a single multiply.

from __future__ import annotations

import math

import torch

from petalnode.errors import CodecError

INT8_BLOCK_SIZE = 64
"""Elements per scale. 64 keeps outlier channels (common in LLM residual streams) from flattening many
neighbours, at 4/64 = 6.25 % scale overhead (1.0625 bytes per element, 26.6 % of fp32)."""

MAX_INT8_BLOCK_SIZE = 1 << 16
_QMAX = 127
_MAX_SCALE_NUDGES = 4


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def quantize_int8(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D float tensor.

    Args:
        flat: 1-D floating tensor on CPU (any float dtype; computed in fp32).
        block_size: elements per scale.

    Returns:
        (scales, q): fp32 scales of shape (num_blocks,), int8 values of shape (numel,).

    Raises:
        CodecError: the input has a NaN or infinity (after conversion to fp32).
    """
    x = flat.to(torch.float32)
    n = x.numel()
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    blocks = x.view(nb, block_size)
    absmax = blocks.abs().amax(dim=1) if nb else torch.zeros(0)
    # amax propagates NaN, so one look at the largest absmax catches NaN and infinity anywhere.
    if nb and not math.isfinite(float(absmax.max())):
        raise CodecError("int8 codec cannot encode NaN or infinity (or values beyond fp32 range); use a raw codec")
    scales = absmax / _QMAX
    # Near fp32's maximum, 127 * fp32(absmax / 127) can round up to infinity; step such scales down an ulp
    # (twice is always enough) so that every dequantized value stays finite. Costs one scalar check normally.
    for _ in range(_MAX_SCALE_NUDGES):
        if not nb or math.isfinite(float(scales.max() * _QMAX)):
            break
        too_big = ~torch.isfinite(scales * _QMAX)
        scales[too_big] = torch.nextafter(scales[too_big], torch.zeros(()))
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.div(blocks, divisor[:, None]).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return scales, q.view(-1)[:n]


def dequantize_int8(scales: torch.Tensor, q: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of `quantize_int8`: a fresh fp32 tensor of shape (numel,).

    Raises:
        CodecError: a scale is negative or not finite, or a value is -128 (never produced by the encoder).
    """
    # min/max propagate NaN and are much faster than elementwise masks.
    if scales.numel() and not (float(scales.min()) >= 0 and math.isfinite(float(scales.max() * _QMAX))):
        raise CodecError("int8 scales must be non-negative and small enough that 127 * scale is finite")
    if q.numel() and int(q.min()) == -_QMAX - 1:
        raise CodecError("int8 value -128 is not used by the symmetric codec")
    n = q.numel()
    full = n // block_size
    head = full * block_size
    out = torch.empty(n, dtype=torch.float32)
    if full:
        torch.mul(q[:head].view(full, block_size), scales[:full, None], out=out[:head].view(full, block_size))
    if head < n:
        torch.mul(q[head:], scales[full], out=out[head:])
    return out


def int8_error_bound(x: torch.Tensor, block_size: int = INT8_BLOCK_SIZE) -> torch.Tensor:
    """Per-element bound on |x - dequantize(quantize(x))| in fp32 (see the module header), shaped like x."""
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = num_blocks(n, block_size)
    padded = torch.nn.functional.pad(flat, (0, nb * block_size - n))
    absmax = padded.view(nb, block_size).abs().amax(dim=1).to(torch.float64)
    bound = absmax / (2 * _QMAX) + absmax * 2.0**-20 + 2.0**-126
    return bound.repeat_interleave(block_size)[:n].view(x.shape)

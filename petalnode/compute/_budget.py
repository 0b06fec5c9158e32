"""Memory budget: how many blocks a node can host, and how much KV cache is left for sessions.

A block costs its weights plus a cache reserve of `cache_tokens_per_block` tokens, so a node never hosts so many
blocks that it could serve no session at all; whatever remains after the weights also goes to the cache.
Sizes: `K`, `M`, `G`, `T` and `KiB`... `TiB` are binary (VRAM is sold in binary units), `KB`, `MB`, `GB`, `TB`
are decimal; a bare number is bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from petalnode.errors import ConfigError, OutOfCacheMemoryError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
# Petals reserves 4096-16384 cache tokens per block; 4096 keeps small machines useful.
DEFAULT_CACHE_TOKENS_PER_BLOCK = 4096
DEFAULT_MAX_CHUNK_TOKENS = 2048


def parse_size(text: str) -> int:
    """'512M' -> 536870912, '1.5GiB' -> 1610612736, '8GB' -> 8000000000.

    Raises:
        ConfigError: the text is not a size.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"not a memory size: {text!r} (examples: 512M, 8G, 1.5GiB, 16GB)")
    number, unit, suffix = match.groups()
    unit = unit.upper()
    decimal = suffix.upper() == "B" and unit != ""
    base = 1000 if decimal else 1024
    value = int(float(number) * base ** _POWERS[unit])
    if value <= 0:
        raise ConfigError(f"memory size must be positive: {text!r}")
    return value


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True, slots=True)
class BlockPlan:
    num_blocks: int
    weight_bytes: int
    cache_bytes: int
    activation_bytes: int

    def cache_tokens(self, kv_bytes_per_token_per_block: int) -> int:
        """Tokens of KV cache the plan can hold across all hosted blocks."""
        if self.num_blocks == 0:
            return 0
        return self.cache_bytes // (kv_bytes_per_token_per_block * self.num_blocks)


def activation_reserve_bytes(
    hidden_size: int, intermediate_size: int, num_heads: int, element_bytes: int,
    max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
) -> int:
    """Peak working memory of one forward chunk: MLP and residual activations plus attention scores."""
    per_token = 4 * hidden_size + 3 * intermediate_size
    scores = num_heads * max_chunk_tokens * max_chunk_tokens
    return (max_chunk_tokens * per_token + scores) * element_bytes


def plan_blocks(
    budget_bytes: int,
    *,
    block_weight_bytes: int,
    kv_bytes_per_token_per_block: int,
    total_blocks: int,
    activation_bytes: int = 0,
    cache_tokens_per_block: int = DEFAULT_CACHE_TOKENS_PER_BLOCK,
    max_blocks: int | None = None,
) -> BlockPlan:
    """How many blocks fit in `budget_bytes` with a KV-cache reserve each.

    Raises:
        OutOfCacheMemoryError: not even one block (with its reserve) fits; the message says how much is needed.
    """
    per_block = block_weight_bytes + cache_tokens_per_block * kv_bytes_per_token_per_block
    usable = budget_bytes - activation_bytes
    limit = total_blocks if max_blocks is None else min(total_blocks, max_blocks)
    count = max(0, min(limit, usable // per_block)) if per_block > 0 else limit
    if count == 0:
        need = per_block + activation_bytes
        raise OutOfCacheMemoryError(
            f"a budget of {format_size(budget_bytes)} cannot hold even one block: one block needs "
            f"{format_size(need)} ({format_size(block_weight_bytes)} weights, "
            f"{format_size(cache_tokens_per_block * kv_bytes_per_token_per_block)} cache for "
            f"{cache_tokens_per_block} tokens, {format_size(activation_bytes)} working memory); "
            f"give a larger --vram"
        )
    weights = count * block_weight_bytes
    return BlockPlan(
        num_blocks=int(count),
        weight_bytes=int(weights),
        cache_bytes=int(budget_bytes - activation_bytes - weights),
        activation_bytes=int(activation_bytes),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServePlan:
    """What a server hosts and how much memory its KV cache gets.

    Attributes:
        num_blocks: how many blocks to host (placement chooses which, unless the blocks were fixed).
        cache_budget_bytes: the KV-cache budget of the hosted span's sessions.
    """

    num_blocks: int
    cache_budget_bytes: int


def plan_serving(
    *,
    model: str,
    total_blocks: int,
    block_weight_bytes: int,
    kv_bytes_per_token_per_block: int,
    activation_bytes: int,
    vram_bytes: int | None,
    num_blocks: int | None = None,
    blocks: tuple[int, int] | None = None,
    cache_tokens_per_block: int = DEFAULT_CACHE_TOKENS_PER_BLOCK,
) -> ServePlan:
    """The memory plan of a server, from the model's sizes (for the serving dtype) and the user's options.

    Args:
        model: the model's name, for messages.
        total_blocks: blocks in the model.
        block_weight_bytes, kv_bytes_per_token_per_block, activation_bytes: sizes of one block's weights, of
            one token of KV cache in one block, and of the working memory of one forward chunk.
        vram_bytes: the budget for weights, cache and working memory; None: the blocks wanted (all if not
            given) each with a reserve of `cache_tokens_per_block` tokens of cache.
        num_blocks: host this many blocks; None: as many as the budget allows.
        blocks: host exactly [start, end).
        cache_tokens_per_block: the cache reserve of each block.

    Raises:
        ConfigError: `blocks` or `num_blocks` outside the model.
        OutOfCacheMemoryError: the blocks wanted do not fit in `vram_bytes` (the message says how much is needed).
    """
    if blocks is not None:
        start, end = blocks
        if not 0 <= start < end <= total_blocks:
            raise ConfigError(f"--blocks {start}:{end} is outside the model's 0:{total_blocks}")
        wanted: int | None = end - start
    else:
        wanted = num_blocks
        if wanted is not None and not 1 <= wanted <= total_blocks:
            raise ConfigError(f"--num-blocks must be between 1 and {total_blocks}, got {wanted}")
    if vram_bytes is None:
        count = wanted or total_blocks
        cache = count * cache_tokens_per_block * kv_bytes_per_token_per_block
        return ServePlan(num_blocks=count, cache_budget_bytes=cache)
    plan = plan_blocks(
        vram_bytes, block_weight_bytes=block_weight_bytes, kv_bytes_per_token_per_block=kv_bytes_per_token_per_block,
        total_blocks=total_blocks, activation_bytes=activation_bytes, cache_tokens_per_block=cache_tokens_per_block,
    )
    if wanted is not None and wanted > plan.num_blocks:
        need = wanted * (block_weight_bytes + cache_tokens_per_block * kv_bytes_per_token_per_block) + activation_bytes
        raise OutOfCacheMemoryError(
            f"{wanted} blocks of {model} need about {format_size(need)} but --vram gives "
            f"{format_size(vram_bytes)} (room for {plan.num_blocks}); raise --vram or host fewer blocks"
        )
    count = wanted or plan.num_blocks
    return ServePlan(num_blocks=count, cache_budget_bytes=vram_bytes - activation_bytes - count * block_weight_bytes)

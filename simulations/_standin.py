# A cheap, exact, deterministic stand-in for transformer blocks, with the interface the node's compute uses.
#
# Invariants:
# - Hidden states are integers in [0, PRIME) stored in float32 (exact: PRIME < 2**24), so equality with the
#   fault-free reference is exact, not approximate.
# - Block b at position p maps x to f(x, b, p, h), where h is a running hash of every input block b has seen
#   at positions [0, p] in this session. The hashes are the "KV cache" (one per position; plain ints per batch
#   row, shown as `keys` [batch, 1, seq, 1] like a transformers cache layer), so rolling back crops them. A
#   skipped block, a missing or wrong replay, a wrong position or a reordered step all change every later output.
# - Splitting a sequence into steps differently (prefill vs one token at a time, replay in one chunk) gives
#   identical outputs: the hash advances one position at a time either way.
# - No randomness and no clock: the backend's load delay is the only thing that takes (virtual) time.
from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import torch

from petalnode.node import InlineExecutor

T = TypeVar("T")

PRIME = 65521  # the largest prime below 2**16: values and products stay exact in int64 and float32
_HASH_MOD = (1 << 61) - 1  # a Mersenne prime: the running hash has ~61 bits, collisions are negligible
VOCAB = 4096  # "tokens" of the stand-in greedy decoding (see `next_input`)


def _multiplier(block: int, i: int) -> int:
    return 1 + (block * 7919 + i * 104729) % (PRIME - 1)


def _advance_hash(h: int, x: list[int], block: int, position: int) -> int:
    acc = h * 1_000_003 + position * 104_729 + block * 31_337 + 17
    for i, v in enumerate(x):
        acc = acc * 8191 + v * (i + 1)
    return acc % _HASH_MOD


@functools.lru_cache(maxsize=4096)
def _multipliers(block: int, width: int) -> tuple[int, ...]:
    return tuple(_multiplier(block, i) for i in range(width))


def _block_output(x: list[int], block: int, position: int, h: int) -> list[int]:
    multipliers = _multipliers(block, len(x))
    return [(v * m + (h >> (5 * i)) + position * (i + 3) + block) % PRIME
            for i, (v, m) in enumerate(zip(x, multipliers, strict=True))]


class _Layer:
    """One block's cache: the running hash after each position, as ints per batch row.

    Plain lists, not tensors: the simulator steps thousands of sessions one token at a time, and building and
    concatenating a small tensor per block per step cost more than the arithmetic.
    """

    def __init__(self) -> None:
        self.hashes: list[list[int]] | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        """The hashes as a transformers cache layer shows its keys: [batch, 1, seq, 1] int64."""
        if self.hashes is None:
            return None
        return torch.tensor(self.hashes, dtype=torch.int64).reshape(len(self.hashes), 1, -1, 1)


class StandInCache:
    """The per-session state of a span (what `InferenceSession` keeps as `cache`)."""

    def __init__(self, num_blocks: int) -> None:
        self.layers = [_Layer() for _ in range(num_blocks)]

    def crop(self, max_length: int) -> None:
        """Like `DynamicCache.crop`: a negative value removes that many positions from the end."""
        for layer in self.layers:
            if layer.hashes is None:
                continue
            seq = len(layer.hashes[0]) if layer.hashes else 0
            keep = max(0, seq + max_length if max_length < 0 else min(seq, max_length))
            layer.hashes = [row[:keep] for row in layer.hashes]


class StandInSpan(torch.nn.Module):
    """Blocks [start, end) of the stand-in model."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__()
        self.start = start
        self.end = end

    def subspan(self, start: int, end: int) -> StandInSpan:
        if not self.start <= start < end <= self.end:
            raise ValueError(f"subspan {start}:{end} outside {self.start}:{self.end}")
        return StandInSpan(start, end)

    def new_cache(self) -> StandInCache:
        return StandInCache(self.end - self.start)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return iter([torch.nn.Parameter(torch.zeros(1), requires_grad=False)])

    def forward_span(
        self,
        hidden: torch.Tensor,
        cache: StandInCache | None,
        position_ids: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [batch, n, H] of integer values -> [batch, n, H]; positions [1, n]; `cache` None = stateless.

        The stand-in has no deep prompts: it models inference traffic, and a prompt it silently ignored would
        make a wrong result look right.
        """
        if prompts is not None:
            raise ValueError("the stand-in model does not support deep prompts")
        positions = [int(p) for p in position_ids[0].tolist()]
        rows: list[list[list[int]]] = hidden.to(torch.int64).remainder(PRIME).tolist()
        cache = cache if cache is not None else self.new_cache()
        for local, layer in enumerate(cache.layers):
            block = self.start + local
            if layer.hashes is None:
                layer.hashes = [[] for _ in rows]
            if len(layer.hashes) != len(rows):
                raise ValueError(f"batch of {len(rows)} for a cache of batch {len(layer.hashes)}")
            for row, history in zip(rows, layer.hashes, strict=True):
                h = history[-1] if history else 0
                for t, x in enumerate(row):
                    h = _advance_hash(h, x, block, positions[t])
                    history.append(h)
                    row[t] = _block_output(x, block, positions[t], h)
        return torch.tensor(rows, dtype=torch.float32)


def embed(token: int, hidden_size: int) -> list[int]:
    """The stand-in embedding of a token: a fixed pseudo-random integer vector."""
    return list(_embedding(token, hidden_size))


@functools.lru_cache(maxsize=1 << 14)
def _embedding(token: int, hidden_size: int) -> tuple[int, ...]:
    rng = random.Random(token * 2_654_435_761 + 12345)
    return tuple(rng.randrange(PRIME) for _ in range(hidden_size))


def next_token(last_output: torch.Tensor) -> int:
    """Greedy decoding's stand-in: a token that depends on every value of the last position's output."""
    values = [int(v) for v in last_output.reshape(-1).tolist()]
    acc = 0
    for v in values:
        acc = (acc * 31 + v) % 1_000_000_007
    return acc % VOCAB


def prompt_hidden(tokens: list[int], hidden_size: int) -> torch.Tensor:
    """[1, len(tokens), H]"""
    return torch.tensor([[embed(t, hidden_size) for t in tokens]], dtype=torch.float32)


def reference_generation(num_blocks: int, hidden_size: int, prompt: list[int], new_tokens: int) -> list[int]:
    """The fault-free tokens of a generation, computed directly (no network): prompt then greedy steps."""
    span = StandInSpan(0, num_blocks)
    cache = span.new_cache()
    out = span.forward_span(prompt_hidden(prompt, hidden_size), cache, torch.arange(len(prompt))[None])
    tokens = [next_token(out[:, -1])]
    for step in range(new_tokens - 1):
        position = len(prompt) + step
        out = span.forward_span(prompt_hidden(tokens[-1:], hidden_size), cache, torch.tensor([[position]]))
        tokens.append(next_token(out[:, -1]))
    return tokens


@dataclass
class StandInModelInfo:
    """The attributes of `petalnode.compute.ModelInfo` the node reads, for the stand-in model."""

    name: str
    num_blocks: int
    hidden_size: int = 8
    block_bytes: int = 256 * 1024**2
    kv_bytes_per_token: int = 4096
    activation_reserve_bytes: int = 64 * 1024**2
    source: Any = field(init=False)

    def __post_init__(self) -> None:
        self.source = SimpleNamespace(name=self.name, path=None)

    def block_weight_bytes(self, index: int, dtype: torch.dtype) -> int:
        return self.block_bytes

    def kv_bytes_per_token_per_block(self, dtype: torch.dtype) -> int:
        return self.kv_bytes_per_token

    def activation_bytes(self, dtype: torch.dtype) -> int:
        return self.activation_reserve_bytes


class StandInBackend:
    """A `ComputeBackend` for one simulated server: stand-in blocks, inline compute, a fixed throughput.

    Loading takes `load_s_per_block` of virtual time (charged in `offload`), so a joining server stays JOINING
    for a realistic while. `loads` counts every span load (a rebalancing move is a reload).
    """

    def __init__(self, info: StandInModelInfo, *, throughput: float, load_s_per_block: float = 0.0) -> None:
        self.info = info
        self._throughput = throughput
        self._load_s_per_block = load_s_per_block
        self._pending_load_s = 0.0
        self.loads: list[tuple[int, int]] = []

    def model_info(self, model: str | None) -> StandInModelInfo:
        return self.info

    def load_span(
        self, info: Any, start: int, end: int, *, dtype: torch.dtype, device: torch.device,
        progress: Callable[[int], None] | None,
    ) -> StandInSpan:
        self.loads.append((start, end))
        self._pending_load_s += (end - start) * self._load_s_per_block
        for block in range(start, end):
            if progress is not None:
                progress(block)
        return StandInSpan(start, end)

    def throughput(self, info: Any, span: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> float:
        return self._throughput

    def executor(self) -> InlineExecutor:
        return InlineExecutor()

    def choose(self, device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
        return torch.device("cpu"), torch.float32

    async def offload(self, fn: Callable[[], T]) -> T:
        result = fn()
        delay, self._pending_load_s = self._pending_load_s, 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        return result

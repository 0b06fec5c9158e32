from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from petalnode.compute import ServePlan, parse_size, plan_blocks, plan_serving
from petalnode.errors import ConfigError, OutOfCacheMemoryError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * 2**20), ("8G", 8 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("16GB", 16 * 10**9),
        ("1024", 1024), ("2k", 2048), (" 3 MiB ", 3 * 2**20), ("1T", 2**40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8X", "-1G", "0", "G8", "1.2.3G", "8 G B"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(ConfigError, match="memory size"):
        parse_size(text)


def test_plan_fills_budget_with_cache_reserve() -> None:
    plan = plan_blocks(
        1000, block_weight_bytes=100, kv_bytes_per_token_per_block=1, total_blocks=30,
        cache_tokens_per_block=50, activation_bytes=100,
    )
    assert plan.num_blocks == 6  # (1000 - 100) // (100 + 50)
    assert plan.cache_bytes == 1000 - 100 - 600
    assert plan.cache_tokens(1) >= 50


def test_plan_never_exceeds_model_or_max_blocks() -> None:
    big = dict(block_weight_bytes=10, kv_bytes_per_token_per_block=1, cache_tokens_per_block=1)
    assert plan_blocks(10**9, total_blocks=30, **big).num_blocks == 30
    assert plan_blocks(10**9, total_blocks=30, max_blocks=7, **big).num_blocks == 7


def test_plan_too_small_says_how_much_is_needed() -> None:
    with pytest.raises(OutOfCacheMemoryError, match="cannot hold even one block"):
        plan_blocks(10, block_weight_bytes=100, kv_bytes_per_token_per_block=1, total_blocks=3)


@given(
    budget=st.integers(1, 10**12), weight=st.integers(1, 10**9), kv=st.integers(1, 10**5),
    blocks=st.integers(1, 200), tokens=st.integers(0, 10**5),
)
def test_plan_respects_budget(budget: int, weight: int, kv: int, blocks: int, tokens: int) -> None:
    try:
        plan = plan_blocks(budget, block_weight_bytes=weight, kv_bytes_per_token_per_block=kv,
                           total_blocks=blocks, cache_tokens_per_block=tokens)
    except OutOfCacheMemoryError:
        assert budget < weight + tokens * kv
        return
    assert 1 <= plan.num_blocks <= blocks
    assert plan.weight_bytes + plan.num_blocks * tokens * kv <= budget
    assert plan.cache_tokens(kv) >= tokens


SIZES = dict(model="m", total_blocks=30, block_weight_bytes=100, kv_bytes_per_token_per_block=1, activation_bytes=100,
             cache_tokens_per_block=50)


def test_serve_plan_without_a_budget_reserves_cache_for_the_blocks_wanted() -> None:
    assert plan_serving(vram_bytes=None, **SIZES) == ServePlan(num_blocks=30, cache_budget_bytes=30 * 50)
    assert plan_serving(vram_bytes=None, num_blocks=4, **SIZES) == ServePlan(num_blocks=4, cache_budget_bytes=200)
    assert plan_serving(vram_bytes=None, blocks=(3, 6), **SIZES).num_blocks == 3


def test_serve_plan_with_a_budget_gives_the_rest_to_the_cache() -> None:
    plan = plan_serving(vram_bytes=1000, **SIZES)
    assert plan == ServePlan(num_blocks=6, cache_budget_bytes=1000 - 100 - 600)
    assert plan_serving(vram_bytes=1000, num_blocks=2, **SIZES) == ServePlan(num_blocks=2, cache_budget_bytes=700)


def test_serve_plan_refuses_what_does_not_fit_or_is_outside_the_model() -> None:
    with pytest.raises(OutOfCacheMemoryError, match="7 blocks of m need about"):
        plan_serving(vram_bytes=1000, num_blocks=7, **SIZES)
    with pytest.raises(ConfigError, match="outside the model's 0:30"):
        plan_serving(vram_bytes=None, blocks=(25, 31), **SIZES)
    with pytest.raises(ConfigError, match="between 1 and 30"):
        plan_serving(vram_bytes=None, num_blocks=0, **SIZES)

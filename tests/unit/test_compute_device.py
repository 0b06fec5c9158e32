"""The compute dtype: an explicit choice wins, then PETALNODE_DTYPE, then the cached CPU measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from petalnode.compute import _device, choose_dtype
from petalnode.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Unset the suite's fp32 pin, isolate the cache, and let the test decide what the measurement says."""
    monkeypatch.delenv("PETALNODE_DTYPE", raising=False)
    monkeypatch.setenv("PETALNODE_CACHE_DIR", str(tmp_path))
    calls: list[float] = []

    def speedup(value: float) -> None:
        monkeypatch.setattr(_device, "measure_bf16_speedup", lambda: calls.append(value) or value)

    return speedup, calls, tmp_path


def test_an_explicit_dtype_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETALNODE_DTYPE", "bf16")
    assert choose_dtype(CPU, "fp32") is torch.float32
    assert choose_dtype(CPU, "fp16") is torch.float16


def test_the_environment_replaces_the_measurement(monkeypatch: pytest.MonkeyPatch, measured) -> None:
    speedup, calls, _ = measured
    speedup(5.0)
    monkeypatch.setenv("PETALNODE_DTYPE", "fp32")
    assert choose_dtype(CPU) is torch.float32
    monkeypatch.setenv("PETALNODE_DTYPE", "bfloat16")
    assert choose_dtype(CPU, None) is torch.bfloat16
    assert calls == []  # never measured
    monkeypatch.setenv("PETALNODE_DTYPE", "int4")
    with pytest.raises(ConfigError, match="unsupported dtype 'int4'"):
        choose_dtype(CPU)


@pytest.mark.parametrize(("speedup_value", "expected"), [(5.0, torch.bfloat16), (1.1, torch.float32)])
def test_the_cpu_measurement_picks_bf16_only_when_clearly_faster_and_is_cached(
    measured, speedup_value: float, expected: torch.dtype,
) -> None:
    speedup, calls, cache = measured
    speedup(speedup_value)
    assert choose_dtype(CPU, "auto") is expected
    assert choose_dtype(CPU) is expected
    assert calls == [speedup_value]  # the second choice read the cache
    assert json.loads((cache / "cpu-dtype.json").read_text())["dtype"] == str(expected).removeprefix("torch.")

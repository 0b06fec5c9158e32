"""Shared fixtures: tiny random models (fast) and the real default model (slow, converted once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_tiny_model

# Servers (in-process and every process the tests start) compute in fp32, the dtype of the transformers references
# they are compared with. Without this, a CPU with fast bf16 (AVX512-BF16, AMX) makes the automatic choice bf16
# and every exactness test compares bf16 servers with fp32 transformers. Tests of the automatic choice unset it.
os.environ["PETALNODE_DTYPE"] = "fp32"


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    # Two cores shared by test processes: one torch thread each keeps timings sane and results deterministic.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), family="llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    built: dict[tuple, Path] = {}

    def make(family: str = "llama", **kwargs) -> Path:
        key = (family, *sorted(kwargs.items()))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family=family, **kwargs)
        return built[key]

    return make


CONVERSION_RACES: list[tuple[Path, list[tuple[int, str, str]]]] = []


def run_conversion_race(cache: Path) -> list[tuple[int, str, str]]:
    """Two processes resolve the default model at once against `cache`; returns (returncode, stdout, stderr)."""
    env = {**os.environ, "PETALNODE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    code = "from petalnode.compute import resolve_model; print(resolve_model('default').path)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    race = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
    CONVERSION_RACES.append((cache, race))
    return race


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted into the user cache on first use (about a minute, once).

    On a fresh machine (CI) the first conversion is done by two processes racing, which is exactly what
    test_model_source's concurrency test checks, so that test reuses the race instead of converting again.
    """
    from petalnode.compute import cache_dir, ensure_default_model
    from petalnode.compute._model_source import default_model_is_converted

    if not default_model_is_converted():
        run_conversion_race(cache_dir())
    return ensure_default_model()

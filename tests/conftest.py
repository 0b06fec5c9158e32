"""Shared fixtures: tiny random models (fast) and the real default model (slow, converted once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_tiny_model


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


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted into the user cache on first use (about a minute, once)."""
    from petalnode.compute import ensure_default_model

    return ensure_default_model()

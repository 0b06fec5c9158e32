from __future__ import annotations

from pathlib import Path

import pytest

from petalnode.compute import DEFAULT_MODEL, resolve_model
from petalnode.errors import ModelNotFoundError


def test_local_directory_is_accepted(tiny_model_dir: Path) -> None:
    source = resolve_model(str(tiny_model_dir))
    assert source.path == tiny_model_dir.resolve()


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        resolve_model(tmp_path)


def test_directory_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model(tmp_path)


def test_unknown_model_id_says_it_is_not_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="not available on this machine"):
        resolve_model("meta-llama/Llama-3.1-405B")
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model("no-such-model")


@pytest.mark.slow
def test_concurrent_first_use_converts_once_and_atomically(tmp_path: Path) -> None:
    """Two processes start on an empty cache at once: one converts, the other waits; both get a full model.

    On a fresh machine the `default_model_dir` fixture already converted the real cache this way; then this test
    checks that race instead of running a second one.
    """
    from tests.conftest import CONVERSION_RACES, run_conversion_race

    cache, race = CONVERSION_RACES[0] if CONVERSION_RACES else (tmp_path, run_conversion_race(tmp_path))
    assert all(code == 0 for code, _, _ in race), race
    paths = {out.strip().splitlines()[-1] for _, out, _ in race}
    assert len(paths) == 1
    conversions = sum("converting the default model" in err for _, _, err in race)
    assert conversions == 1
    model_dir = Path(paths.pop())
    assert model_dir.parent == cache / "models"
    assert model_dir.name.startswith(DEFAULT_MODEL)
    assert (model_dir / "model.safetensors").stat().st_size > 500_000_000
    assert (model_dir / "tokenizer.json").is_file()
    # No temporary directories left behind.
    assert not [p for p in model_dir.parent.iterdir() if p.is_dir() and p.name.startswith(".")]

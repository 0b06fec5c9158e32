# LoRA adapters (PEFT format) applied by a server to the blocks it hosts.
#
# A LoRA adapter adds `scaling * B(A(x))` to the output of some linear layers (Hu et al. 2021, "LoRA", eq. 3);
# scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). PEFT stores A as `...lora_A.weight`
# [r, in] and B as `...lora_B.weight` [out, r] in `adapter_model.safetensors`, next to `adapter_config.json`.
#
# Invariants:
# - Only safetensors are read (a pickled `adapter_model.bin` is refused), and only the tensors of blocks
#   [start, end); every tensor read is counted in `LoraAdapter.tensors_read`.
# - Which modules an adapter changes is decided exactly as PEFT decides it (`target_modules`, `exclude_modules`,
#   `layers_to_transform`); the file must hold weights for exactly those modules of the span, with shapes that
#   fit the base model. Options whose math we do not implement (DoRA, LoRA biases, modules_to_save, ...) are
#   refused rather than ignored, so an adapter never silently computes something else than PEFT would.
# - Attaching wraps each targeted `nn.Linear` once; with no active adapter the wrapper returns the base layer's
#   output untouched (bit-identical). Adapter weights are plain tensors, not parameters: frozen, never trained
#   here, and absent from `state_dict`.
# - The active adapter is thread-local: enter `active_adapter(name)` on the thread that runs the compute.
#   Every decoder layer that has adapters checks the active name before running, so asking for an adapter the
#   layer does not have raises instead of computing the base model.
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from petalnode.compute._loader import ModelInfo
from petalnode.errors import ComputeError, ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_NAME_CHARS = 64  # the announcement's limit for an adapter name
# A directory name, or a hub id "owner/repo" (Petals names hub adapters by their repo id).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# PEFT's saved key of one LoRA matrix: "base_model.model." + the base model's module name + ".lora_{A,B}.weight".
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# A module inside transformer block i (the Llama-family checkpoint layout; see compute/models/llama.py).
_BLOCK_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# PEFT options whose math this module does not implement: refused when set, never ignored.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One adapted linear layer: adds `scaling * (x @ a.T) @ b.T`; a: [r, in], b: [out, r]."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A PEFT LoRA adapter, with weights only for the blocks [start, end) of one span.

    `weights` maps (global block index, module path inside the block, e.g. "self_attn.q_proj") to its matrices.
    A span may have no adapted module at all (e.g. `layers_to_transform` skips it): the adapter then leaves
    these blocks unchanged, and they still serve it.
    """

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    start: int
    end: int
    weights: Mapping[tuple[int, str], LoraWeights]
    path: Path
    tensors_read: int = 0
    bytes_read: int = 0

    @property
    def target_modules(self) -> frozenset[str]:
        """Module paths inside a block that this adapter changes somewhere in the span."""
        return frozenset(path for _, path in self.weights)


# -- loading --------------------------------------------------------------------------------------------------
def load_lora_adapter(
    path: str | os.PathLike[str], info: ModelInfo, start: int, end: int, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", name: str | None = None,
) -> LoraAdapter:
    """Read a PEFT LoRA adapter's weights for blocks [start, end) of the model `info` describes.

    Args:
        path: a local adapter directory, or a hub id already in the local Hugging Face cache (never downloaded).
        info: the base model; the adapter must fit its module shapes.
        start, end: the block range of the span the adapter is for.
        dtype, device: where the adapter's matrices go (the span's dtype and device).
        name: the name clients select the adapter by; default: the directory name, or the hub id.

    Raises:
        ModelNotFoundError: `path` is neither a local directory nor a hub id in the local cache.
        ConfigError: the adapter is malformed, pickled, uses an unsupported option, or does not fit the model.
    """
    if not 0 <= start < end <= info.num_blocks:
        raise ConfigError(f"blocks {start}:{end} are outside the model's 0:{info.num_blocks}")
    directory, default_name = _resolve(path)
    name = _check_name(default_name if name is None else name)
    config = _read_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ConfigError(
                f"adapter {name!r} at {directory} has only adapter_model.bin, a pickle file that petalnode never "
                f"loads; save it with safetensors (PEFT's save_pretrained does by default)"
            )
        raise ConfigError(f"adapter {name!r} at {directory} has no {WEIGHTS_FILE}")
    wanted = _span_modules(info, start, end, config, name)
    weights: dict[tuple[int, str], LoraWeights] = {}
    tensors_read = bytes_read = 0
    try:
        handle_cm = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ConfigError(f"adapter {name!r}: {weights_path} is not a valid safetensors file: {e}") from e
    with handle_cm as handle:
        found = _index_keys(handle.keys(), info, name)
        in_span = {key: v for key, v in found.items() if start <= key[0] < end}
        missing = sorted(set(wanted) - set(in_span))
        extra = sorted(set(in_span) - set(wanted))
        if extra:
            block, module = extra[0]
            raise ConfigError(f"adapter {name!r} has weights for block {block} {module}, which its target_modules "
                              f"(and layers_to_transform / exclude_modules) do not select")
        if missing:
            block, module = missing[0]
            raise ConfigError(f"adapter {name!r} selects block {block} {module} but {WEIGHTS_FILE} has no "
                              f"lora_A/lora_B weights for it")
        for key, (key_a, key_b) in sorted(in_span.items()):
            block, module = key
            out_features, in_features = wanted[key]
            rank, alpha = config.rank_alpha(f"model.layers.{block}.{module}")
            shape_a, shape_b = tuple(handle.get_slice(key_a).get_shape()), tuple(handle.get_slice(key_b).get_shape())
            if shape_a != (rank, in_features) or shape_b != (out_features, rank):
                raise ConfigError(
                    f"adapter {name!r} does not fit this model at block {block} {module}: lora_A {list(shape_a)} "
                    f"and lora_B {list(shape_b)}, but the base layer is [{out_features}, {in_features}] and r={rank} "
                    f"(expected lora_A [{rank}, {in_features}], lora_B [{out_features}, {rank}]); was it made for "
                    f"another model?"
                )
            pair = []
            for key_x in (key_a, key_b):
                tensor = handle.get_tensor(key_x)
                tensors_read += 1
                bytes_read += tensor.numel() * tensor.element_size()
                if not tensor.is_floating_point():
                    raise ConfigError(f"adapter {name!r}: {key_x} is {tensor.dtype}, not a float tensor")
                pair.append(tensor.to(dtype=dtype, device=device))
            scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
            weights[key] = LoraWeights(a=pair[0], b=pair[1], scaling=scaling)
    logger.info("adapter %s: %d adapted layers in blocks %d:%d (r=%d, alpha=%s)", name, len(weights), start, end,
                config.r, config.alpha)
    return LoraAdapter(name=name, rank=config.r, alpha=config.alpha, use_rslora=config.use_rslora, start=start,
                       end=end, weights=weights, path=directory, tensors_read=tensors_read, bytes_read=bytes_read)


def _check_name(name: str) -> str:
    """`name` if it can be announced and selected: 1-64 characters, letters, digits, `._-`, one optional `/`."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS or not _NAME.match(name):
        raise ConfigError(
            f"adapter name {name!r} is invalid: use 1-{MAX_NAME_CHARS} letters, digits, '.', '_' or '-' "
            "(a hub id 'owner/repo' is fine too)"
        )
    return name


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(adapter directory, default name): a local directory, else a hub id found in the local HF cache."""
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return local.resolve(), local.resolve().name
    if local.exists():
        raise ConfigError(f"adapter path {text!r} is a file; pass the adapter's directory (with {CONFIG_FILE})")
    cached = _find_in_hf_cache(text)
    if cached is not None:
        return cached, text
    raise ModelNotFoundError(
        f"adapter {text!r} is not available on this machine: it is neither a local directory nor a hub id in the "
        f"local Hugging Face cache. petalnode never downloads: fetch it first (e.g. `hf download {text}`) or pass "
        f"the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}"
    )


def _find_in_hf_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or any(c.isspace() for c in repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        local = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return local if (local / CONFIG_FILE).is_file() else None


# -- adapter_config.json --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _LoraConfig:
    r: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...]
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The rank and alpha of one module: PEFT's `get_pattern_key` over rank_pattern / alpha_pattern."""
        return (int(_pattern_value(self.rank_pattern, module, self.r)),
                float(_pattern_value(self.alpha_pattern, module, self.alpha)))

    def selects(self, module: str) -> bool:
        """Whether PEFT would adapt `module` (its name in the base model): PEFT's `check_target_module_exists`."""
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(module.endswith(f".{m}") for m in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            # "all-linear" means every linear layer but the output head, which is never in a block.
            return self.target_modules.lower() == "all-linear" or re.fullmatch(self.target_modules, module) is not None
        if module not in self.target_modules and not any(module.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        for pattern in self.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
        if match is None:
            return False
        index = int(match.group("idx"))
        layers = self.layers_to_transform
        return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(directory: Path) -> _LoraConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} is not a PEFT adapter directory: it has no {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(option):
            raise ConfigError(f"{path}: {what} is not supported; only plain LoRA on linear layers")
    if raw.get("bias", "none") != "none":
        raise ConfigError(f"{path}: bias={raw.get('bias')!r} is not supported; only bias='none'")
    if raw.get("fan_in_fan_out"):
        # PEFT itself turns it off for nn.Linear (every layer of our blocks), with a warning; so do we.
        logger.warning("%s: fan_in_fan_out=True is ignored for linear layers, as PEFT does", path)
    r = raw.get("r")
    alpha = raw.get("lora_alpha", 8)
    if type(r) is not int or r < 1:
        raise ConfigError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ConfigError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    rank_pattern = _mapping(raw.get("rank_pattern"), path, "rank_pattern", int)
    alpha_pattern = _mapping(raw.get("alpha_pattern"), path, "alpha_pattern", int | float)
    if any(v < 1 for v in rank_pattern.values()):
        raise ConfigError(f"{path}: rank_pattern ranks must be positive")
    layers = raw.get("layers_to_transform")
    if layers is not None and type(layers) is not int and not _is_list_of(layers, int):
        raise ConfigError(f"{path}: layers_to_transform must be an integer or a list of integers")
    layers_pattern = raw.get("layers_pattern") or ()
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    if not _is_list_of(layers_pattern, str):
        raise ConfigError(f"{path}: layers_pattern must be a string or a list of strings")
    return _LoraConfig(
        r=r, alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_names(raw.get("target_modules"), path, "target_modules", required=True),
        exclude_modules=_names(raw.get("exclude_modules"), path, "exclude_modules", required=False),
        layers_to_transform=layers if layers is None or type(layers) is int else tuple(layers),
        layers_pattern=tuple(layers_pattern), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )


def _names(value: Any, path: Path, field: str, *, required: bool) -> Any:
    if value is None or (not required and not value):
        if required:
            raise ConfigError(f"{path}: {field} is missing")
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{path}: {field} is not a valid regular expression: {e}") from e
        return value
    if not _is_list_of(value, str) or not value:
        raise ConfigError(f"{path}: {field} must be a list of module names or a regular expression")
    return tuple(value)


def _mapping(value: Any, path: Path, field: str, kind: Any) -> dict[str, Any]:
    value = value or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ConfigError(f"{path}: {field} must map module names to numbers")
    for key in value:
        try:
            re.compile(key)
        except re.error as e:
            raise ConfigError(f"{path}: {field} key {key!r} is not a valid regular expression: {e}") from e
    return dict(value)


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


# -- matching the file against the base model ----------------------------------------------------------------
def _span_modules(
    info: ModelInfo, start: int, end: int, config: _LoraConfig, name: str
) -> dict[tuple[int, str], tuple[int, int]]:
    """(block, module path) -> (out_features, in_features) of every linear layer the config adapts in the span."""
    selected: dict[tuple[int, str], tuple[int, int]] = {}
    for tensor in info.reader.names():
        if not tensor.endswith(".weight") or not info.family.is_block_tensor(tensor, start, end):
            continue
        module = tensor.removesuffix(".weight")
        match = _BLOCK_MODULE.match(module)
        shape, _ = info.reader._header_entry(tensor)
        # Only linear layers have 2-D weights inside a block (norms are 1-D).
        if match is None or len(shape) != 2:
            continue
        try:
            chosen = config.selects(module)
        except re.error as e:  # layers_pattern is used as a regex by PEFT too
            raise ConfigError(f"adapter {name!r}: a pattern in its config is not a valid regex: {e}") from e
        if chosen:
            selected[(int(match.group(1)), match.group(2))] = (int(shape[0]), int(shape[1]))
    return selected


def _index_keys(keys: Sequence[str], info: ModelInfo, name: str) -> dict[tuple[int, str], tuple[str, str]]:
    """(block, module path) -> (lora_A key, lora_B key) for every key of the file, checking the key format."""
    halves: dict[tuple[int, str], dict[str, str]] = {}
    for key in keys:
        if _BLOCK_MODULE.match(key.removeprefix("base_model.model.")) is None:
            raise ConfigError(f"adapter {name!r} has weights for {key.removeprefix('base_model.model.')}, which is "
                              f"not in a transformer block; servers apply adapters to the blocks they host only")
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ConfigError(
                f"adapter {name!r} has a tensor {key!r} that is not a LoRA matrix of a linear layer; DoRA "
                "magnitudes, embedding LoRA, biases and fully trained modules are not supported"
            )
        module, half = match.groups()
        block = _BLOCK_MODULE.match(module)
        assert block is not None  # checked above on the same prefix
        index = int(block.group(1))
        if index >= info.num_blocks:
            raise ConfigError(f"adapter {name!r} has weights for block {index}, but the model has "
                              f"{info.num_blocks} blocks; was it made for another model?")
        halves.setdefault((index, block.group(2)), {})[half] = key
    for (index, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"adapter {name!r} has lora_{''.join(pair)} but not both halves for block {index} "
                              f"{module}")
    return {key: (pair["A"], pair["B"]) for key, pair in halves.items()}


# -- applying -------------------------------------------------------------------------------------------------
_active = threading.local()


def _active_name() -> str | None:
    return getattr(_active, "name", None)


@contextlib.contextmanager
def active_adapter(name: str | None) -> Iterator[None]:
    """Compute with adapter `name` on this thread (None: the base model only), restoring the previous one after."""
    if name is not None:
        _check_name(name)
    previous = _active_name()
    _active.name = name
    try:
        yield
    finally:
        _active.name = previous


class LoraLinear(nn.Module):
    """A linear layer plus any number of named LoRA adapters, of which at most one (the active one) applies."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, LoraWeights] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        name = _active_name()
        if name is None:
            return out
        lora = self.adapters.get(name)
        if lora is None:
            # The decoder layer's check passed, so this adapter just leaves this linear layer alone.
            return out
        # Same order of operations as PEFT's lora.Linear: B(A(x)) * scaling.
        return out + nn.functional.linear(nn.functional.linear(x.to(lora.a.dtype), lora.a), lora.b).to(
            out.dtype) * lora.scaling

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.adapters)}"


# Attribute on each decoder layer: the names of the adapters attached to it (what its pre-hook accepts).
_LAYER_NAMES = "_petalnode_lora_adapters"


def _check_layer_adapter(layer: nn.Module, args: Any) -> None:
    name = _active_name()
    if name is not None and name not in getattr(layer, _LAYER_NAMES):
        raise ComputeError(f"adapter {name!r} is not loaded on these blocks "
                           f"(loaded: {sorted(getattr(layer, _LAYER_NAMES)) or 'none'})")


def attach_adapters(span: nn.Module, adapters: Sequence[LoraAdapter]) -> None:
    """Attach adapters loaded for exactly this span's blocks; its `subspan()` views see them too.

    All-or-nothing: everything is checked before the span is changed.

    Raises:
        ConfigError: an adapter is for other blocks, its name is taken, or a shape does not fit.
    """
    layers: nn.ModuleList = span.layers
    present = span_adapters(span)
    names = [a.name for a in adapters]
    duplicate = sorted({n for n in names if names.count(n) > 1} | (set(names) & present))
    if duplicate:
        raise ConfigError(f"adapter name {duplicate[0]!r} is used twice on blocks {span.start}:{span.end}")
    plan: list[tuple[nn.Module, str, nn.Module, str, LoraWeights]] = []
    for adapter in adapters:
        if (adapter.start, adapter.end) != (span.start, span.end):
            raise ConfigError(f"adapter {adapter.name!r} was loaded for blocks {adapter.start}:{adapter.end}, "
                              f"not {span.start}:{span.end}")
        for (block, path), lora in adapter.weights.items():
            layer = layers[block - span.start]
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            module = getattr(parent, attr, None)
            if not isinstance(module, nn.Linear | LoraLinear):
                raise ConfigError(f"adapter {adapter.name!r}: block {block} has no linear layer {path}")
            if lora.a.shape != (lora.a.shape[0], module.in_features) or lora.b.shape != (
                    module.out_features, lora.a.shape[0]):
                raise ConfigError(f"adapter {adapter.name!r} does not fit block {block} {path}: lora_A "
                                  f"{list(lora.a.shape)}, lora_B {list(lora.b.shape)} vs layer "
                                  f"[{module.out_features}, {module.in_features}]")
            plan.append((parent, attr, module, adapter.name, lora))
    for layer in layers:
        if not hasattr(layer, _LAYER_NAMES):
            setattr(layer, _LAYER_NAMES, set())
            layer.register_forward_pre_hook(_check_layer_adapter)
        getattr(layer, _LAYER_NAMES).update(names)
    for parent, attr, _, name, lora in plan:
        module = getattr(parent, attr)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            setattr(parent, attr, module)
        weight = module.weight
        module.adapters[name] = LoraWeights(a=lora.a.to(weight.device, weight.dtype),
                                            b=lora.b.to(weight.device, weight.dtype), scaling=lora.scaling)


def span_adapters(span: nn.Module) -> frozenset[str]:
    """Names of the adapters that every block of `span` (or of the span it is a view of) has.

    A span without `layers` (such as the churn simulator's stand-in) has none.
    """
    sets = [getattr(layer, _LAYER_NAMES, set()) for layer in getattr(span, "layers", ())]
    return frozenset(set.intersection(*sets)) if sets else frozenset()

# Lazy re-exports for package __init__ modules (PEP 562 module __getattr__ and __dir__).
#
# A package whose public names live in heavy modules (torch, transformers) lists them here instead of importing
# them, so importing the package, or a light sibling module through it, stays cheap: `petalnode bootstrap` and
# DHT-only processes import petalnode.node, petalnode.compute and petalnode.codecs without loading torch.
# Invariants: a listed name is imported from its module on first access and then cached in the package
# namespace (later accesses are plain attribute lookups); dir() lists every name, loaded or not; an unknown name
# raises AttributeError as usual.

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(
    package: str, namespace: dict[str, Any], modules: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `(__getattr__, __dir__)` pair for `package` that loads `modules[module]`'s names from `module`.

    Use as `__getattr__, __dir__ = _lazy.exports(__name__, globals(), {"pkg._heavy": ("Name", ...)})`.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__

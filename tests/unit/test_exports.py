"""Each package re-exports exactly its public names, in a sorted `__all__` (STYLE: public API surface)."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ["petalnode.client", "petalnode.codecs", "petalnode.compute", "petalnode.dht", "petalnode.node",
            "petalnode.rpc", "petalnode.transport", "petalnode.cli", "petalnode.monitor"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_complete(name: str) -> None:
    package = importlib.import_module(name)
    exported = list(package.__all__)
    # isort-style order (constants, classes, functions), as ruff's RUF022 keeps it.
    assert exported == sorted(exported, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    for item in exported:
        assert hasattr(package, item), f"{name}.__all__ names missing {item}"
    # dir(), not vars(): a package may load some names on first access (PEP 562 `__getattr__` and `__dir__`).
    public = {
        attr for attr in dir(package)
        if not attr.startswith("_") and not isinstance(getattr(package, attr), types.ModuleType)
        and attr != "annotations"
    }
    assert public == set(exported), f"{name}: public but not exported: {public - set(exported)}"

"""Layering: the transport layer never imports the layers above it (RPC, node).

`petalnode.rpc` sits on `petalnode.transport`, and `petalnode.node` on both; an import the other way round would
make a transport depend on the code that uses it. The check parses every module's imports with `ast`, so it also
catches imports inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import petalnode

PACKAGE_ROOT = Path(petalnode.__file__).parent
FORBIDDEN_ABOVE_TRANSPORT = ("petalnode.rpc", "petalnode.node")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_transport_imports_nothing_above_it() -> None:
    offending = []
    for path in sorted((PACKAGE_ROOT / "transport").rglob("*.py")):
        for name in sorted(_imported_modules(path)):
            if any(_is_under(name, above) for above in FORBIDDEN_ABOVE_TRANSPORT):
                offending.append(f"{path.relative_to(PACKAGE_ROOT.parent)} imports {name}")
    assert not offending, "transport must not depend on the layers above it:\n" + "\n".join(offending)


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from petalnode.rpc import RPCStream\n", encoding="utf-8")
    assert any(_is_under(name, "petalnode.rpc") for name in _imported_modules(module))


def test_rpc_stream_is_a_relay_channel() -> None:
    # The WebRTC relay fallback is handed RPC streams (node/_signaling.py) but types them as `RelayChannel`.
    from petalnode.rpc import RPCStream
    from petalnode.transport import RelayChannel

    assert all(callable(getattr(RPCStream, name, None)) for name in ("send", "receive", "aclose"))
    assert issubclass(RPCStream, RelayChannel)

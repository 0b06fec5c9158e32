"""Every test module that starts processes or real sockets carries the `integration` marker (`-m "not integration"`
must leave only socket-free tests)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
# Modules here that only call pure functions (no processes, no sockets).
PURE = {"tests/cli/test_cli_adapters.py", "tests/cli/test_cli_status.py"}


def _marks(tree: ast.Module) -> set[str]:
    """Names of `pytest.mark.X` used at module level (pytestmark) or on any test function."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
            names.add(node.attr)
    return names


def _module_marked(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return "integration" in _marks(ast.Module(body=[node], type_ignores=[]))
    return False


def _functions_marked(tree: ast.Module) -> bool:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    tests = [n for n in tree.body if isinstance(n, functions) and n.name.startswith("test")]
    return bool(tests) and all("integration" in _marks(ast.Module(body=[ast.Expr(d) for d in t.decorator_list],
                                                                   type_ignores=[])) for t in tests)


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(TESTS.parent)) for d in ("integration", "cli", "natbed")
           for p in (TESTS / d).glob("test_*.py")),
)
def test_process_and_socket_tests_are_marked_integration(path: str) -> None:
    if path in PURE:
        return
    tree = ast.parse((TESTS.parent / path).read_text())
    assert _module_marked(tree) or _functions_marked(tree), f"{path} has no pytest.mark.integration"

"""Entry point of the `petalnode` command (placeholder until the CLI lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("petalnode: not implemented yet")

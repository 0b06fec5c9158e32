"""The `petalnode` command."""

from petalnode.cli._main import main

__all__ = ["main"]

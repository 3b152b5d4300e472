"""The `graftlm` command line: one module per command group, `main` the entry point."""

from graftlm.cli.parser import main

__all__ = ["main"]

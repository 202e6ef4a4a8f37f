"""The command line: `neonpoly serve`, `tui`, the integration commands and the admin commands."""

from neonpoly.cli.main import main

__all__ = ["main"]

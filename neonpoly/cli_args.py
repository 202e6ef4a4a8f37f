"""Argument types the command line shares."""

from __future__ import annotations

import argparse


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT, meaning 127.0.0.1)."""
    host, _, port = text.rpartition(":")
    try:
        return (host or "127.0.0.1", int(port))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from exc

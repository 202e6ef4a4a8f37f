"""Argument types the command line shares."""

from __future__ import annotations

import argparse

from neonpoly.defaults import LOCALHOST


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT, meaning 127.0.0.1)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from exc
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return (host or LOCALHOST, number)


def _seconds(text: str, *, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from exc
    if value < 0 or (value == 0 and not zero_ok) or value != value:
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_ok else 'more than 0'} seconds, not {text}")
    return value


def positive_seconds(text: str) -> float:
    return _seconds(text, zero_ok=False)


def seconds(text: str) -> float:
    """Seconds, zero allowed (a grace period of 0 means: end sessions at once)."""
    return _seconds(text, zero_ok=True)


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return value

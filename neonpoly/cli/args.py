"""Argument types the command line shares."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from neonpoly.defaults import LOCALHOST


class Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command's --help: argparse's default prints the
    whole usage first (a dozen lines for `serve`), which buries the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        # An unknown option is reported by the command it was given to (`neonpoly serve
        # --bogus`), not by the top-level parser, whose --help would not list that command's.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._command(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _command(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest subcommand's parser that `parsed` chose (this parser if none)."""
        parser: argparse.ArgumentParser = self
        while True:
            actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            chosen = getattr(parsed, actions[0].dest, None) if actions and actions[0].dest else None
            if chosen is None or chosen not in actions[0].choices:
                return parser
            parser = actions[0].choices[chosen]


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

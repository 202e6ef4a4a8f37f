"""What every command shares: the one error a user can fix, and the event loop to run on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class CLIError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


def run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.run(coro)
    return uvloop.run(coro)

"""The `env` fixture: a fresh caching neonpoly per case (default admission: stored on the
2nd run, served from the 3rd), the session's origin, and cleanup of what the case made."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.adversarial.harness import Env
from tests.pgharness import PgServer
from tests.proxy.caching import caching_proxy


@pytest.fixture
async def env(pg: PgServer, tmp_path: Path) -> AsyncIterator[Env]:
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        stack = contextlib.AsyncExitStack()
        world = Env(pg, proxy, stack)
        try:
            async with stack:
                yield world
        finally:
            await world.run_cleanups()

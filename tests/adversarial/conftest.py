"""The `env` fixture: a fresh caching neonpoly per case (default admission: stored on the
2nd run, served from the 3rd), the session's origin, and cleanup of what the case made.

`NEONPOLY_TEST_WORKERS=N` (N > 1) runs every case against `neonpoly serve --workers N` as a
subprocess instead (scripts/adversarial_workers.sh): the same answers are expected, with
hits counted by the admin console over every worker."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.adversarial.harness import Env
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.workers import WorkersProxy, workers_proxy

WORKERS = int(os.environ.get("NEONPOLY_TEST_WORKERS") or "1")


@contextlib.asynccontextmanager
async def _proxy(pg: PgServer, cache_dir: Path) -> AsyncIterator[CachingProxy | WorkersProxy]:
    if WORKERS > 1:
        with workers_proxy(pg, cache_dir, count=WORKERS) as workers:
            yield workers
    else:
        async with caching_proxy(pg, cache_dir) as proxy:
            yield proxy


@pytest.fixture
async def env(pg: PgServer, tmp_path: Path) -> AsyncIterator[Env]:
    async with _proxy(pg, tmp_path / "cache") as proxy:
        stack = contextlib.AsyncExitStack()
        world = Env(pg, proxy, stack)
        try:
            async with stack:
                yield world
        finally:
            await world.run_cleanups()

"""The `env` fixture: a fresh caching neonpoly per case (default admission: stored on the
2nd run, served from the 3rd), the session's origin, and cleanup of what the case made.

`NEONPOLY_TEST_WORKERS=N` (N > 1) runs every case against `neonpoly serve --workers N` as a
subprocess instead (scripts/adversarial_workers.sh): the same answers are expected, with
hits counted by the admin console over every worker. Starting N+2 processes takes seconds,
so one serve runs per test file, purged (PURGE ALL, SET MODE auto) after each case; the
cases already name their objects uniquely, so what one learned cannot serve another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.adversarial.harness import Env
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.workers import WorkersProxy, workers_proxy

WORKERS = int(os.environ.get("NEONPOLY_TEST_WORKERS") or "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Against workers every hit is counted through the admin console (a round trip to each
    worker) and some cases count hundreds: give them longer than the default timeout."""
    if WORKERS > 1:
        for item in items:
            if item.nodeid.startswith("tests/adversarial/") and item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(600))


@pytest.fixture(scope="module")
def workers_server(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersProxy]:
    with workers_proxy(pg, tmp_path_factory.mktemp("workers") / "cache", count=WORKERS) as proxy:
        yield proxy


@pytest.fixture
async def env(pg: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    async with contextlib.AsyncExitStack() as outer:
        proxy: CachingProxy | WorkersProxy
        if WORKERS > 1:
            shared = request.getfixturevalue("workers_server")
            assert isinstance(shared, WorkersProxy)
            outer.callback(shared.admin, "SET MODE auto")
            outer.callback(shared.admin, "PURGE ALL")
            proxy = shared
        else:
            proxy = await outer.enter_async_context(caching_proxy(pg, tmp_path / "cache"))
        stack = contextlib.AsyncExitStack()
        world = Env(pg, proxy, stack)
        try:
            async with stack:
                yield world
        finally:
            await world.run_cleanups()

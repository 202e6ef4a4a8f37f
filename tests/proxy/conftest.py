"""A pass-through neonpoly in front of the session's origin, run on its own event loop.

The proxy runs in a background thread with its own loop, so blocking clients (psycopg's
sync API, psql subprocesses) and asyncio clients on the test's loop all work against it.
It is the same `ProxyService` the CLI builds; only caching is off (relay tests).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import pytest

from neonpoly.control.serving import start_serving
from neonpoly.proxy.origin import Origin
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.pgharness import PgServer

T = TypeVar("T")


class RunningProxy:
    """A ProxyService serving on 127.0.0.1:<port> from a private event loop thread."""

    def __init__(
        self, origin_pg: PgServer, origin: Origin, *, connect_timeout: float = 5.0, loop: str = "asyncio"
    ) -> None:
        self.pg = origin_pg
        self.origin = origin
        self.root = Path(tempfile.mkdtemp(prefix="neonpoly-relay-"))  # where serve records its address
        self.loop = _new_loop(loop)
        self._thread = threading.Thread(target=self.loop.run_forever, name="neonpoly-proxy", daemon=True)
        self._thread.start()
        self.service = ProxyService(
            ProxySettings(
                listen=("127.0.0.1", 0),
                cache=CacheSettings(enabled=False),
                connect_timeout=connect_timeout,
            )
        )
        self.serving = self.call(start_serving(self.service, self.root, upstream=origin, follow=False))
        self.host, self.port = self.serving.address

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the proxy's loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def url(self, role: str = "postgres", db: str = "app", **params: str) -> str:
        """A libpq URL for clients: the origin's credentials, neonpoly's address."""
        query = {"sslmode": "disable", **params}
        auth = f"{quote(role, safe='')}:{quote(self.pg.password_for(role), safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(db, safe='')}?{urlencode(query)}"

    def dsn(self, role: str = "postgres", db: str = "app") -> dict[str, Any]:
        """Keyword arguments for asyncpg.connect."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": role,
            "password": self.pg.password_for(role),
            "database": db,
            "ssl": False,
        }

    @property
    def session_count(self) -> int:
        return len(self.service.server.sessions)

    def close(self, grace: float = 0.5) -> None:
        try:
            self.call(self.serving.close(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":  # what `neonpoly serve` runs on
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


def start_proxy(origin_pg: PgServer, *, sslmode: str = "require", **kwargs: Any) -> RunningProxy:
    return RunningProxy(origin_pg, Origin.from_url(origin_pg.url("postgres", sslmode=sslmode)), **kwargs)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def proxy(pg: PgServer, request: pytest.FixtureRequest) -> Iterator[RunningProxy]:
    """Pass-through neonpoly whose origin is `pg` reached over TLS (sslmode=require).

    Every relay test runs on both event loops: the CLI serves on uvloop, whose transports
    behave differently from asyncio's in ways that have broken the relay before.
    """
    running = start_proxy(pg, loop=request.param)
    try:
        yield running
    finally:
        running.close()

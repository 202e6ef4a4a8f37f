"""A PostgreSQL with wal_level=logical, and neonpoly in front of it with its change feed.

The feed tests get an origin of their own: the shared one stays at wal_level=replica (the
suite's other proxies then find the feed off after one connection, as most origins would),
and the `--change-feed auto` refusal is tested against it.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from neonpoly.cache.siblings import SiblingBoard
from neonpoly.control.serving import Serving, start_serving
from neonpoly.freshness.changefeed import ChangeFeed, FeedSettings
from neonpoly.freshness.plane import PlaneSettings
from neonpoly.integrations.embedded import SettingValue
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.freshness.redisharness import RedisServer, redis_server_binary
from tests.pgharness import PgServer, start_pg_server

LOGICAL: dict[str, SettingValue] = {"wal_level": "logical", "max_replication_slots": 20, "max_wal_senders": 20}


@pytest.fixture(scope="session")
def pg_logical() -> Iterator[PgServer]:
    server = start_pg_server(small=True, extra_settings=LOGICAL)
    print(f"\n[pg_logical fixture] started in {server.startup_seconds:.2f}s", file=sys.stderr)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pub_database(pg_logical: PgServer) -> str:
    """A database whose owner made the publication `neonpoly` FOR ALL TABLES: the feed reads
    pgoutput there (elsewhere test_decoding)."""
    with psycopg.connect(pg_logical.url("postgres", "postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE feed_pub")
    with psycopg.connect(pg_logical.url("postgres", "feed_pub"), autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION neonpoly FOR ALL TABLES")
    return "feed_pub"


@pytest.fixture(params=["test_decoding", "pgoutput"])
def decoder_database(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(decoder, the database where the feed reads it)."""
    if request.param == "pgoutput":
        return "pgoutput", str(request.getfixturevalue("pub_database"))
    return "test_decoding", "app"


@pytest.fixture
def state_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="neonpoly-feed-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class FeedProxy:
    service: ProxyService
    serving: Serving
    pg: PgServer
    database: str

    @property
    def port(self) -> int:
        return self.serving.address[1]

    def dsn(self, database: str | None = None) -> dict[str, Any]:
        return {**self.pg.dsn("postgres", database or self.database), "host": "127.0.0.1", "port": self.port}

    @property
    def origin_key(self) -> str:
        return self.service.routes.by_id["default"].origin.label

    def feed(self, database: str | None = None) -> ChangeFeed:
        database = database or self.database
        feed = self.service.feeds.feed(self.origin_key, database)
        assert feed is not None, f"no feed for {database}"
        return feed

    def hits(self) -> int:
        return self.service.stats.snapshot().totals.hits

    async def live(self, database: str | None = None, connects: int = 1) -> ChangeFeed:
        """The feed of `database`, once it went live `connects` times."""
        database = database or self.database
        await until(lambda: (f := self.service.feeds.feed(self.origin_key, database)) is not None
                    and f.state == "live" and f.connects >= connects, f"feed of {database} live")
        return self.feed(database)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for a condition (never a fixed sleep as proof); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def feed_proxy(
    pg: PgServer,
    root: Path,
    feed: FeedSettings | None = None,
    *,
    database: str = "app",
    role: str = "postgres",
    **cache: Any,
) -> AsyncIterator[FeedProxy]:
    """What `neonpoly serve --upstream <pg> --change-feed …` runs (start_serving), storing a
    query's answer on its first run so the next one is a hit."""
    settings = ProxySettings(
        listen=("127.0.0.1", 0),
        cache_dir=root / "cache",
        cache=CacheSettings(**{"admit_after": 1, **cache}),
        rules_dir=root,
        change_feed=feed or FeedSettings(mode="on"),
    )
    service = ProxyService(settings)
    upstream = pg.url(role, database, sslmode="require")
    serving = await start_serving(service, root, upstream=upstream, follow=False)
    try:
        yield FeedProxy(service, serving, pg, database)
    finally:
        await serving.close(grace=0.5)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own (the plane's tests kill and restart it), holding the
    plane's epoch of an hour ago (`age_epoch`: the nodes need not wait out rule 5 to start)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs the Debian package redis-server)")
    server = RedisServer(binary)
    server.start()
    server.age_epoch()
    try:
        yield server
    finally:
        server.destroy()


# Plane timings shorter than the defaults (fence 2.7 s instead of 4.75 s), keeping every
# relation PlaneSettings checks (block < limit < hold, heartbeat >= check + limit + margin):
# only how long a cut off writer waits, a lost node takes to be seen and a Redis that lost its
# data is waited out change, not which reads may be hits.
FAST: dict[str, float] = {"heartbeat": 1.6, "check": 0.25, "limit": 0.6, "hold": 0.9, "block": 0.1}


@asynccontextmanager
async def plane_node(
    pg: PgServer,
    root: Path,
    redis_url: str,
    feed: FeedSettings | None = None,
    *,
    database: str = "app",
    plane: dict[str, Any] | None = None,
    siblings: SiblingBoard | None = None,
    **cache: Any,
) -> AsyncIterator[FeedProxy]:
    """One `neonpoly serve --upstream <pg> --redis <url>` node (its own state dir); with
    `siblings`, one worker of a `serve --workers N` (its row of the shared generations)."""
    root.mkdir(parents=True, exist_ok=True)
    settings = ProxySettings(
        listen=("127.0.0.1", 0),
        cache_dir=root / "cache",
        cache=CacheSettings(**{"admit_after": 1, **cache}),
        rules_dir=root,
        change_feed=feed or FeedSettings(mode="off"),
        redis=PlaneSettings(redis_url, **(plane or {})),
        siblings=siblings,
    )
    service = ProxyService(settings)
    serving = await start_serving(service, root, upstream=pg.url("postgres", database, sslmode="require"),
                                  follow=False)
    try:
        yield FeedProxy(service, serving, pg, database)
    finally:
        await serving.close(grace=0.5)

"""The second hostile review: the change feed with the cache.

Every case writes *directly on the origin* (not through neonpoly), waits until the feed has
provably passed the write (its position past the write's WAL flush position, or a catalog
check sent after it), then asks neonpoly again: an answer that was a cache hit before the write
must not come back stale. "Writes that bypass neonpoly" are TTL-bound only without a feed;
with a live feed the README promises they evict what they touched, in commit order (rows) or
at the next catalog check (DDL, `poll` mode).

The origin here is one of this file's own (wal_level=logical, prepared transactions allowed,
a tiny logical_decoding_work_mem so big transactions spill to disk), so the rest of the
suite's origin stays at wal_level=replica.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from neonpoly.freshness.changefeed import ChangeFeed, FeedSettings
from neonpoly.freshness.stream import parse_lsn
from tests.freshness.conftest import LOGICAL, FeedProxy, feed_proxy, until
from tests.pgharness import PgServer, start_pg_server

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


@pytest.fixture(scope="module")
def origin() -> Iterator[PgServer]:
    server = start_pg_server(
        small=True,
        extra_settings={**LOGICAL, "max_prepared_transactions": 5, "logical_decoding_work_mem": "64kB"},
    )
    try:
        yield server
    finally:
        server.destroy()


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def _world(
    pg: PgServer, root: Path, *, database: str = "app", ddl: str = "poll", publication: str | None = None
) -> AsyncIterator[tuple[FeedProxy, ChangeFeed, Conn, asyncpg.Connection]]:
    """A feed proxy on `database` (made first, with `publication` if given: pgoutput), its
    live feed, a direct superuser connection and a client through neonpoly."""
    if database != "app":
        async with await psycopg.AsyncConnection.connect(pg.url("postgres", "postgres"), autocommit=True) as c:
            await c.execute(f'CREATE DATABASE "{database}"')
        if publication is not None:
            async with await psycopg.AsyncConnection.connect(pg.url("postgres", database), autocommit=True) as c:
                await c.execute(f"CREATE PUBLICATION neonpoly FOR ALL TABLES {publication}")
    settings = FeedSettings(mode="on", ddl=ddl, ddl_poll=0.05)
    async with feed_proxy(pg, root, settings, database=database) as proxy:
        feed = await proxy.live()
        direct: Conn = await psycopg.AsyncConnection.connect(pg.url("postgres", database), autocommit=True)
        client = await asyncpg.connect(**proxy.dsn())
        try:
            yield proxy, feed, direct, client
        finally:
            await client.close()
            await direct.close()


async def _cached(proxy: FeedProxy, client: asyncpg.Connection, sql: str) -> list[tuple[Any, ...]]:
    """Read until the answer provably comes from the cache; return it."""
    for _ in range(5):
        before = proxy.hits()
        rows = [tuple(r) for r in await client.fetch(sql)]
        if proxy.hits() > before:
            return rows
    raise AssertionError(f"never served from the cache: {sql} {proxy.service.stats.snapshot().totals.by_status}")


async def _rows_passed(feed: ChangeFeed, direct: Conn) -> None:
    """Wait until the feed applied every commit the direct connection made."""
    row = await (await direct.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone()
    assert row is not None
    lsn = parse_lsn(str(row[0]))
    await until(lambda: feed.caught_up(lsn), "the feed past the direct write")


async def _catalog_passed(feed: ChangeFeed, direct: Conn) -> None:
    """Rows passed, and a catalog check sent after the write completed (poll mode)."""
    await _rows_passed(feed, direct)
    done = time.monotonic()
    await until(lambda: feed.ddl_checked > done, "a catalog check sent after the direct DDL")


async def _fresh(client: asyncpg.Connection, direct: Conn, sql: str, why: str) -> None:
    got = [tuple(r) for r in await client.fetch(sql)]
    want = [tuple(r) for r in await (await direct.execute(sql)).fetchall()]
    assert got == want, f"{why}: neonpoly answered {got!r}, the origin says {want!r} for {sql!r}"


# --- DDL the catalog check does not see --------------------------------------------------


async def test_comment_on_table_made_directly(origin: PgServer, tmp_path: Path) -> None:
    """obj_description() is trusted (it reads pg_description, "changed only by DDL, which
    evicts"); COMMENT ON made directly is DDL the feed must catch. The poll's fingerprint
    did not cover pg_description: the old comment was served forever (until the TTL)."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        table = _name("cmt")
        await direct.execute(f"CREATE TABLE {table} (id int)")
        await direct.execute(f"COMMENT ON TABLE {table} IS 'old'")
        oid = (await (await direct.execute(f"SELECT '{table}'::regclass::oid")).fetchone() or [0])[0]
        await _catalog_passed(feed, direct)
        sql = f"SELECT obj_description({oid}::oid, 'pg_class')"
        assert await _cached(proxy, client, sql) == [("old",)]
        await direct.execute(f"COMMENT ON TABLE {table} IS 'new'")
        await _catalog_passed(feed, direct)
        await _fresh(client, direct, sql, "COMMENT ON TABLE made directly")


async def test_comment_on_database_made_directly(origin: PgServer, tmp_path: Path) -> None:
    """shobj_description() reads pg_shdescription, a shared catalog the poll did not cover."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        db_oid = (await (await direct.execute("SELECT oid FROM pg_database WHERE datname = 'app'")).fetchone()
                  or [0])[0]
        await direct.execute("COMMENT ON DATABASE app IS 'old'")
        await _catalog_passed(feed, direct)
        sql = f"SELECT shobj_description({db_oid}::oid, 'pg_database')"
        try:
            assert await _cached(proxy, client, sql) == [("old",)]
            await direct.execute("COMMENT ON DATABASE app IS 'new'")
            await _catalog_passed(feed, direct)
            await _fresh(client, direct, sql, "COMMENT ON DATABASE made directly")
        finally:
            await direct.execute("COMMENT ON DATABASE app IS NULL")


async def test_role_membership_granted_directly_with_the_event_trigger(origin: PgServer, tmp_path: Path) -> None:
    """`--change-feed-ddl install` catches DDL with an event trigger, and PostgreSQL fires
    none for GRANT role (nor any command on roles or databases): with the poll gone, a
    membership granted directly was never seen and pg_has_role() answered from the cache."""
    role, group = _name("adv_member"), _name("adv_group")
    async with _world(origin, tmp_path, ddl="install") as (proxy, feed, direct, client):
        assert feed.ddl_mode == "stream"
        await direct.execute(f"CREATE ROLE {role}")
        await direct.execute(f"CREATE ROLE {group}")
        try:
            await _rows_passed(feed, direct)
            sql = f"SELECT pg_has_role('{role}', '{group}', 'MEMBER')"
            assert await _cached(proxy, client, sql) == [(False,)]
            await direct.execute(f"GRANT {group} TO {role}")
            await _catalog_passed(feed, direct)
            await _fresh(client, direct, sql, "GRANT role made directly (event trigger mode)")
        finally:
            await direct.execute(f"DROP ROLE IF EXISTS {role}")
            await direct.execute(f"DROP ROLE IF EXISTS {group}")

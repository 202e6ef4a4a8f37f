"""With the change feed live, a read of tables it follows is stored with the feed's long TTL
(a safety net: each commit evicts what it changed); a read of a table the stream does not
carry, another mode, or a feed that is down or off keeps the cache's TTL. Decisions are
asserted (what the policy chose for a stored entry, and what SHOW QUERIES says), never times."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import psycopg

from neonpoly.cache.rules import bare_tables
from neonpoly.freshness.changefeed import FeedSettings
from neonpoly.service import TemplateReport
from tests.freshness.conftest import FeedProxy, feed_proxy, until
from tests.pgharness import PgServer

CACHE_TTL = 30.0
FEED_TTL = 7200.0


def _template(proxy: FeedProxy, table: str) -> TemplateReport:
    found = [t for t in proxy.service.report().templates if f"FROM {table} " in t.stats.template]
    assert len(found) == 1, [t.stats.template for t in proxy.service.report().templates]
    return found[0]


def _decided(proxy: FeedProxy, table: str) -> float | None:
    """The TTL the cache's policy gives the template's next entry now (what store_capture
    asks; tags as entries carry them, here the table itself)."""
    template = _template(proxy, table).stats
    return proxy.service.policies["default"](template.template_id, frozenset(bare_tables(template.tables)))


async def _stored(proxy: FeedProxy, client: asyncpg.Connection, sql: str) -> None:
    """Read until the answer comes from the cache (so it was stored)."""
    for _ in range(5):
        before = proxy.hits()
        await client.fetch(sql)
        if proxy.hits() > before:
            return
    raise AssertionError(f"never served from the cache: {sql}")


async def _tables(proxy: FeedProxy, *ddl: str) -> None:
    """Create tables directly; wait until the feed caught the DDL (its eviction comes first)."""
    feed = proxy.feed()
    seen = feed.ddl
    async with await psycopg.AsyncConnection.connect(proxy.pg.url("postgres", proxy.database), autocommit=True) as c:
        for sql in ddl:
            await c.execute(sql)
    await until(lambda: feed.ddl > seen, "the DDL caught")


async def test_a_live_feed_lengthens_the_ttl_of_what_it_follows(pg_logical: PgServer, state_dir: Path) -> None:
    logged, unlogged = f"ttl_{uuid.uuid4().hex[:8]}", f"ttl_u_{uuid.uuid4().hex[:8]}"
    feed = FeedSettings(mode="on", ttl=FEED_TTL)
    async with feed_proxy(pg_logical, state_dir, feed, ttl=CACHE_TTL) as proxy:
        live = await proxy.live()
        await _tables(
            proxy,
            f"CREATE TABLE {logged} (id int PRIMARY KEY, v int)",
            f"CREATE UNLOGGED TABLE {unlogged} (id int PRIMARY KEY, v int)",
            f"CREATE VIEW {logged}_v AS SELECT * FROM {unlogged}",
        )
        client = await asyncpg.connect(**proxy.dsn())
        admin = await asyncpg.connect(**proxy.dsn("neonpoly"))
        try:
            await _stored(proxy, client, f"SELECT v FROM {logged} WHERE id = 1")
            followed = _template(proxy, logged)
            assert followed.stats.ttl == FEED_TTL  # what the entry was stored with
            assert _decided(proxy, logged) == FEED_TTL
            assert followed.ttl == FEED_TTL and "change feed live" in followed.ttl_source
            # An unlogged table's changes are not in the stream, nor those of a view over one.
            await _stored(proxy, client, f"SELECT v FROM {unlogged} WHERE id = 1")
            await _stored(proxy, client, f"SELECT v FROM {logged}_v WHERE id = 1")
            assert _template(proxy, unlogged).stats.ttl == CACHE_TTL
            assert _template(proxy, f"{logged}_v").stats.ttl == CACHE_TTL
            assert _decided(proxy, unlogged) == CACHE_TTL and _decided(proxy, f"{logged}_v") == CACHE_TTL
            rows = await admin.fetch("SHOW QUERIES")
            shown = {r["template"]: (r["ttl_s"], r["ttl_source"]) for r in rows}
            assert shown[followed.stats.template][0] == FEED_TTL
            assert "change feed live" in shown[followed.stats.template][1]

            # The feed stops (its database is evicted): what is stored next gets the cache's TTL.
            await live.stop()
            await _stored(proxy, client, f"SELECT v FROM {logged} WHERE id = 1")
            assert _decided(proxy, logged) == CACHE_TTL
            down = _template(proxy, logged)
            assert down.ttl == CACHE_TTL and "change feed" not in down.ttl_source

            # Live again: long again.
            live.start()
            await proxy.live(connects=2)
            await _stored(proxy, client, f"SELECT v FROM {logged} WHERE id = 1")
            assert _decided(proxy, logged) == FEED_TTL
        finally:
            await admin.close()
            await client.close()


async def test_fixed_mode_and_a_feed_turned_off_keep_the_cache_ttl(pg_logical: PgServer, state_dir: Path) -> None:
    table = f"ttl_f_{uuid.uuid4().hex[:8]}"
    async with feed_proxy(pg_logical, state_dir, FeedSettings(mode="on", ttl=FEED_TTL), ttl=CACHE_TTL) as proxy:
        await proxy.live()
        await _tables(proxy, f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        proxy.service.rules.set_mode("fixed", "default")
        client = await asyncpg.connect(**proxy.dsn())
        try:
            await _stored(proxy, client, f"SELECT v FROM {table} WHERE id = 1")
            assert _template(proxy, table).stats.ttl == CACHE_TTL
            assert _decided(proxy, table) == CACHE_TTL
        finally:
            proxy.service.rules.set_mode("auto", "default")  # rules persist in the state dir
            await client.close()
    async with feed_proxy(pg_logical, state_dir, FeedSettings(mode="off", ttl=FEED_TTL), ttl=CACHE_TTL) as proxy:
        assert proxy.service.rules.mode("default") == "auto"
        client = await asyncpg.connect(**proxy.dsn())
        try:
            await _stored(proxy, client, f"SELECT v FROM {table} WHERE id = 2")
            assert _template(proxy, table).stats.ttl == CACHE_TTL
            assert _decided(proxy, table) == CACHE_TTL
        finally:
            await client.close()

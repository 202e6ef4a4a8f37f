"""The origin's change feed: writes, TRUNCATE and DDL made directly on the origin (not through
neonpoly) are not served stale once the feed has passed them; a lost feed is a gap."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import psycopg

from neonpoly.admin.metrics import MetricsServer
from neonpoly.freshness.changefeed import FeedSettings
from neonpoly.freshness.stream import parse_lsn
from tests.freshness.conftest import FeedProxy, feed_proxy, until
from tests.pgharness import PgServer


def _table(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def _direct(pg: PgServer, database: str = "app") -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(pg.url("postgres", database), autocommit=True)


async def _flushed_lsn(direct: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    """A WAL position at or after the end of every commit this connection made."""
    row = await (await direct.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


async def _cached(proxy: FeedProxy, client: asyncpg.Connection, sql: str) -> object:
    """Read until the answer comes from the cache; return it."""
    for _ in range(5):
        before = proxy.hits()
        value = await client.fetchval(sql)
        if proxy.hits() > before:
            return value
    raise AssertionError(f"never served from the cache: {sql}")


async def test_direct_writes_are_fresh_within_a_second(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    decoder, database = decoder_database
    table = _table("fresh")
    writes = 1000
    async with feed_proxy(pg_logical, state_dir, database=database) as proxy:
        feed = await proxy.live()
        assert feed.decoder == decoder
        direct = await _direct(pg_logical, database)
        client = await asyncpg.connect(**proxy.dsn())
        try:
            await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
            sql = f"SELECT v FROM {table} WHERE id = 1"
            await until(lambda: feed.ddl_checked > 0, "a catalog check")
            visible: list[float] = []
            for i in range(1, writes + 1):
                assert await _cached(proxy, client, sql) == i - 1
                await direct.execute(f"UPDATE {table} SET v = %s WHERE id = 1", (i,))
                committed = time.perf_counter()
                lsn = await _flushed_lsn(direct)
                while True:
                    passed = feed.caught_up(lsn)  # judged before the read is sent
                    value = await client.fetchval(sql)
                    if value == i:
                        visible.append(time.perf_counter() - committed)
                        break
                    assert not passed, f"write {i}: stale {value!r} after the feed passed the commit"
                    assert time.perf_counter() - committed < 30, f"write {i} never became visible"
        finally:
            await client.close()
            await direct.close()
    visible.sort()
    p50 = statistics.median(visible) * 1000
    p99 = visible[int(len(visible) * 0.99) - 1] * 1000
    print(f"\n[change feed, {decoder}] {writes} direct writes visible through neonpoly: p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms, max {visible[-1] * 1000:.2f} ms", file=sys.stderr)
    assert p99 < 1000, f"p99 {p99:.0f} ms exceeds the issue's 1 s bound"


async def test_direct_truncate_is_caught(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    table = _table("trunc")
    async with feed_proxy(pg_logical, state_dir, database=decoder_database[1]) as proxy:
        feed = await proxy.live()
        direct = await _direct(pg_logical, decoder_database[1])
        client = await asyncpg.connect(**proxy.dsn())
        try:
            await direct.execute(f"CREATE TABLE {table} (id int)")
            await direct.execute(f"INSERT INTO {table} SELECT generate_series(1, 10)")
            sql = f"SELECT count(*) FROM {table}"
            assert await _cached(proxy, client, sql) == 10
            truncates = feed.truncates
            await direct.execute(f"TRUNCATE {table}")
            lsn = await _flushed_lsn(direct)
            await until(lambda: feed.caught_up(lsn), "the feed past the TRUNCATE")
            assert await client.fetchval(sql) == 0
            assert feed.truncates == truncates + 1
        finally:
            await client.close()
            await direct.close()


async def _alter_is_caught(proxy: FeedProxy, pg: PgServer, *, by_stream: bool) -> None:
    table = _table("alter")
    feed = await proxy.live()
    direct = await _direct(pg)
    client = await asyncpg.connect(**proxy.dsn())
    try:
        await direct.execute(f"CREATE TABLE {table} (id int)")
        await direct.execute(f"INSERT INTO {table} VALUES (1)")
        sql = f"SELECT * FROM {table}"
        if not by_stream:
            await until(lambda: feed.ddl_checked > 0, "a first catalog check")
        before = proxy.hits()
        for _ in range(3):
            rows = await client.fetch(sql)
        assert proxy.hits() > before and list(rows[0].keys()) == ["id"]
        ddl = feed.ddl
        # A column with a constant default: no row is rewritten, nothing in the row stream.
        await direct.execute(f"ALTER TABLE {table} ADD COLUMN w int DEFAULT 7")
        altered = time.monotonic()
        if by_stream:
            lsn = await _flushed_lsn(direct)
            await until(lambda: feed.caught_up(lsn), "the feed past the ALTER TABLE")
        else:
            await until(lambda: feed.ddl_checked > altered, "a catalog check sent after the ALTER TABLE")
        rows = await client.fetch(sql)
        assert [tuple(r.values()) for r in rows] == [(1, 7)]
        assert feed.ddl > ddl
    finally:
        await client.close()
        await direct.close()


async def test_direct_alter_table_is_caught_by_the_catalog_check(pg_logical: PgServer, state_dir: Path) -> None:
    async with feed_proxy(pg_logical, state_dir, FeedSettings(mode="on", ddl="poll")) as proxy:
        await _alter_is_caught(proxy, pg_logical, by_stream=False)
        assert proxy.feed().ddl_mode == "poll"


async def test_direct_alter_table_is_caught_in_the_stream_with_the_event_trigger(
    pg_logical: PgServer, state_dir: Path
) -> None:
    async with feed_proxy(pg_logical, state_dir, FeedSettings(mode="on", ddl="install")) as proxy:
        try:
            await _alter_is_caught(proxy, pg_logical, by_stream=True)
            assert proxy.feed().ddl_mode == "stream"
        finally:
            proxy.service.remove_cache("default")  # `integrations remove`: drops the trigger
            await proxy.service.feeds.close()
    direct = await _direct(pg_logical)
    try:
        cur = await direct.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname = 'neonpoly_ddl'")
        assert await cur.fetchone() == (0,)
        cur = await direct.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'neonpoly'")
        assert await cur.fetchone() == (0,)
    finally:
        await direct.close()


async def test_a_write_while_the_feed_is_down_is_not_served_stale(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    table = _table("gap")
    async with feed_proxy(pg_logical, state_dir, database=decoder_database[1]) as proxy:
        feed = await proxy.live()
        direct = await _direct(pg_logical, decoder_database[1])
        client = await asyncpg.connect(**proxy.dsn())
        try:
            await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
            sql = f"SELECT v FROM {table} WHERE id = 1"
            assert await _cached(proxy, client, sql) == 0
            connects, gaps = feed.connects, feed.gaps
            slot = feed.slot
            # The write commits after the walsender is gone (terminate waits for it), and a
            # new slot cannot be created before it commits (it waits for writing
            # transactions): the stream will never carry it. Only the gap can.
            async with direct.transaction():
                await direct.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
                cur = await direct.execute(
                    "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,),
                )
                assert await cur.fetchone() == (True,)
            await proxy.live(connects=connects + 1)
            assert feed.slot != slot and feed.gaps >= gaps + 2  # evicted when lost, and when live again
            assert await client.fetchval(sql) == 1
            cur = await direct.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            assert await cur.fetchone() == (0,), "the temporary slot outlived its connection"
        finally:
            await client.close()
            await direct.close()


async def test_the_feed_closes_when_idle_and_reopens_with_a_gap(pg_logical: PgServer, state_dir: Path) -> None:
    table = _table("idle")
    async with feed_proxy(pg_logical, state_dir, FeedSettings(mode="on", idle=0.5)) as proxy:
        feed = await proxy.live()
        slot = feed.slot
        await until(lambda: feed.state == "idle", "the feed closed for idleness")
        assert "without clients" in proxy.service.report().caches[0].change_feed
        direct = await _direct(pg_logical)
        try:
            await until_no_slot(direct, slot)
            await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
            client = await asyncpg.connect(**proxy.dsn())
            try:
                await proxy.live(connects=2)  # a client came: the feed reopened
                assert await client.fetchval(f"SELECT v FROM {table}") == 0
                await direct.execute(f"UPDATE {table} SET v = 1")
                lsn = await _flushed_lsn(direct)
                await until(lambda: feed.caught_up(lsn), "the reopened feed past the write")
                assert await client.fetchval(f"SELECT v FROM {table}") == 1
            finally:
                await client.close()
        finally:
            await direct.close()


async def until_no_slot(direct: psycopg.AsyncConnection[tuple[object, ...]], slot: str) -> None:
    """The server dropped the temporary slot with its connection."""
    deadline = time.monotonic() + 30
    while True:
        cur = await direct.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        if await cur.fetchone() == (0,):
            return
        assert time.monotonic() < deadline, f"slot {slot} still exists"
        await asyncio.sleep(0.01)


async def test_a_database_gets_its_feed_with_its_first_client(pg_logical: PgServer, state_dir: Path) -> None:
    table = _table("other")
    async with await psycopg.AsyncConnection.connect(pg_logical.url("postgres", "postgres"), autocommit=True) as su:
        cur = await su.execute("SELECT count(*) FROM pg_database WHERE datname = 'feed_other'")
        if await cur.fetchone() == (0,):
            await su.execute("CREATE DATABASE feed_other")
    async with feed_proxy(pg_logical, state_dir) as proxy:
        await proxy.live()
        assert proxy.service.feeds.feed(proxy.origin_key, "feed_other") is None
        client = await asyncpg.connect(**proxy.dsn("feed_other"))
        direct = await _direct(pg_logical, "feed_other")
        try:
            feed = await proxy.live("feed_other")
            await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
            sql = f"SELECT v FROM {table}"
            assert await _cached(proxy, client, sql) == 0
            await direct.execute(f"UPDATE {table} SET v = 1")
            lsn = await _flushed_lsn(direct)
            await until(lambda: feed.caught_up(lsn), "the feed of feed_other past the write")
            assert await client.fetchval(sql) == 1
            [cache] = proxy.service.report().caches
            assert [f.database for f in cache.feeds] == ["app", "feed_other"]
            assert cache.change_feed.startswith("app: on") and "; feed_other: on" in cache.change_feed
        finally:
            await client.close()
            await direct.close()


async def test_show_caches_shows_the_feed(pg_logical: PgServer, state_dir: Path) -> None:
    table = _table("shown")
    async with feed_proxy(pg_logical, state_dir) as proxy:
        feed = await proxy.live()
        direct = await _direct(pg_logical)
        try:
            await direct.execute(f"CREATE TABLE {table} (id int)")
            created = time.monotonic()
            for i in range(3):
                await direct.execute(f"INSERT INTO {table} VALUES (%s)", (i,))
            lsn = await _flushed_lsn(direct)
            await until(lambda: feed.caught_up(lsn), "the feed past the inserts")
            await until(lambda: feed.ddl_checked > created, "a catalog check after the CREATE TABLE")
        finally:
            await direct.close()
        admin = await asyncpg.connect(**proxy.dsn("neonpoly"))
        try:
            [row] = await admin.fetch("SHOW CACHES")
        finally:
            await admin.close()
        assert row["change_feed"].startswith("on (lag ") and row["change_feed"].endswith(" ms)")
        assert row["feed_changes"] >= 3 and row["feed_gaps"] == 1 and row["feed_ddl"] >= 1  # CREATE TABLE
        assert row["feed_last_change"] is not None
        assert row["feed_slot"] == feed.status().slot and row["feed_slot"].startswith("neonpoly_")
        assert row["plane_lost"] is None  # no plane here
        metrics = MetricsServer(proxy.service).render().decode()
        assert 'neonpoly_change_feed_live{cache="default",cache_name="default",database="app"} 1.0' in metrics
        gaps = 'neonpoly_change_feed_evictions_total{cache="default",cache_name="default",database="app",why="gap"} 1.0'
        assert gaps in metrics


async def test_a_bulk_write_touching_two_tables_evicts_both(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    """Rows of a bulk write are skipped undecoded once their relation is counted; a table
    written after them in the same transaction still counts."""
    a, b = _table("bulk_a"), _table("bulk_b")
    database = decoder_database[1]
    async with feed_proxy(pg_logical, state_dir, database=database) as proxy:
        feed = await proxy.live()
        direct = await _direct(pg_logical, database)
        client = await asyncpg.connect(**proxy.dsn())
        try:
            for table in (a, b):
                await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
                await direct.execute(f"INSERT INTO {table} VALUES (0, 0)")
            assert await _cached(proxy, client, f"SELECT count(*) FROM {a}") == 1
            assert await _cached(proxy, client, f"SELECT v FROM {b}") == 0
            async with direct.transaction():
                await direct.execute(f"INSERT INTO {a} SELECT g, g FROM generate_series(1, 20000) g")
                await direct.execute(f"UPDATE {b} SET v = 1")
                await direct.execute(f"INSERT INTO {a} VALUES (-1, -1)")
            lsn = await _flushed_lsn(direct)
            await until(lambda: feed.caught_up(lsn), "the feed past the bulk write")
            assert await client.fetchval(f"SELECT count(*) FROM {a}") == 20002
            assert await client.fetchval(f"SELECT v FROM {b}") == 1
        finally:
            await client.close()
            await direct.close()

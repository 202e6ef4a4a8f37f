"""Never stale after a write through neonpoly; never cache what must not be cached."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, unique


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as p:
        yield p


async def counter_table(pg: PgServer, rows: int = 1) -> str:
    table = unique("inv")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
        await conn.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {rows}) g")
    return table


async def test_update_autocommit_then_read_elsewhere(pg: PgServer, proxy: CachingProxy) -> None:
    table = await counter_table(pg)
    reader = await asyncpg.connect(**proxy.dsn())
    writer = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        for expected in range(1, 6):
            for _ in range(3):  # warm: the third read is a hit
                assert await reader.fetchval(f"SELECT v FROM {table} WHERE id = 1") == expected - 1
            await writer.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
            assert await reader.fetchval(f"SELECT v FROM {table} WHERE id = 1") == expected
    finally:
        await reader.close()
        await writer.close()
    assert proxy.totals()["hit"] >= 10


async def test_update_in_transaction_commit_and_rollback(pg: PgServer, proxy: CachingProxy) -> None:
    table = await counter_table(pg)
    sql = f"SELECT v FROM {table} WHERE id = 1"
    reader = await asyncpg.connect(**proxy.dsn())
    writer = await asyncpg.connect(**proxy.dsn("postgres"))
    try:
        for _ in range(3):
            assert await reader.fetchval(sql) == 0
        async with writer.transaction():
            await writer.execute(f"UPDATE {table} SET v = 7 WHERE id = 1")
            assert await writer.fetchval(sql) == 7  # inside the transaction: never cached
            assert await reader.fetchval(sql) == 0  # others still see the committed value
        assert await reader.fetchval(sql) == 7
        for _ in range(3):
            assert await reader.fetchval(sql) == 7
        tx = writer.transaction()
        await tx.start()
        await writer.execute(f"UPDATE {table} SET v = 99 WHERE id = 1")
        await tx.rollback()
        assert await reader.fetchval(sql) == 7
        # A simple-protocol transaction (psql style) in one string of statements.
        await writer.execute(f"BEGIN; UPDATE {table} SET v = 8 WHERE id = 1; COMMIT")
        assert await reader.fetchval(sql) == 8
    finally:
        await reader.close()
        await writer.close()
    assert proxy.totals().get("transaction", 0) >= 1


async def test_ddl_and_truncate_evict_the_database(pg: PgServer, proxy: CachingProxy) -> None:
    table = await counter_table(pg, rows=3)
    sql = f"SELECT count(*) FROM {table}"
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            assert await conn.fetchval(sql) == 3
        await conn.execute(f"TRUNCATE {table}")
        assert await conn.fetchval(sql) == 0
        for _ in range(2):
            assert await conn.fetchval(sql) == 0
        await conn.execute(f"INSERT INTO {table} VALUES (1, 1)")
        assert await conn.fetchval(sql) == 1
    finally:
        await conn.close()


async def test_concurrent_writers_never_read_stale(pg: PgServer, proxy: CachingProxy) -> None:
    """Readers never see a value older than the newest write acknowledged before they began."""
    table = await counter_table(pg, rows=4)
    acknowledged = {k: 0 for k in range(1, 5)}
    stale: list[tuple[int, int, int]] = []
    reads = 0
    # Bounded by work, not by a clock: it runs until enough reads were made with the cache
    # really in play (a loaded machine only makes it take longer); the cap keeps it finite.
    cap = time.monotonic() + 120.0

    def running() -> bool:
        enough = reads >= 300 and proxy.totals().get("hit", 0) >= 20
        return not enough and time.monotonic() < cap

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        conn = await asyncpg.connect(**proxy.dsn())
        try:
            while running():
                key = rng.randint(1, 4)
                value = await conn.fetchval(f"UPDATE {table} SET v = v + 1 WHERE id = $1 RETURNING v", key)
                acknowledged[key] = max(acknowledged[key], value)
                await asyncio.sleep(rng.random() * 0.01)
        finally:
            await conn.close()

    async def reader(seed: int) -> None:
        nonlocal reads
        rng = random.Random(seed)
        conn = await asyncpg.connect(**proxy.dsn())
        try:
            while running():
                key = rng.randint(1, 4)
                floor = acknowledged[key]
                value = await conn.fetchval(f"SELECT v FROM {table} WHERE id = $1", key)
                reads += 1
                if value < floor:
                    stale.append((key, value, floor))
        finally:
            await conn.close()

    await asyncio.gather(*(writer(i) for i in range(3)), *(reader(100 + i) for i in range(6)))
    assert stale == []
    assert reads >= 300 and proxy.totals().get("hit", 0) >= 20  # the cache was really in play


@pytest.mark.parametrize(
    ("sql", "status"),
    [
        ("SELECT now()", "volatile"),
        ("SELECT random()", "volatile"),
        ("SELECT nextval('{seq}')", "volatile"),
        ("SELECT v FROM {table} FOR UPDATE", "uncacheable"),
        ("WITH u AS (UPDATE {table} SET v = v RETURNING v) SELECT count(*) FROM u", "uncacheable"),
        ("SELECT 1; SELECT 2", "multiplestatements"),
    ],
)
async def test_never_answered_from_cache(pg: PgServer, proxy: CachingProxy, sql: str, status: str) -> None:
    table = await counter_table(pg)
    seq = unique("seq")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE SEQUENCE {seq}")
    text = sql.format(table=table, seq=seq)
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(4):
            await conn.execute(text)
    finally:
        await conn.close()
    totals = proxy.totals()
    assert totals.get(status) == 4, totals
    assert "hit" not in totals


async def test_select_into_and_transactions_never_cached(pg: PgServer, proxy: CachingProxy) -> None:
    table = await counter_table(pg)
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for i in range(3):
            await conn.execute(f"SELECT * INTO {table}_copy{i} FROM {table}")
        async with conn.transaction():
            for _ in range(4):
                assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = 1") == 0
    finally:
        await conn.close()
    totals = proxy.totals()
    assert totals.get("uncacheable") == 3
    assert totals.get("transaction") == 4
    assert "hit" not in totals


async def test_write_to_base_table_evicts_reads_of_its_views(pg: PgServer, proxy: CachingProxy) -> None:
    table = await counter_table(pg)
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE VIEW {table}_v AS SELECT id, v FROM {table}")
        await conn.execute(f"CREATE VIEW {table}_vv AS SELECT v * 10 AS tens FROM {table}_v")
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for value in range(1, 4):
            for _ in range(3):
                assert await conn.fetchval(f"SELECT v FROM {table}_v WHERE id = 1") == value - 1
                assert await conn.fetchval(f"SELECT tens FROM {table}_vv") == (value - 1) * 10
            await conn.execute(f"UPDATE {table} SET v = v + 1")
            assert await conn.fetchval(f"SELECT v FROM {table}_v WHERE id = 1") == value
            assert await conn.fetchval(f"SELECT tens FROM {table}_vv") == value * 10
    finally:
        await conn.close()
    assert proxy.totals().get("hit", 0) >= 6


async def test_statistics_views_are_never_cached(pg: PgServer, proxy: CachingProxy) -> None:
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(4):
            await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = 'app'")
    finally:
        await conn.close()
    totals = proxy.totals()
    assert "hit" not in totals
    assert totals.get("volatile", 0) >= 3, totals


async def test_executemany_and_prepared_writes_invalidate(pg: PgServer, proxy: CachingProxy) -> None:
    table = await counter_table(pg, rows=0)
    sql = f"SELECT count(*) FROM {table}"
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            assert await conn.fetchval(sql) == 0
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, i) for i in range(1, 501)])
        assert await conn.fetchval(sql) == 500
        insert = await conn.prepare(f"INSERT INTO {table} VALUES ($1, 0)")
        for _ in range(2):
            assert await conn.fetchval(sql) == 500
        await insert.fetch(1000)
        assert await conn.fetchval(sql) == 501
    finally:
        await conn.close()


async def test_foreign_key_cascades_evict_the_child_tables(pg: PgServer, proxy: CachingProxy) -> None:
    parent, child = unique("parent"), unique("child")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {parent} (id int PRIMARY KEY)")
        await conn.execute(
            f"CREATE TABLE {child} (id int PRIMARY KEY, parent_id int REFERENCES {parent} ON DELETE CASCADE)"
        )
        await conn.execute(f"INSERT INTO {parent} VALUES (1), (2)")
        await conn.execute(f"INSERT INTO {child} VALUES (10, 1), (20, 2)")
    sql = f"SELECT count(*) FROM {child}"
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        await conn.fetchval(f"SELECT count(*) FROM {parent}")  # neonpoly learns about parent
        for _ in range(3):
            assert await conn.fetchval(sql) == 2
        await conn.execute(f"DELETE FROM {parent} WHERE id = 1")  # cascades into child
        assert await conn.fetchval(sql) == 1
    finally:
        await conn.close()


async def test_first_write_to_an_unseen_table_evicts_everything(pg: PgServer, proxy: CachingProxy) -> None:
    parent, child = unique("parent"), unique("child")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {parent} (id int PRIMARY KEY)")
        await conn.execute(f"CREATE TABLE {child} (id int, parent_id int REFERENCES {parent} ON DELETE CASCADE)")
        await conn.execute(f"INSERT INTO {parent} VALUES (1)")
        await conn.execute(f"INSERT INTO {child} VALUES (10, 1)")
    sql = f"SELECT count(*) FROM {child}"
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            assert await conn.fetchval(sql) == 1
        await conn.execute(f"DELETE FROM {parent}")  # never read through neonpoly before
        assert await conn.fetchval(sql) == 0
    finally:
        await conn.close()


async def test_partitions_and_triggers(pg: PgServer, proxy: CachingProxy) -> None:
    events, audit = unique("events"), unique("audit")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {events} (id int, kind text) PARTITION BY LIST (kind)")
        await conn.execute(f"CREATE TABLE {events}_a PARTITION OF {events} FOR VALUES IN ('a')")
        await conn.execute(f"CREATE TABLE {events}_b PARTITION OF {events} FOR VALUES IN ('b')")
        await conn.execute(f"CREATE TABLE {audit} (n int)")
        await conn.execute(f"INSERT INTO {audit} VALUES (0)")
        await conn.execute(
            f"CREATE FUNCTION {audit}_bump() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN UPDATE {audit} SET n = n + 1; RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER {audit}_t AFTER INSERT ON {events}_b FOR EACH ROW EXECUTE FUNCTION {audit}_bump()"
        )
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            assert await conn.fetchval(f"SELECT count(*) FROM {events}") == 0
            assert await conn.fetchval(f"SELECT count(*) FROM {events}_a") == 0
            assert await conn.fetchval(f"SELECT n FROM {audit}") == 0
        await conn.execute(f"INSERT INTO {events}_a VALUES (1, 'a')")  # a partition, named directly
        assert await conn.fetchval(f"SELECT count(*) FROM {events}") == 1
        for _ in range(2):
            await conn.fetchval(f"SELECT count(*) FROM {events}_a")
        await conn.execute(f"INSERT INTO {events} VALUES (2, 'a')")  # routed through the parent
        assert await conn.fetchval(f"SELECT count(*) FROM {events}_a") == 2
        await conn.execute(f"INSERT INTO {events}_b VALUES (3, 'b')")  # fires the trigger
        assert await conn.fetchval(f"SELECT n FROM {audit}") == 1
        await conn.execute(f"INSERT INTO {events} VALUES (4, 'b')")  # trigger via the parent
        assert await conn.fetchval(f"SELECT n FROM {audit}") == 2
    finally:
        await conn.close()
    assert proxy.totals().get("hit", 0) >= 4


async def test_a_write_through_one_cache_evicts_another_on_the_same_origin(pg: PgServer, tmp_path: Path) -> None:
    from neonpoly.proxy.origin import Origin

    table = await counter_table(pg)
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as proxy:
        proxy.service.add_cache("second", Origin.from_url(pg.url("postgres", "app", sslmode="require")))
        sql = f"SELECT v FROM {table} WHERE id = 1"
        first = await asyncpg.connect(**proxy.dsn())
        second = await asyncpg.connect(**proxy.dsn(), server_settings={"application_name": "second"})
        try:
            for _ in range(3):
                assert await first.fetchval(sql) == 0
                assert await second.fetchval(sql) == 0
            await first.execute(f"UPDATE {table} SET v = 5 WHERE id = 1")
            assert await second.fetchval(sql) == 5
        finally:
            await first.close()
            await second.close()

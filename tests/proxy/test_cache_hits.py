"""Time To First Hit through every driver path; the origin's pg_stat_statements is the witness."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, psql, unique


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


async def make_table(pg: PgServer, rows: int = 5) -> str:
    table = unique("hits")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {table} SELECT g, 'name ' || g FROM generate_series(1, {rows}) g")
        await conn.execute(f"GRANT SELECT, UPDATE, INSERT, DELETE ON {table} TO scram_user, md5_user, trust_user")
    return table


async def test_psql_third_run_is_a_hit(pg: PgServer, proxy: CachingProxy) -> None:
    table = await make_table(pg)
    sql = f"SELECT id, name FROM {table} WHERE id <= 3 ORDER BY id"
    seen = []
    counts = []
    for _ in range(5):
        seen.append(await psql(proxy.url(), sql))
        counts.append(await pg.calls(f"FROM {table} WHERE id <="))
    assert counts == [1, 2, 2, 2, 2], counts
    assert all(rows == seen[0] for rows in seen) and seen[0] == ["1|name 1", "2|name 2", "3|name 3"]
    assert proxy.totals().get("hit") == 3


async def test_asyncpg_fetch_with_arguments(pg: PgServer, proxy: CachingProxy) -> None:
    table = await make_table(pg)
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    try:
        results = []
        counts = []
        for _ in range(5):
            results.append(await conn.fetch(f"SELECT name FROM {table} WHERE id = $1", 2))
            counts.append(await pg.calls(f"SELECT name FROM {table} WHERE id ="))
        other = await conn.fetch(f"SELECT name FROM {table} WHERE id = $1", 3)
    finally:
        await conn.close()
    assert counts[1:] == [2, 2, 2, 2], counts
    assert all(r == results[0] for r in results) and results[0][0]["name"] == "name 2"
    assert other[0]["name"] == "name 3"  # another argument is another entry
    # A new connection (new prepared statement names) is served from the same entries, once
    # its first run is past: that one follows a Parse/Describe/Flush the origin ran in an
    # implicit transaction, which only its Sync ends (answered here, the origin would hold it).
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    try:
        again = [await conn.fetch(f"SELECT name FROM {table} WHERE id = $1", 2) for _ in range(3)]
    finally:
        await conn.close()
    assert all(rows == results[0] for rows in again)
    assert await pg.calls(f"SELECT name FROM {table} WHERE id =") == 4  # the id=3 miss, that first run


@pytest.mark.parametrize("prepare", [False, True])
async def test_psycopg(pg: PgServer, proxy: CachingProxy, prepare: bool) -> None:
    table = await make_table(pg)
    sql = f"SELECT id, name FROM {table} WHERE id = %s"
    counts = []
    rows = []
    async with await psycopg.AsyncConnection.connect(proxy.url("md5_user"), autocommit=True) as conn:
        for _ in range(5):
            cur = await conn.execute(sql, (4,), prepare=prepare)
            rows.append(await cur.fetchall())
            counts.append(await pg.calls(f"FROM {table} WHERE id ="))
    assert counts == [1, 2, 2, 2, 2], counts
    assert all(r == [(4, "name 4")] for r in rows)


async def test_psycopg_pipeline(pg: PgServer, proxy: CachingProxy) -> None:
    table = await make_table(pg)
    counts = []
    async with await psycopg.AsyncConnection.connect(proxy.url("trust_user"), autocommit=True) as conn:
        for _ in range(4):
            async with conn.pipeline():
                c1 = await conn.execute(f"SELECT name FROM {table} WHERE id = %s", (1,))
                c2 = await conn.execute(f"SELECT count(*) FROM {table} WHERE id > %s", (0,))
            assert await c1.fetchall() == [("name 1",)]
            assert await c2.fetchall() == [(5,)]
            counts.append(await pg.calls(f"FROM {table} WHERE id"))
    assert counts == [2, 4, 4, 4], counts


async def test_simple_and_extended_share_nothing_wrong(pg: PgServer, proxy: CachingProxy) -> None:
    """Text and binary results are different bytes: psql and asyncpg never swap entries."""
    table = await make_table(pg)
    for _ in range(3):
        assert await psql(proxy.url(), f"SELECT id FROM {table} WHERE id = 5") == ["5"]
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            assert await conn.fetchval(f"SELECT id FROM {table} WHERE id = 5") == 5
    finally:
        await conn.close()

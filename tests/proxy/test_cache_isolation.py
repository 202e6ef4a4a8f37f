"""Entries are never shared across parameters, roles, databases, search_path or RLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, psql, unique


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as p:
        yield p


async def test_parameters_never_share(pg: PgServer, proxy: CachingProxy) -> None:
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            for n in range(5):
                assert await conn.fetchval("SELECT $1::int * 10", n) == n * 10
                assert await conn.fetchval("SELECT $1::text || 'x'", str(n)) == f"{n}x"
    finally:
        await conn.close()


async def test_roles_and_rls_see_their_own_rows(pg: PgServer, proxy: CachingProxy) -> None:
    table = unique("rls")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (owner text, secret text)")
        await conn.execute(f"INSERT INTO {table} VALUES ('scram_user', 'scram secret'), ('md5_user', 'md5 secret')")
        await conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        await conn.execute(f"CREATE POLICY own ON {table} USING (owner = current_user)")
        await conn.execute(f"GRANT SELECT ON {table} TO scram_user, md5_user")
    sql = f"SELECT secret FROM {table} ORDER BY 1"
    for _ in range(3):
        assert await psql(proxy.url("scram_user"), sql) == ["scram secret"]
        assert await psql(proxy.url("md5_user"), sql) == ["md5 secret"]
        assert await psql(proxy.url("postgres"), sql) == ["md5 secret", "scram secret"]
    assert proxy.totals().get("hit", 0) >= 5  # the very first run also learns what the table is


async def test_set_role_changes_the_key(pg: PgServer, proxy: CachingProxy) -> None:
    sql = "SELECT current_user"
    conn = await asyncpg.connect(**proxy.dsn("postgres"))
    try:
        for _ in range(3):
            assert await conn.fetchval(sql) == "postgres"
        await conn.execute("SET ROLE scram_user")
        for _ in range(3):
            assert await conn.fetchval(sql) == "scram_user"
        await conn.execute("RESET ROLE")
        assert await conn.fetchval(sql) == "postgres"
    finally:
        await conn.close()


async def test_databases_never_share(pg: PgServer, proxy: CachingProxy) -> None:
    for _ in range(3):
        assert await psql(proxy.url("postgres", "app"), "SELECT current_database()") == ["app"]
        assert await psql(proxy.url("postgres", "postgres"), "SELECT current_database()") == ["postgres"]


async def test_search_path_never_shares(pg: PgServer, proxy: CachingProxy) -> None:
    table = unique("sp")
    async with pg.superuser_conn() as conn:
        for schema in ("alpha", "beta"):
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(f"CREATE TABLE {schema}.{table} (v text)")
            await conn.execute(f"INSERT INTO {schema}.{table} VALUES ('{schema}')")
    sql = f"SELECT v FROM {table}"
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(3):
            await conn.execute("SET search_path = alpha")
            assert await conn.fetchval(sql) == "alpha"
            await conn.execute("SET search_path TO beta")
            assert await conn.fetchval(sql) == "beta"
    finally:
        await conn.close()
    # The startup packet's options set search_path too.
    for schema in ("alpha", "beta"):
        for _ in range(3):
            assert await psql(proxy.url(options=f"--search_path={schema}"), sql) == [schema]


async def test_any_setting_is_part_of_the_server_derived_key(pg: PgServer, proxy: CachingProxy) -> None:
    """After a SET the session asks the server who it is now; it caches again under that
    identity, which it shares with no session whose settings differ."""
    changed = await asyncpg.connect(**proxy.dsn())
    plain = await asyncpg.connect(**proxy.dsn())
    try:
        await changed.execute("SET enable_partitionwise_join = on")
        for _ in range(3):
            assert await changed.fetchval("SELECT 41 + 1") == 42
        hits = proxy.totals().get("hit", 0)
        assert hits >= 1, proxy.totals()
        assert await plain.fetchval("SELECT 41 + 1") == 42
        assert proxy.totals().get("hit", 0) == hits, proxy.totals()  # not the other session's entry
    finally:
        await changed.close()
        await plain.close()

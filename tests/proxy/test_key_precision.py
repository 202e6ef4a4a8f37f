"""A write confined to one primary key evicts what it can change and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from neonpoly.cache.relation_lookup import LOOKUP_SQL
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, unique


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as p:
        yield p


async def accounts(pg: PgServer, rows: int = 10) -> str:
    table = unique("acct")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (aid int PRIMARY KEY, abalance int NOT NULL)")
        await conn.execute(f"INSERT INTO {table} SELECT g, g * 10 FROM generate_series(1, {rows}) g")
    return table


def hits(proxy: CachingProxy) -> int:
    return proxy.totals().get("hit", 0)


async def served(proxy: CachingProxy, read: Callable[..., Awaitable[Any]], *args: Any) -> tuple[Any, bool]:
    """The answer, and whether this very call was answered from the cache."""
    before = hits(proxy)
    value = await read(*args)
    return value, hits(proxy) > before


@pytest.mark.parametrize("protocol", ["simple", "prepared"])
async def test_primary_key_update_keeps_other_keys_point_lookups(
    pg: PgServer, proxy: CachingProxy, protocol: str
) -> None:
    table = await accounts(pg)
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        if protocol == "simple":

            async def point(aid: int) -> Any:
                return (await conn.fetch(f"SELECT abalance FROM {table} WHERE aid = {aid}"))[0][0]

            async def update(aid: int, delta: int) -> None:
                await conn.execute(f"UPDATE {table} SET abalance = abalance + {delta} WHERE aid = {aid}")
        else:

            async def point(aid: int) -> Any:
                return await conn.fetchval(f"SELECT abalance FROM {table} WHERE aid = $1", aid)

            async def update(aid: int, delta: int) -> None:
                await conn.execute(f"UPDATE {table} SET abalance = abalance + $2 WHERE aid = $1", aid, delta)

        async def total() -> Any:
            return await conn.fetchval(f"SELECT sum(abalance) FROM {table}")

        async def some() -> Any:
            return await conn.fetchval(f"SELECT count(*) FROM {table} WHERE abalance > 25")

        for _ in range(2):  # stored on the first run, served from the second
            for aid in range(1, 6):
                await point(aid)
            await total()
            await some()
        for aid in range(1, 6):
            assert (await served(proxy, point, aid))[1], f"aid {aid} not cached before the write"
        assert (await served(proxy, total))[1]

        await update(2, 1000)

        for aid in (1, 3, 4, 5):
            value, hit = await served(proxy, point, aid)
            assert value == aid * 10
            assert hit, f"the point lookup of aid {aid} was evicted by an UPDATE of aid 2"
        value, hit = await served(proxy, point, 2)
        assert (value, hit) == (1020, False)
        value, hit = await served(proxy, total)
        assert (value, hit) == (550 + 1000, False)
        value, hit = await served(proxy, some)
        assert (value, hit) == (9, False)
    finally:
        await conn.close()


async def test_write_that_is_not_by_key_evicts_every_point_lookup(pg: PgServer, proxy: CachingProxy) -> None:
    table = await accounts(pg)
    conn = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:

        async def point(aid: int) -> Any:
            cur = await conn.execute(f"SELECT abalance FROM {table} WHERE aid = %s", (aid,))
            row = await cur.fetchone()
            return row[0] if row else None

        for _ in range(2):
            for aid in (1, 2, 3):
                await point(aid)
        assert (await served(proxy, point, 3))[1]
        await conn.execute(f"UPDATE {table} SET abalance = abalance + 1 WHERE aid = 1 OR aid = 3")
        for aid, expected in ((1, 11), (2, 20), (3, 31)):
            value, hit = await served(proxy, point, aid)
            assert (value, hit) == (expected, False)
    finally:
        await conn.close()


async def test_keyed_writes_in_a_transaction_evict_their_keys_at_commit(pg: PgServer, proxy: CachingProxy) -> None:
    table = await accounts(pg)
    reader = await asyncpg.connect(**proxy.dsn())
    writer = await asyncpg.connect(**proxy.dsn())
    try:

        async def point(aid: int) -> Any:
            return await reader.fetchval(f"SELECT abalance FROM {table} WHERE aid = $1", aid)

        for _ in range(2):
            for aid in (1, 2, 3):
                await point(aid)
        async with writer.transaction():
            await writer.execute(f"UPDATE {table} SET abalance = 0 WHERE aid = $1", 1)
            await writer.execute(f"DELETE FROM {table} WHERE aid = 2")
        assert await served(proxy, point, 1) == (0, False)
        assert await served(proxy, point, 2) == (None, False)
        assert await served(proxy, point, 3) == (30, True)
    finally:
        await reader.close()
        await writer.close()


async def test_insert_of_new_keys_keeps_other_keys_point_lookups(pg: PgServer, proxy: CachingProxy) -> None:
    table = await accounts(pg)
    conn = await asyncpg.connect(**proxy.dsn())
    try:

        async def point(aid: int) -> Any:
            return await conn.fetchval(f"SELECT abalance FROM {table} WHERE aid = $1", aid)

        for _ in range(2):
            for aid in (1, 2, 11):
                await point(aid)
        await conn.execute(f"INSERT INTO {table} (aid, abalance) VALUES ($1, 0), (12, 0)", 11)
        assert await served(proxy, point, 11) == (0, False)
        assert await served(proxy, point, 1) == (10, True)
        assert await served(proxy, point, 2) == (20, True)
    finally:
        await conn.close()


async def test_catalog_vouches_for_plain_and_identity_keys_not_generated_ones(pg: PgServer) -> None:
    """The lookup's 'k' row (relations.py): an identity key is a key (its value is the one
    written, or the sequence's when none is); a generated key is not (it moves when the
    columns it is computed from change, without the write naming it)."""
    plain, identity, generated = unique("kplain"), unique("kident"), unique("kgen")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {plain} (aid int PRIMARY KEY, v text)")
        await conn.execute(f"CREATE TABLE {identity} (aid int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)")
        await conn.execute(
            f"CREATE TABLE {generated} (a int NOT NULL, aid int GENERATED ALWAYS AS (a) STORED PRIMARY KEY)"
        )
        rows = await conn.fetch(LOOKUP_SQL, [plain, identity, generated], False)
    keys = {row[1]: (row[3], row[4]) for row in rows if row[0] == "k"}
    assert keys == {plain: ("true", "aid"), identity: ("true", "aid"), generated: ("true", None)}

"""Repeated keyed writes of one shape are decided from the session's memo (proxy/writes.py):
they evict what the full path would, and the memo never outlives what it rested on (the
session's identity, the relation book)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from neonpoly.cache import key_shapes, policy
from neonpoly.proxy import decisions
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, unique
from tests.proxy.test_key_precision import accounts, served


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as p:
        yield p


def write_memos(proxy: CachingProxy) -> int:
    return sum(len(getattr(s, "write_memos", {})) for s in proxy.service.server.sessions)


def count_classified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the full path classifies from now on (a write decided from a memo is not)."""
    classified: list[str] = []

    def counting(sql: str) -> policy.Classification:
        classified.append(sql)
        return policy.classify(sql)

    monkeypatch.setattr(decisions, "classify", counting)
    return classified


async def test_repeated_keyed_writes_are_decided_from_the_memo_and_evict_only_their_keys(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = await accounts(pg, rows=6)
    classified = count_classified(monkeypatch)
    reader = await asyncpg.connect(**proxy.dsn())
    writer = await asyncpg.connect(**proxy.dsn())
    try:

        async def point(aid: int) -> Any:
            return (await reader.fetch(f"SELECT abalance FROM {table} WHERE aid = {aid}"))[0][0]

        expected = {aid: aid * 10 for aid in range(1, 7)}
        for _ in range(2):
            for aid in expected:
                await point(aid)
        for aid, delta in ((2, 7), (4, -3), (2, 100), (6, 1), (4, 5)):
            await writer.execute(f"UPDATE {table} SET abalance = abalance + {delta} WHERE aid = {aid}")
            expected[aid] += delta
            for other, value in expected.items():
                assert await served(proxy, point, other) == (value, other != aid), (aid, other)
        async with writer.transaction():  # inside a transaction: evicted again at COMMIT
            await writer.execute(f"UPDATE {table} SET abalance = abalance + 1 WHERE aid = 3")
            assert await served(proxy, point, 3) == (30, False)  # evicted when sent, not yet written
        assert await served(proxy, point, 3) == (31, False)
        assert await served(proxy, point, 1) == (10, True)
        # Only the first text of each shape (`+ 7`, `+ -3`: the sign is not a number's) went
        # through the full path.
        assert len([sql for sql in classified if sql.startswith("UPDATE")]) == 2
        assert write_memos(proxy) == 2
        # The writes decided from memos are counted as the full path counts its own (their
        # template's tally, cache/query_cache.py counted_ticket): all six, with their reason.
        updates = [t for t in proxy.service.stats.snapshot().templates if t.template.startswith("UPDATE")]
        assert sum(n for t in updates for _, n in t.by_status) == 6
        assert all(t.last_reason for t in updates) and {s for t in updates for s, _ in t.by_status} == {"uncacheable"}
    finally:
        await reader.close()
        await writer.close()


async def test_a_write_memo_is_not_used_once_the_search_path_brings_the_users_operator(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `=` of the user's for integers, first on the search_path, matches every row: the
    session learns its identity again after the SET, and a memo made under the old one must
    not decide the write as confined to one key."""
    evil = unique("evil")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE SCHEMA {evil}")
        await conn.execute(f"GRANT USAGE ON SCHEMA {evil} TO PUBLIC")
        await conn.execute(
            f"CREATE FUNCTION {evil}.always(int, int) RETURNS bool IMMUTABLE LANGUAGE sql AS $$ SELECT true $$"
        )
        await conn.execute(f"CREATE OPERATOR {evil}.= (LEFTARG = int, RIGHTARG = int, FUNCTION = {evil}.always)")
    table = await accounts(pg, rows=3)
    reader = await asyncpg.connect(**proxy.dsn())
    writer = await asyncpg.connect(**proxy.dsn())
    try:

        async def point(aid: int) -> Any:
            return (await reader.fetch(f"SELECT abalance FROM {table} WHERE aid = {aid}"))[0][0]

        for _ in range(2):  # the catalog is looked up by the reads (the writes would ask too)
            await point(2)
        assert await served(proxy, point, 2) == (20, True)
        update = f"UPDATE {table} SET abalance = abalance + 1 WHERE aid = "
        await writer.execute(update + "3")
        await writer.execute(update + "3")
        assert write_memos(proxy) == 1
        assert await served(proxy, point, 2) == (20, True)
        await writer.execute(f"SET search_path = {evil}, pg_catalog, public")
        classified = count_classified(monkeypatch)
        await writer.execute(update + "1")  # every row, by the user's `=`
        assert classified == [update + "1"]  # decided by the full path
        assert await served(proxy, point, 2) == (21, False)
    finally:
        await reader.close()
        await writer.close()
        async with pg.superuser_conn() as conn:
            await conn.execute(f"DROP SCHEMA {evil} CASCADE")


async def test_a_write_memo_is_not_used_once_the_relation_book_learns_again(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trigger made on the origin behind neonpoly's back is seen once the relation book
    learns the table again (here: after its bound made it start over); from then on the
    full path evicts the whole database for that write, and so must a memo made before."""
    table = await accounts(pg, rows=3)
    audit = unique("audit")
    reader = await asyncpg.connect(**proxy.dsn())
    writer = await asyncpg.connect(**proxy.dsn())
    (cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
    try:
        async with pg.superuser_conn() as conn:
            await conn.execute(f"CREATE TABLE {audit} (id int PRIMARY KEY, n int NOT NULL)")
            await conn.execute(f"INSERT INTO {audit} VALUES (1, 0)")
        update = f"UPDATE {table} SET abalance = abalance + 1 WHERE aid = "
        await writer.execute(update + "2")
        await writer.execute(update + "2")
        assert write_memos(proxy) == 1

        async def count() -> Any:
            return await reader.fetchval(f"SELECT n FROM {audit} WHERE id = 1")

        for _ in range(2):
            await count()
        assert await served(proxy, count) == (0, True)
        async with pg.superuser_conn() as conn:
            await conn.execute(
                f"CREATE FUNCTION {audit}_f() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN UPDATE {audit} SET n = n + 1 WHERE id = 1; RETURN NEW; END $$"
            )
            await conn.execute(
                f"CREATE TRIGGER {audit}_t AFTER UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {audit}_f()"
            )
        cache.relations.max_relations = cache.relations.known_relations()  # the next lookup starts over
        other = await accounts(pg, rows=1)
        await reader.fetch(f"SELECT abalance FROM {other} WHERE aid = 1")  # a lookup: the book starts over
        assert cache.relations.key_column("app", table) is None
        classified = count_classified(monkeypatch)
        await writer.execute(update + "1")  # the trigger writes the audit row
        assert classified == [update + "1"]  # decided by the full path, which asks the catalog
        assert await served(proxy, count) == (1, False)
    finally:
        await reader.close()
        await writer.close()


async def test_a_write_of_a_shape_written_lately_is_decided_without_working_out_its_shape(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session tries the patterns of the shapes it wrote last (key_shapes.matcher) before
    `shape_of`'s scans; a memo made again after the session changed is the one found next."""
    table = await accounts(pg, rows=4)
    writer = await asyncpg.connect(**proxy.dsn())
    shaped: list[str] = []
    shape_of = key_shapes.shape_of

    def counting(sql: str) -> Any:
        shaped.append(sql)
        return shape_of(sql)

    monkeypatch.setattr(key_shapes, "shape_of", counting)
    try:
        update = f"UPDATE {table} SET abalance = abalance + {{}} WHERE aid = {{}}"
        for delta, aid in ((1, 1), (-1, 2), (2, 3), (-2, 4)):  # two shapes: `+ 1`, `+ -1`
            await writer.execute(update.format(delta, aid))
        assert write_memos(proxy) == 2
        shaped.clear()
        classified = count_classified(monkeypatch)
        for delta, aid in ((3, 1), (-3, 2), (4, 3), (-5, 4)):
            await writer.execute(update.format(delta, aid))
        assert shaped == [] and classified == []
        await writer.execute("SET application_name = 'another'")  # the session learns who it is again
        for delta, aid in ((6, 1), (7, 2), (8, 3)):
            await writer.execute(update.format(delta, aid))
        # the full path makes a memo again, which decides the next ones
        assert [sql for sql in classified if sql.startswith("UPDATE")] == [update.format(6, 1)]
        assert await writer.fetchval(f"SELECT abalance FROM {table} WHERE aid = 2") == 20 - 1 - 3 + 7
    finally:
        await writer.close()

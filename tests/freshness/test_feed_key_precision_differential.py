"""Adversarial: random writes of keys, made directly on the origin and through neonpoly, with
the change feed on; after each (once the feed passed it) every point lookup and aggregate
read through neonpoly equals a direct read, and many of them were provably cache hits (other
keys' point lookups survive a keyed bump, so a stale bucket would be served, not refetched)."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import asyncpg
import psycopg

from neonpoly.freshness.stream import parse_lsn
from tests.freshness.conftest import FeedProxy, feed_proxy, until
from tests.pgharness import PgServer

KEYS = 24
STEPS = 40
# Every key a write may leave a row under (the moved ones 40 above).
READ_KEYS = [*range(1, KEYS + 13), *range(41, KEYS + 49)]


def _writes(table: str, rng: random.Random) -> str:
    """One write of the kinds a keyed bump must get right."""
    a, b, c = rng.sample(range(1, KEYS + 8), 3)
    kind = rng.randrange(10)
    if kind == 9:
        kind = 1
    if kind == 0:
        return f"UPDATE {table} SET v = v + 1 WHERE id = {a}"
    if kind == 1:  # the key moves (and moves back, later): both keys change
        shift = 40 if rng.random() < 0.5 else -40
        return (
            f"UPDATE {table} SET id = id + {shift} WHERE id IN ({a}, {a - shift})"
            f" AND NOT EXISTS (SELECT FROM {table} x WHERE x.id = {table}.id + {shift})"
        )
    if kind == 2:
        return f"DELETE FROM {table} WHERE id = {a}"
    if kind == 3:
        return f"INSERT INTO {table} VALUES ({a}, {rng.randrange(1000)}) ON CONFLICT (id) DO UPDATE SET v = 0"
    if kind == 4:
        return f"UPDATE {table} SET v = v * 2 WHERE id IN ({a}, {b}, {c})"
    if kind == 5:
        return f"UPDATE {table} SET v = v - 1 WHERE v > {rng.randrange(500)}"  # rows found by value
    if kind == 6:
        return f"BEGIN; UPDATE {table} SET v = 7 WHERE id = {a}; DELETE FROM {table} WHERE id = {b}; COMMIT"
    if kind == 7:
        return f"UPDATE {table} SET id = -id WHERE id = {a}; UPDATE {table} SET id = -id WHERE id = -{a}"
    return f"INSERT INTO {table} SELECT g, g FROM generate_series({KEYS + 10}, {KEYS + 12}) g ON CONFLICT DO NOTHING"


async def _run(pg: PgServer, root: Path, database: str, seed: int) -> None:
    rng = random.Random(seed)
    table = f"kpd_{uuid.uuid4().hex[:8]}"
    async with feed_proxy(pg, root, database=database) as proxy:
        feed = await proxy.live()
        direct = await psycopg.AsyncConnection.connect(pg.url("postgres", database), autocommit=True)
        client = await asyncpg.connect(**proxy.dsn())
        writer = await asyncpg.connect(**proxy.dsn())
        try:
            seen = feed.ddl
            await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
            await direct.execute(f"INSERT INTO {table} SELECT g, g * 10 FROM generate_series(1, {KEYS}) g")
            await until(lambda: feed.ddl > seen, "the CREATE TABLE caught")
            hits_of_unwritten = 0
            for step in range(STEPS):
                sql = _writes(table, rng)
                if rng.random() < 0.3:
                    await writer.execute(sql)  # through neonpoly: the relay bumps, then the feed
                else:
                    await direct.execute(sql)
                await _passed(direct, proxy)
                hits_of_unwritten += await _compare(proxy, client, direct, table, step)
            # Keyed bumps leave most point lookups cached: a stale one would have been served.
            assert hits_of_unwritten > STEPS * KEYS // 4, hits_of_unwritten
            assert feed.keyed > 0
        finally:
            await client.close()
            await writer.close()
            await direct.close()


async def _passed(direct: psycopg.AsyncConnection[tuple[object, ...]], proxy: FeedProxy) -> None:
    row = await (await direct.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone()
    assert row is not None
    lsn = parse_lsn(str(row[0]))
    feed = proxy.feed()
    await until(lambda: feed.caught_up(lsn), "the feed past the write")


async def _compare(
    proxy: FeedProxy,
    client: asyncpg.Connection,
    direct: psycopg.AsyncConnection[tuple[object, ...]],
    table: str,
    step: int,
) -> int:
    """Every read through neonpoly equals the origin's answer; the number of hits."""
    hits = 0
    for key in READ_KEYS:
        before = proxy.hits()
        if key % 2:
            got = await client.fetchval(f"SELECT v FROM {table} WHERE id = $1", key)
        else:
            rows = await client.fetch(f"SELECT v FROM {table} WHERE id = {key}")
            got = rows[0][0] if rows else None
        hit = proxy.hits() > before
        hits += hit
        row = await (await direct.execute(f"SELECT v FROM {table} WHERE id = %s", (key,))).fetchone()
        want = None if row is None else row[0]
        assert got == want, f"step {step}: key {key} served {got!r} ({'hit' if hit else 'miss'}), origin has {want!r}"
    for sql in (f"SELECT count(*) FROM {table}", f"SELECT sum(v) FROM {table} WHERE id < 10"):
        got = await client.fetchval(sql)
        answer = await (await direct.execute(sql)).fetchone()
        assert answer is not None
        assert got == answer[0], f"step {step}: {sql} served {got!r}, origin has {answer[0]!r}"
    return hits


async def test_random_keyed_writes_never_leave_a_stale_read_with_test_decoding(
    pg_logical: PgServer, state_dir: Path
) -> None:
    await _run(pg_logical, state_dir, "app", seed=25)


async def test_random_keyed_writes_never_leave_a_stale_read_with_pgoutput(
    pg_logical: PgServer, state_dir: Path, pub_database: str
) -> None:
    await _run(pg_logical, state_dir, pub_database, seed=26)

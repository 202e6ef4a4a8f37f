"""The change feed bumps the primary keys a change's rows carry, not the whole table: a write
made directly on the origin (or through neonpoly) evicts the point lookups of its keys and
the table's other reads, and leaves other keys' point lookups served (cache/keys.py,
freshness/rowkeys.py). Tables that do not qualify, and anything unsure, stay whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest

from neonpoly.freshness.changefeed import ChangeFeed, FeedSettings
from neonpoly.freshness.stream import parse_lsn
from tests.freshness.conftest import FeedProxy, feed_proxy, until
from tests.pgharness import PgServer

Direct = psycopg.AsyncConnection[tuple[object, ...]]


@dataclass
class Keyed:
    """A table of (id, v) rows seen through the proxy and directly."""

    proxy: FeedProxy
    feed: ChangeFeed
    direct: Direct
    client: asyncpg.Connection
    table: str
    text_key: bool = False

    async def point(self, key: int) -> tuple[object, bool]:
        """v of one key through the proxy (a prepared point lookup), and whether it was a hit."""
        before = self.proxy.hits()
        arg: object = str(key) if self.text_key else key
        value = await self.client.fetchval(f"SELECT v FROM {self.table} WHERE id = $1", arg)
        return value, self.proxy.hits() > before

    async def count(self) -> tuple[object, bool]:
        before = self.proxy.hits()
        value = await self.client.fetchval(f"SELECT count(*) FROM {self.table}")
        return value, self.proxy.hits() > before

    async def cached(self, *keys: int) -> None:
        """Read each key (and the count) until served from the cache."""
        for key in keys:
            for _ in range(5):
                if (await self.point(key))[1]:
                    break
            else:
                raise AssertionError(f"key {key} never served from the cache")
        for _ in range(5):
            if (await self.count())[1]:
                return
        raise AssertionError("the count never served from the cache")

    async def write(self, sql: str) -> None:
        """A direct write, then wait until the feed applied it."""
        await self.direct.execute(sql)
        await self.passed()

    async def passed(self) -> None:
        row = await (await self.direct.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone()
        assert row is not None
        lsn = parse_lsn(str(row[0]))
        await until(lambda: self.feed.caught_up(lsn), "the feed past the write")



@asynccontextmanager
async def keyed_table(
    pg: PgServer,
    root: Path,
    database: str,
    ddl: str = "CREATE TABLE {t} (id int PRIMARY KEY, v int)",
    feed: FeedSettings | None = None,
    *,
    prime: bool = True,
) -> AsyncIterator[Keyed]:
    """Ten rows (id 1..10, v = id * 10) in a new table, the DDL already caught by the feed
    (so its eviction cannot come after the reads are cached), and one UPDATE already
    applied (test_decoding's first UPDATE of a table is whole: replica_identity.py)."""
    table = f"kp_{uuid.uuid4().hex[:8]}"
    async with feed_proxy(pg, root, feed, database=database) as proxy:
        live = await proxy.live()
        direct = await psycopg.AsyncConnection.connect(pg.url("postgres", database), autocommit=True)
        client = await asyncpg.connect(**proxy.dsn())
        try:
            ddl_seen = live.ddl
            await direct.execute(ddl.format(t=table))
            await direct.execute(f"INSERT INTO {table} (id, v) SELECT g, g * 10 FROM generate_series(1, 10) g")
            if live.settings.ddl_poll < 60:
                await until(lambda: live.ddl > ddl_seen, "the CREATE TABLE caught")
            keyed = Keyed(proxy, live, direct, client, table, "id text" in ddl)
            if prime:
                await keyed.write(f"UPDATE {table} SET v = v WHERE id = '10'")
            yield keyed
        finally:
            await client.close()
            await direct.close()


async def test_a_direct_update_of_one_key_keeps_other_keys_served(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    async with keyed_table(pg_logical, state_dir, decoder_database[1]) as t:
        await t.cached(1, 2)
        keyed = t.feed.keyed
        await t.write(f"UPDATE {t.table} SET v = 11 WHERE id = 1")
        assert t.feed.keyed == keyed + 1  # the table's bump came with its key
        assert await t.point(2) == (20, True)  # another key: still served from the cache
        assert await t.point(1) == (11, False)  # its key: evicted
        assert await t.count() == (10, False)  # a read of the table's rows: evicted
        admin = await asyncpg.connect(**t.proxy.dsn("neonpoly"))
        try:
            [row] = await admin.fetch("SHOW CACHES")
        finally:
            await admin.close()
        assert row["feed_keyed"] == t.feed.keyed >= 1  # SHOW CACHES counts them


async def test_a_direct_delete_and_insert_evict_their_keys_only(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    async with keyed_table(pg_logical, state_dir, decoder_database[1]) as t:
        await t.cached(2, 3, 11)
        await t.write(f"DELETE FROM {t.table} WHERE id = 3")
        assert await t.point(2) == (20, True)
        assert await t.point(3) == (None, False)
        assert await t.count() == (9, False)
        await t.cached(2, 11)
        await t.write(f"INSERT INTO {t.table} VALUES (11, 110)")
        assert await t.point(2) == (20, True)
        assert await t.point(11) == (110, False)
        assert await t.count() == (10, False)


async def test_an_update_changing_the_key_evicts_both_keys(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    async with keyed_table(pg_logical, state_dir, decoder_database[1]) as t:
        await t.cached(4, 5, 20)
        await t.write(f"UPDATE {t.table} SET id = 20 WHERE id = 4")
        assert await t.point(5) == (50, True)
        assert await t.point(4) == (None, False)
        assert await t.point(20) == (40, False)


async def test_a_write_through_neonpoly_no_longer_evicts_other_keys(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    """The relay bumps the key it wrote; the feed reporting the same write later bumps the
    same key, no longer the whole table."""
    async with keyed_table(pg_logical, state_dir, decoder_database[1]) as t:
        await t.cached(1, 2)
        keyed = t.feed.keyed
        await t.client.execute(f"UPDATE {t.table} SET v = v + 1 WHERE id = $1", 1)
        await t.passed()
        assert t.feed.keyed == keyed + 1
        assert await t.point(2) == (20, True)
        assert await t.point(1) == (11, False)


@pytest.mark.parametrize(
    "ddl",
    [
        pytest.param(
            "CREATE TABLE {t} (id int PRIMARY KEY, v int);"
            "CREATE FUNCTION {t}_f() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;"
            "CREATE TRIGGER {t}_g BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_f()",
            id="trigger",
        ),
        pytest.param("CREATE TABLE {t} (id int, v int, w int DEFAULT 0, PRIMARY KEY (id, w))", id="composite key"),
        pytest.param("CREATE TABLE {t} (id text PRIMARY KEY, v int)", id="text key"),
        pytest.param("CREATE TABLE {t} (id int, v int)", id="no key"),
    ],
)
async def test_a_table_that_does_not_qualify_is_evicted_whole(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str], ddl: str
) -> None:
    if "PRIMARY KEY" not in ddl and decoder_database[0] == "pgoutput":
        pytest.skip("the publication refuses UPDATE of a table without a replica identity")
    async with keyed_table(pg_logical, state_dir, decoder_database[1], ddl) as t:
        await t.cached(2)
        await t.write(f"UPDATE {t.table} SET v = 11 WHERE id = '1'")
        assert await t.point(2) == (20, False)
        assert await t.point(1) == (11, False)


async def test_replica_identity_nothing_makes_updates_whole(pg_logical: PgServer, state_dir: Path) -> None:
    """test_decoding prints no old key for any UPDATE of such a table: a changed key would
    go unseen, so the proof of the identity fails and the table is bumped whole."""
    ddl = "CREATE TABLE {t} (id int PRIMARY KEY, v int); ALTER TABLE {t} REPLICA IDENTITY NOTHING"
    async with keyed_table(pg_logical, state_dir, "app", ddl) as t:
        await t.cached(2, 3, 30)
        await t.write(f"UPDATE {t.table} SET id = 30 WHERE id = 3")
        assert await t.point(2) == (20, False)
        assert await t.point(3) == (None, False)
        assert await t.point(30) == (30, False)


async def test_a_ddl_the_feed_has_not_caught_yet_cannot_keep_a_key_precise(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    """The primary key moves to another column and the old key column changes in the next
    UPDATE, while the DDL is still uncaught (a catalog check an hour away): the stream
    (pgoutput's relation flags) or the replica identity proof (test_decoding) sees the key
    is no longer the one point reads are keyed on, and the table is bumped whole."""
    feed = FeedSettings(mode="on", ddl_poll=3600)
    ddl = "CREATE TABLE {t} (id int PRIMARY KEY, v int, k int NOT NULL DEFAULT 0)"
    async with keyed_table(pg_logical, state_dir, decoder_database[1], ddl, feed) as t:
        await t.direct.execute(f"UPDATE {t.table} SET k = id")
        await t.passed()
        await t.cached(5, 6, 90)
        ddl_seen = t.feed.ddl
        await t.direct.execute(
            f"ALTER TABLE {t.table} DROP CONSTRAINT {t.table}_pkey; ALTER TABLE {t.table} ADD PRIMARY KEY (k)"
        )
        await t.write(f"UPDATE {t.table} SET id = 90 WHERE k = 5")
        assert t.feed.ddl == ddl_seen  # the DDL itself is still unseen
        assert await t.point(5) == (None, False)
        assert await t.point(90) == (50, False)
        assert await t.point(6) == (60, False)


async def test_an_identity_changed_and_changed_back_around_a_key_change_is_whole(
    pg_logical: PgServer, state_dir: Path
) -> None:
    """REPLICA IDENTITY NOTHING, a key-changing UPDATE (logged without its old key), and
    DEFAULT again, in one transaction: a catalog read after it sees the identity it had
    before, but not the same pg_class row, so the proof fails (replica_identity.py). (With
    the publication, PostgreSQL refuses such an UPDATE.)"""
    feed = FeedSettings(mode="on", ddl_poll=3600)
    async with keyed_table(pg_logical, state_dir, "app", feed=feed) as t:
        await t.cached(5, 6, 90)
        await t.write(
            f"ALTER TABLE {t.table} REPLICA IDENTITY NOTHING; UPDATE {t.table} SET id = 90 WHERE id = 5;"
            f"ALTER TABLE {t.table} REPLICA IDENTITY DEFAULT"
        )
        assert await t.point(5) == (None, False)
        assert await t.point(90) == (50, False)


async def test_a_trigger_added_directly_cannot_hide_the_rows_it_writes(
    pg_logical: PgServer, state_dir: Path, decoder_database: tuple[str, str]
) -> None:
    """A trigger created directly (its DDL uncaught for an hour) makes an UPDATE of key 1
    also change key 2: the stream carries that row too, so key 2's point lookup is evicted,
    whatever the relay's catalog still says about triggers."""
    feed = FeedSettings(mode="on", ddl_poll=3600)
    async with keyed_table(pg_logical, state_dir, decoder_database[1], feed=feed) as t:
        await t.cached(1, 2, 3)
        await t.direct.execute(
            f"CREATE FUNCTION {t.table}_f() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
            f"IF NEW.id = 1 THEN UPDATE {t.table} SET v = v + 1 WHERE id = 2; END IF; RETURN NEW; END$$;"
            f"CREATE TRIGGER {t.table}_g AFTER UPDATE ON {t.table} FOR EACH ROW EXECUTE FUNCTION {t.table}_f()"
        )
        await t.write(f"UPDATE {t.table} SET v = 11 WHERE id = 1")
        assert await t.point(2) == (21, False)
        assert await t.point(1) == (11, False)
        three = await t.point(3)
        assert three[0] == 30
        if decoder_database[0] == "pgoutput":
            assert three[1]  # both rows came with their keys: key 3 stays cached

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
    pg: PgServer, root: Path, *, database: str = "app", ddl: str = "poll", publication: str | None = None,
    create: str = "",
) -> AsyncIterator[tuple[FeedProxy, ChangeFeed, Conn, asyncpg.Connection]]:
    """A feed proxy on `database` (made first with `create` options, with `publication` if
    given: pgoutput), its live feed, a direct superuser connection and a client through
    neonpoly."""
    if database != "app":
        async with await psycopg.AsyncConnection.connect(pg.url("postgres", "postgres"), autocommit=True) as c:
            await c.execute(f'CREATE DATABASE "{database}" {create}')
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


@asynccontextmanager
async def _reparsing(proxy: FeedProxy) -> AsyncIterator[asyncpg.Connection]:
    """A client through neonpoly that parses every statement again: a prepared statement
    keeps its plan, with immutable calls (to_tsvector) folded when it was planned, whatever
    the catalog says later (PostgreSQL's own behaviour, not the cache's)."""
    client = await asyncpg.connect(**proxy.dsn(), statement_cache_size=0)
    try:
        yield client
    finally:
        await client.close()


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


async def test_text_search_configuration_altered_directly(origin: PgServer, tmp_path: Path) -> None:
    """to_tsvector('config', …) is trusted; the configuration is looked up by name at run
    time. ALTER TEXT SEARCH CONFIGURATION … ALTER MAPPING changes only pg_ts_config_map,
    which the poll did not fingerprint: the old lexemes were served."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, _prepared), _reparsing(proxy) as client:
        config = _name("adv_fts")
        await direct.execute(f"CREATE TEXT SEARCH CONFIGURATION public.{config} (COPY = pg_catalog.simple)")
        await _catalog_passed(feed, direct)
        sql = f"SELECT to_tsvector('public.{config}', 'The cats')::text"
        assert await _cached(proxy, client, sql) == [("'cats':2 'the':1",)]
        await direct.execute(f"ALTER TEXT SEARCH CONFIGURATION public.{config} "
                             "ALTER MAPPING FOR asciiword WITH english_stem")
        await _catalog_passed(feed, direct)
        await _fresh(client, direct, sql, "ALTER TEXT SEARCH CONFIGURATION made directly")


async def test_collation_recreated_directly(origin: PgServer, tmp_path: Path) -> None:
    """ORDER BY … COLLATE "a user's collation": dropped and created again with another
    definition, directly. Only pg_collation changes."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, _prepared), _reparsing(proxy) as client:
        coll = _name("adv_coll")
        await direct.execute(f"CREATE COLLATION public.{coll} (provider = icu, locale = 'und-u-kf-upper')")
        await _catalog_passed(feed, direct)
        sql = f"SELECT x FROM (VALUES ('a'), ('A')) v(x) ORDER BY x COLLATE public.{coll}"
        first = await _cached(proxy, client, sql)
        await direct.execute(f"DROP COLLATION public.{coll}")
        await direct.execute(f"CREATE COLLATION public.{coll} (provider = icu, locale = 'und-u-kf-lower')")
        await _catalog_passed(feed, direct)
        await _fresh(client, direct, sql, f"a collation made again directly (first answer {first!r})")


async def test_enum_value_renamed_directly(origin: PgServer, tmp_path: Path) -> None:
    """ALTER TYPE … RENAME VALUE changes how every stored row prints, and only pg_enum."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        mood, table = _name("adv_mood"), _name("adv_moods")
        await direct.execute(f"CREATE TYPE {mood} AS ENUM ('sad', 'ok')")
        await direct.execute(f"CREATE TABLE {table} (m {mood})")
        await direct.execute(f"INSERT INTO {table} VALUES ('sad')")
        await _catalog_passed(feed, direct)
        sql = f"SELECT m::text FROM {table}"
        assert await _cached(proxy, client, sql) == [("sad",)]
        await direct.execute(f"ALTER TYPE {mood} RENAME VALUE 'sad' TO 'happy'")
        await _catalog_passed(feed, direct)
        await _fresh(client, direct, sql, "ALTER TYPE ... RENAME VALUE made directly")


async def test_vacuum_full_made_directly_with_the_event_trigger(origin: PgServer, tmp_path: Path) -> None:
    """VACUUM FULL moves every row (ctid), writes nothing to the stream and fires no event
    trigger: only the pg_class row changes (a new file). In event-trigger mode the catalog
    check was off, so a cached `SELECT ctid` stayed. The check now runs in both modes."""
    async with _world(origin, tmp_path, ddl="install") as (proxy, feed, direct, client):
        assert feed.ddl_mode == "stream"
        table = _name("adv_vf")
        await direct.execute(f"CREATE TABLE {table} (id int)")
        await direct.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
        await direct.execute(f"DELETE FROM {table} WHERE id = 1")
        await _catalog_passed(feed, direct)
        sql = f"SELECT ctid::text, id FROM {table} ORDER BY id"
        assert await _cached(proxy, client, sql) == [("(0,2)", 2), ("(0,3)", 3)]
        await direct.execute(f"VACUUM FULL {table}")
        await _catalog_passed(feed, direct)
        await _fresh(client, direct, sql, "VACUUM FULL made directly (event trigger mode)")


# --- rows the stream names otherwise ------------------------------------------------------


async def test_publication_via_partition_root_names_the_parent(origin: PgServer, tmp_path: Path) -> None:
    """A user's `FOR ALL TABLES WITH (publish_via_partition_root)` publication makes pgoutput
    report a partition's rows under the root's name. A read of the partition itself is tagged
    with the partition (and its own children), not with its parent: bumping the parent left
    it stale. Such a publication is now read as not covering everything: test_decoding."""
    async with _world(origin, tmp_path, database=_name("viaroot"),
                      publication="WITH (publish_via_partition_root = true)") as (proxy, feed, direct, client):
        assert feed.decoder == "test_decoding"
        parent = _name("adv_root")
        await direct.execute(f"CREATE TABLE {parent} (id int, v int) PARTITION BY RANGE (id)")
        await direct.execute(f"CREATE TABLE {parent}_a PARTITION OF {parent} FOR VALUES FROM (0) TO (100)")
        await direct.execute(f"INSERT INTO {parent} VALUES (1, 1)")
        await _catalog_passed(feed, direct)
        sql = f"SELECT count(*), sum(v) FROM {parent}_a"
        assert await _cached(proxy, client, sql) == [(1, 1)]
        await direct.execute(f"INSERT INTO {parent}_a VALUES (2, 2)")
        await _rows_passed(feed, direct)
        await _fresh(client, direct, sql, "a row written directly to a partition, published via its root")


async def _refresh_concurrently(proxy: FeedProxy, feed: ChangeFeed, direct: Conn, client: asyncpg.Connection) -> None:
    base, view = _name("adv_mvbase"), _name("adv_mv")
    await direct.execute(f"CREATE TABLE {base} (id int PRIMARY KEY, v int)")
    await direct.execute(f"INSERT INTO {base} VALUES (1, 1)")
    await direct.execute(f"CREATE MATERIALIZED VIEW {view} AS SELECT id, v FROM {base}")
    await direct.execute(f"CREATE UNIQUE INDEX ON {view} (id)")
    await _catalog_passed(feed, direct)
    # The base table changes first (the feed bumps it, and the view's reads depend on it),
    # then the view is read and cached as it still is: not refreshed.
    await direct.execute(f"UPDATE {base} SET v = 2")
    await _rows_passed(feed, direct)
    sql = f"SELECT v FROM {view}"
    assert await _cached(proxy, client, sql) == [(1,)]
    await direct.execute(f"REFRESH MATERIALIZED VIEW CONCURRENTLY {view}")
    await _catalog_passed(feed, direct)
    await _fresh(client, direct, sql, "REFRESH MATERIALIZED VIEW CONCURRENTLY made directly")


async def test_refresh_concurrently_with_test_decoding(origin: PgServer, tmp_path: Path) -> None:
    """test_decoding streams the rows a concurrent refresh writes into the view."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        assert feed.decoder == "test_decoding"
        await _refresh_concurrently(proxy, feed, direct, client)


async def test_refresh_concurrently_with_pgoutput(origin: PgServer, tmp_path: Path) -> None:
    """pgoutput never publishes a materialized view's rows, and REFRESH ... CONCURRENTLY
    changes no catalog row the poll fingerprints: the view's cached reads stayed stale."""
    async with _world(origin, tmp_path, database=_name("mvpub"), publication="") as (proxy, feed, direct, client):
        assert feed.decoder == "pgoutput"
        await _refresh_concurrently(proxy, feed, direct, client)


async def test_plain_refresh_with_pgoutput(origin: PgServer, tmp_path: Path) -> None:
    """A plain REFRESH swaps the view's file: its pg_class row changes (poll)."""
    async with _world(origin, tmp_path, database=_name("mvpub"), publication="") as (proxy, feed, direct, client):
        base, view = _name("adv_mvbase"), _name("adv_mv")
        await direct.execute(f"CREATE TABLE {base} (id int PRIMARY KEY, v int)")
        await direct.execute(f"INSERT INTO {base} VALUES (1, 1)")
        await direct.execute(f"CREATE MATERIALIZED VIEW {view} AS SELECT id, v FROM {base}")
        await direct.execute(f"UPDATE {base} SET v = 2")
        await _catalog_passed(feed, direct)
        sql = f"SELECT v FROM {view}"
        assert await _cached(proxy, client, sql) == [(1,)]
        await direct.execute(f"REFRESH MATERIALIZED VIEW {view}")
        await _catalog_passed(feed, direct)
        await _fresh(client, direct, sql, "REFRESH MATERIALIZED VIEW made directly")


# --- transactions made directly -----------------------------------------------------------


async def test_two_phase_commit_made_directly(origin: PgServer, tmp_path: Path) -> None:
    """PREPARE TRANSACTION, a read cached while it is prepared (old rows), COMMIT PREPARED
    from another connection: the rows arrive in the stream at COMMIT PREPARED."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        table = _name("adv_2pc")
        await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
        await _catalog_passed(feed, direct)
        gid = _name("gid")
        await direct.execute("BEGIN")
        await direct.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
        await direct.execute(f"PREPARE TRANSACTION '{gid}'")
        await _rows_passed(feed, direct)
        sql = f"SELECT v FROM {table} WHERE id = 1"
        assert await _cached(proxy, client, sql) == [(0,)]
        async with await psycopg.AsyncConnection.connect(origin.url("postgres", "app"), autocommit=True) as other:
            await other.execute(f"COMMIT PREPARED '{gid}'")
        await _rows_passed(feed, direct)
        await _fresh(client, direct, sql, "COMMIT PREPARED made directly")


async def test_savepoints_rolled_back_and_a_big_transaction(origin: PgServer, tmp_path: Path) -> None:
    """One transaction: a write to A rolled back to a savepoint, 20,000 rows into B (spilled
    to disk: logical_decoding_work_mem is 64kB), then one row of C. The feed skips B's rows
    undecoded after the first: C must still be seen; A, rolled back, changed nothing."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        a, b, c = _name("adv_a"), _name("adv_b"), _name("adv_c")
        for t in (a, b, c):
            await direct.execute(f"CREATE TABLE {t} (id int, v int)")
            await direct.execute(f"INSERT INTO {t} VALUES (0, 0)")
        await _catalog_passed(feed, direct)
        reads = [f"SELECT count(*), sum(v) FROM {t}" for t in (a, b, c)]
        for sql in reads:
            assert await _cached(proxy, client, sql) == [(1, 0)]
        async with direct.transaction():
            await direct.execute("SAVEPOINT s")
            await direct.execute(f"UPDATE {a} SET v = 9")
            await direct.execute("ROLLBACK TO SAVEPOINT s")
            await direct.execute(f"INSERT INTO {b} SELECT g, 1 FROM generate_series(1, 20000) g")
            async with direct.transaction():  # a released subtransaction
                await direct.execute(f"UPDATE {c} SET v = 7")
        await _rows_passed(feed, direct)
        for sql in reads:
            await _fresh(client, direct, sql, "a big transaction with savepoints made directly")


async def test_truncate_cascade_made_directly(origin: PgServer, tmp_path: Path) -> None:
    """TRUNCATE ... CASCADE names one table and empties those referencing it too."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        parent, child = _name("adv_tp"), _name("adv_tc")
        await direct.execute(f"CREATE TABLE {parent} (id int PRIMARY KEY)")
        await direct.execute(f"CREATE TABLE {child} (id int, p int REFERENCES {parent})")
        await direct.execute(f"INSERT INTO {parent} VALUES (1)")
        await direct.execute(f"INSERT INTO {child} VALUES (1, 1)")
        await _catalog_passed(feed, direct)
        sql = f"SELECT count(*) FROM {child}"
        assert await _cached(proxy, client, sql) == [(1,)]
        await direct.execute(f"TRUNCATE {parent} CASCADE")
        await _rows_passed(feed, direct)
        await _fresh(client, direct, sql, "TRUNCATE CASCADE made directly")


async def test_partitions_written_directly(origin: PgServer, tmp_path: Path) -> None:
    """test_decoding names the leaf: a read of the parent (tagged with its partitions) and of
    a sub-partition's parent both see a write to the leaf, made through the top parent."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        top = _name("adv_top")
        await direct.execute(f"CREATE TABLE {top} (id int, v int) PARTITION BY RANGE (id)")
        await direct.execute(f"CREATE TABLE {top}_m PARTITION OF {top} FOR VALUES FROM (0) TO (100) "
                             "PARTITION BY RANGE (id)")
        await direct.execute(f"CREATE TABLE {top}_l PARTITION OF {top}_m FOR VALUES FROM (0) TO (50)")
        await direct.execute(f"INSERT INTO {top} VALUES (1, 1)")
        await _catalog_passed(feed, direct)
        reads = [f"SELECT count(*) FROM {t}" for t in (top, f"{top}_m", f"{top}_l")]
        for sql in reads:
            assert await _cached(proxy, client, sql) == [(1,)]
        await direct.execute(f"INSERT INTO {top} VALUES (2, 2)")
        await _rows_passed(feed, direct)
        for sql in reads:
            await _fresh(client, direct, sql, "a row written directly through the top parent")


# --- session identity changed by the server's configuration --------------------------------


async def test_configuration_reload_changes_an_open_sessions_search_path(origin: PgServer, tmp_path: Path) -> None:
    """ALTER SYSTEM SET search_path + pg_reload_conf(), made directly: every open session
    that did not SET search_path itself now resolves `t` in another schema. search_path is
    not reported by ParameterStatus (PostgreSQL 15), so the session's identity (learned
    once) still said the old path and the old schema's rows were served."""
    async with _world(origin, tmp_path) as (proxy, feed, direct, client):
        schema, table = _name("adv_cfg"), _name("adv_cfgt")
        await direct.execute(f"CREATE SCHEMA {schema}")
        await direct.execute(f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC")
        for where in ("public", schema):
            await direct.execute(f"CREATE TABLE {where}.{table} (v text)")
            await direct.execute(f"INSERT INTO {where}.{table} VALUES ('{where}')")
        await _catalog_passed(feed, direct)
        sql = f"SELECT v FROM {table}"
        assert await _cached(proxy, client, sql) == [("public",)]
        try:
            await direct.execute(f"ALTER SYSTEM SET search_path = {schema}, public")
            await direct.execute("SELECT pg_reload_conf()")
            # Each backend applies a reload before its next command: wait until both have.
            want = f"{schema}, public"
            await _until_shown(direct, want)
            for _ in range(100):
                if await client.fetchval("SHOW search_path") == want:
                    break
            # The poll's own backend applies the reload after its next command: two checks.
            await _catalog_passed(feed, direct)
            await _catalog_passed(feed, direct)
            await _fresh(client, direct, sql, "a configuration reload changed search_path")
        finally:
            await direct.execute("ALTER SYSTEM RESET search_path")
            await direct.execute("SELECT pg_reload_conf()")
            await _until_shown(direct, '"$user", public')


async def _until_shown(direct: Conn, want: str) -> None:
    for _ in range(200):
        row = await (await direct.execute("SHOW search_path")).fetchone()
        if row is not None and row[0] == want:
            return
        await direct.execute("SELECT pg_sleep(0.01)")
    raise AssertionError(f"search_path never became {want!r}")


# --- names in the stream -------------------------------------------------------------------


@pytest.mark.parametrize("publication", [None, ""], ids=["test_decoding", "pgoutput"])
async def test_non_ascii_table_name_in_a_latin1_database(
    origin: PgServer, tmp_path: Path, publication: str | None
) -> None:
    """Plugins print relation names in the database's encoding. In a LATIN1 database the
    stream says `caf\\xe9`; read as UTF-8 that is not `café`, the name the cache tagged
    (the client's session converts names to its UTF-8): the write bumped nothing."""
    latin1 = "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    async with _world(origin, tmp_path, database=_name("latin1"), publication=publication,
                      create=latin1) as (proxy, feed, direct, client):
        assert feed.decoder == ("test_decoding" if publication is None else "pgoutput")
        table = '"café_é"'
        await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        await direct.execute(f"INSERT INTO {table} VALUES (1, 1)")
        await _catalog_passed(feed, direct)
        sql = f"SELECT v FROM {table}"
        assert await _cached(proxy, client, sql) == [(1,)]
        await direct.execute(f"UPDATE {table} SET v = 2")
        await _rows_passed(feed, direct)
        await _fresh(client, direct, sql, "a row written directly to a table with a non-ASCII name (LATIN1)")


async def test_ddl_in_a_replica_role_session_with_the_event_trigger(origin: PgServer, tmp_path: Path) -> None:
    """Event triggers enabled the default way do not fire in a session with
    session_replication_role = replica (replication tools and restores set it): an ALTER
    TABLE made there never reached the stream. The trigger is now ENABLE ALWAYS."""
    async with _world(origin, tmp_path, ddl="install") as (proxy, feed, direct, client):
        assert feed.ddl_mode == "stream"
        table = _name("adv_replica")
        await direct.execute(f"CREATE TABLE {table} (id int)")
        await direct.execute(f"INSERT INTO {table} VALUES (1)")
        await _rows_passed(feed, direct)
        sql = f"SELECT * FROM {table}"
        assert await _cached(proxy, client, sql) == [(1,)]
        await direct.execute("SET session_replication_role = replica")
        try:
            await direct.execute(f"ALTER TABLE {table} ADD COLUMN w int DEFAULT 7")
        finally:
            await direct.execute("RESET session_replication_role")
        await _rows_passed(feed, direct)
        await _fresh(client, direct, sql, "ALTER TABLE in a replica-role session (event trigger mode)")

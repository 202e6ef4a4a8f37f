"""Review findings: each test shows one way the caching proxy served stale or foreign data, or
lost track of the protocol stream (real PostgreSQL, real clients or raw protocol frames)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psycopg
import pytest

from neonpoly import pgwire
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, unique


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as p:
        yield p


async def one_row_table(pg: PgServer, value: str = "0") -> str:
    table = unique("rf")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, '{value}')")
        await conn.execute(f"GRANT ALL ON {table} TO trust_user")
    return table


# --- raw protocol client ---------------------------------------------------------------


def _parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = pgwire.cstr(name) + pgwire.cstr(sql) + struct.pack("!h", len(types))
    body += b"".join(struct.pack("!i", t) for t in types)
    return pgwire.frame(b"P", body)


def _bind(portal: str, statement: str, params: tuple[str, ...] = ()) -> bytes:
    body = pgwire.cstr(portal) + pgwire.cstr(statement) + struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        raw = p.encode()
        body += struct.pack("!i", len(raw)) + raw
    body += struct.pack("!h", 0)
    return pgwire.frame(b"B", body)


def _describe(kind: bytes, name: str) -> bytes:
    return pgwire.frame(b"D", kind + pgwire.cstr(name))


def _execute(portal: str = "", rows: int = 0) -> bytes:
    return pgwire.frame(b"E", pgwire.cstr(portal) + struct.pack("!i", rows))


SYNC = pgwire.frame(b"S")
FLUSH = pgwire.frame(b"H")


def _query(sql: str) -> bytes:
    return pgwire.frame(b"Q", pgwire.cstr(sql))


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, user: str = "trust_user") -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        writer.write(pgwire.build_startup({"user": user, "database": "app"}))
        msgs = await raw.until_ready()
        assert not [m for m in msgs if m[0] == b"E"], msgs
        return raw

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def message(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(5), timeout)
        body = await asyncio.wait_for(self.reader.readexactly(struct.unpack("!i", head[1:])[0] - 4), timeout)
        return head[:1], body

    async def until_ready(self, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = await self.message(timeout)
            out.append(msg)
            if msg[0] == b"Z":
                return out

    async def messages(self, count: int, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        return [await self.message(timeout) for _ in range(count)]

    async def close(self) -> None:
        self.writer.write(pgwire.frame(b"X"))
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _rows(msgs: list[tuple[bytes, bytes]]) -> list[list[bytes | None]]:
    return [pgwire.parse_data_row(body) for t, body in msgs if t == b"D"]


def _types(msgs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(t for t, _ in msgs)


# --- findings ----------------------------------------------------------------------------


async def test_update_through_view_evicts_base_table_reads(pg: PgServer, proxy: CachingProxy) -> None:
    """An auto-updatable view writes its base table; reads of the base table must not stay
    cached. The relation lookup widened writes only along foreign keys and inheritance."""
    table = await one_row_table(pg)
    view = unique("rfv")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE VIEW {view} AS SELECT * FROM {table}")
    conn = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        read = f"SELECT v FROM {table} WHERE id = 1"
        # Teach the proxy both relations (the lookup), then warm the cache.
        await conn.execute(f"SELECT v FROM {view} WHERE id = 1")
        await conn.execute(f"UPDATE {view} SET v = '0' WHERE id = 1")
        for _ in range(3):
            assert (await (await conn.execute(read)).fetchone()) == ("0",)
        await conn.execute(f"UPDATE {view} SET v = '1' WHERE id = 1")
        assert (await (await conn.execute(read)).fetchone()) == ("1",)
    finally:
        await conn.close()


async def test_function_that_sets_role_does_not_poison_the_cache(pg: PgServer, proxy: CachingProxy) -> None:
    """A user-defined function can SET ROLE (or search_path) in the session; what the session
    reads afterwards must not be stored under the key of the role it logged in with."""
    fn = unique("become")
    async with pg.superuser_conn() as conn:
        await conn.execute(
            f"CREATE FUNCTION {fn}() RETURNS int LANGUAGE plpgsql AS "
            "$$ BEGIN EXECUTE 'SET ROLE trust_user'; RETURN 1; END $$"
        )
    probe = f"SELECT current_user AS {fn}"
    a = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        await a.execute(f"SELECT {fn}()")
        for _ in range(3):
            assert (await (await a.execute(probe)).fetchone()) == ("trust_user",)
    finally:
        await a.close()
    b = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        assert (await (await b.execute(probe)).fetchone()) == ("postgres",)
    finally:
        await b.close()


async def test_do_block_that_sets_search_path_does_not_poison_the_cache(pg: PgServer, proxy: CachingProxy) -> None:
    schema = unique("rfs")
    table = unique("rft")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"CREATE TABLE public.{table} (v text)")
        await conn.execute(f"INSERT INTO public.{table} VALUES ('public')")
        await conn.execute(f"CREATE TABLE {schema}.{table} (v text)")
        await conn.execute(f"INSERT INTO {schema}.{table} VALUES ('{schema}')")
    read = f"SELECT v FROM {table}"
    a = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        await a.execute(f"DO $$ BEGIN PERFORM set_config('search_path', '{schema}', false); END $$")
        for _ in range(3):
            assert (await (await a.execute(read)).fetchone()) == (schema,)
    finally:
        await a.close()
    b = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        assert (await (await b.execute(read)).fetchone()) == ("public",)
    finally:
        await b.close()


async def test_set_config_behind_another_volatile_call_bypasses(pg: PgServer, proxy: CachingProxy) -> None:
    """Only the first volatility reason was kept, so set_config after random() went unseen."""
    schema = unique("rfs")
    table = unique("rft")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"CREATE TABLE public.{table} (v text)")
        await conn.execute(f"INSERT INTO public.{table} VALUES ('public')")
        await conn.execute(f"CREATE TABLE {schema}.{table} (v text)")
        await conn.execute(f"INSERT INTO {schema}.{table} VALUES ('{schema}')")
    read = f"SELECT v FROM {table}"
    a = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        await a.execute(f"SELECT random(), set_config('search_path', '{schema}', false)")
        for _ in range(3):
            assert (await (await a.execute(read)).fetchone()) == (schema,)
    finally:
        await a.close()
    b = await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True)
    try:
        assert (await (await b.execute(read)).fetchone()) == ("public",)
    finally:
        await b.close()


async def test_pipelined_set_in_rolled_back_transaction(pg: PgServer, proxy: CachingProxy) -> None:
    """BEGIN; SET search_path; ROLLBACK pipelined: the SET is undone by the ROLLBACK, so the
    key must not say it happened."""
    schema = unique("rfs")
    table = unique("rft")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO trust_user")
        for where in ("public", schema):
            await conn.execute(f"CREATE TABLE {where}.{table} (v text)")
            await conn.execute(f"INSERT INTO {where}.{table} VALUES ('{where}')")
            await conn.execute(f"GRANT SELECT ON {where}.{table} TO trust_user")
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(_query("BEGIN"), _query(f"SET search_path TO {schema}"), _query("ROLLBACK"))
        for _ in range(3):
            await raw.until_ready()
        for _ in range(3):
            raw.send(_query(f"SELECT v FROM {table}"))
            assert _rows(await raw.until_ready()) == [[b"public"]]
    finally:
        await raw.close()
    other = await Raw.connect(proxy.port)
    try:
        other.send(_query(f"SET search_path TO {schema}"))
        await other.until_ready()
        other.send(_query(f"SELECT v FROM {table}"))
        assert _rows(await other.until_ready()) == [[schema.encode()]]
    finally:
        await other.close()


async def test_hit_behind_a_failed_flush_batch_does_not_hang(pg: PgServer, proxy: CachingProxy) -> None:
    """After an error in a Flush-ended batch the origin skips to the next Sync. A batch the
    cache could answer must still reach the origin, or its Sync never does."""
    table = await one_row_table(pg)
    cached = (
        _parse("", f"SELECT v FROM {table} WHERE id = 1"),
        _bind("", ""),
        _describe(b"P", ""),
        _execute(),
        SYNC,
    )
    raw = await Raw.connect(proxy.port)
    try:
        for _ in range(3):  # lookup, store, hit
            raw.send(*cached)
            assert _rows(await raw.until_ready()) == [[b"0"]]
        # A Bind that fails (bad integer), ended by Flush: ParseComplete, ErrorResponse.
        raw.send(_parse("bad", f"SELECT v FROM {table} WHERE id = $1", (23,)), _bind("", "bad", ("x",)), FLUSH)
        assert _types(await raw.messages(2)) == b"1E"
        # The client recovers with Sync; PostgreSQL skips the cached batch's messages.
        raw.send(*cached)
        msgs = await raw.until_ready()
        assert _types(msgs) == b"Z"
        raw.send(_query("SELECT 1"))
        assert _rows(await raw.until_ready()) == [[b"1"]]
    finally:
        await raw.close()


async def test_flush_batch_with_bind_is_not_answered_locally(pg: PgServer, proxy: CachingProxy) -> None:
    """Parse/Bind/Describe + Flush, then Execute + Sync (describe before fetching). A local
    answer to the first part leaves the origin without the portal the Execute needs."""
    table = await one_row_table(pg)
    for _ in range(3):
        raw = await Raw.connect(proxy.port)
        try:
            raw.send(
                _parse("s", f"SELECT v FROM {table} WHERE id = 1"), _bind("", "s"), _describe(b"S", "s"), FLUSH
            )
            assert _types(await raw.messages(4)) == b"12tT"
            raw.send(_execute(), SYNC)
            msgs = await raw.until_ready()
            assert _types(msgs) == b"DCZ", msgs
        finally:
            await raw.close()


async def test_asyncpg_still_hits_after_fixes(pg: PgServer, proxy: CachingProxy) -> None:
    table = await one_row_table(pg)
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(4):
            assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = 1") == "0"
    finally:
        await conn.close()
    assert proxy.totals().get("hit", 0) >= 1


async def test_relation_lookup_keeps_the_unnamed_statement(pg: PgServer, proxy: CachingProxy) -> None:
    """neonpoly's relation lookup ran as a simple Query in the client's session, and a simple
    Query drops the unnamed prepared statement the client parsed in an earlier batch."""
    table = await one_row_table(pg)
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(_parse("", f"SELECT v FROM {table} WHERE id = 1"), SYNC)
        assert _types(await raw.until_ready()) == b"1Z"
        raw.send(_bind("", ""), _execute(), SYNC)
        msgs = await raw.until_ready()
        assert _types(msgs) == b"2DCZ", msgs
    finally:
        await raw.close()


async def _two_schemas(pg: PgServer, first: str, second: str) -> str:
    """`first` and `second` (SQL spellings) each get a table of the same name holding the
    schema's spelling; returns the table name."""
    table = unique("rft")
    async with pg.superuser_conn() as conn:
        for schema in (first, second):
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(f"CREATE TABLE {schema}.{table} (v text)")
            await conn.execute(f"INSERT INTO {schema}.{table} VALUES ($1)", schema)
    return table


async def _read_three_times(url: str, setup: str, read: str) -> object:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        if setup:
            await conn.execute(setup)
        values = [(await (await conn.execute(read)).fetchone()) for _ in range(3)]
        assert len(set(values)) == 1, values
        return values[0]
    finally:
        await conn.close()


async def test_reset_returns_to_the_startup_value(pg: PgServer, proxy: CachingProxy) -> None:
    """RESET (or SET … TO DEFAULT) restores the value the session started with (`options`),
    not the server default, so the key must keep that value."""
    schema = unique("rfs")
    table = await _two_schemas(pg, "public", schema)
    read = f"SELECT v FROM {table}"
    started = proxy.url() + "&options=" + quote(f"-c search_path={schema}")
    assert await _read_three_times(started, "RESET search_path", read) == (schema,)
    assert await _read_three_times(proxy.url(), "", read) == ("public",)


async def test_reported_setting_wins_over_the_set_text(pg: PgServer, proxy: CachingProxy) -> None:
    """SET datestyle TO sql keeps the session's DMY/MDY order: the origin reports the full
    value ("SQL, DMY"), and that, not the SET's text, must be in the key."""
    table = unique("rfd")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (d date)")
        await conn.execute(f"INSERT INTO {table} VALUES ('2024-12-31')")
    read = f"SELECT d::text FROM {table}"
    dmy = proxy.url() + "&options=" + quote("-c DateStyle=ISO,DMY")
    assert await _read_three_times(dmy, "SET datestyle TO sql", read) == ("31/12/2024",)
    assert await _read_three_times(proxy.url(), "SET datestyle TO sql", read) == ("12/31/2024",)


async def test_sql_deallocate_drops_the_protocol_statement(pg: PgServer, tmp_path: Path) -> None:
    """DEALLOCATE ALL also drops asyncpg's statements at the origin: neonpoly must not
    keep answering Binds of a statement the origin no longer has, nor send stale Parses."""
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as proxy:
        conn = await asyncpg.connect(**proxy.dsn(), statement_cache_size=0)
        try:
            stmt = await conn.prepare("SELECT $1::int + 1")
            for _ in range(3):
                assert await stmt.fetchval(1) == 2
            await conn.execute("DEALLOCATE ALL")
            assert proxy.service.server.sessions
            session = next(iter(proxy.service.server.sessions))
            assert session.book.statements == {}
            again = await conn.prepare("SELECT $1::int + 1")
            assert await again.fetchval(2) == 3
        finally:
            await conn.close()


async def test_extended_protocol_copy_streams_before_sync(pg: PgServer, proxy: CachingProxy) -> None:
    """A client running COPY through Parse/Bind/Execute waits for CopyInResponse before it
    sends Sync: the batch must reach the origin at once, also when the statement was parsed
    in an earlier batch and when a comment comes first."""
    table = await one_row_table(pg)
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(_parse("cp", f"/* load */ COPY {table} (id, v) FROM STDIN"), SYNC)
        assert _types(await raw.until_ready()) == b"1Z"
        for n in (2, 3):
            raw.send(_bind("", "cp"), _execute())  # no Sync: COPY needs the origin first
            assert _types(await raw.messages(2)) == b"2G"
            raw.send(pgwire.frame(b"d", f"{n}\tcopied\n".encode()), pgwire.frame(b"c"), SYNC)
            assert _types(await raw.until_ready()) == b"CZ"
        raw.send(_query(f"SELECT count(*) FROM {table}"))
        assert _rows(await raw.until_ready()) == [[b"3"]]
    finally:
        await raw.close()

"""Class 5: extended-protocol sequences where the statement a Bind/Execute runs is not the
one its name suggests, or a batch that mixes reads and writes."""

from __future__ import annotations

import struct

import asyncpg
import psycopg

from neonpoly import pgwire
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, hits, unique
from tests.adversarial.rawpg import SYNC, Raw, bind, close_statement, execute, parse


async def _two_rows(env: Env) -> str:
    return await env.table("adv_p", "id int PRIMARY KEY, v text", "(1, 'one')", "(2, 'two')", "(3, 'three')")


async def _raw_and_direct(env: Env, *frames: bytes, runs: int = 4) -> list[list[list[bytes | None]]]:
    """Send the same batch `runs` times through neonpoly and once straight to the origin;
    every proxied answer must equal the origin's. Returns the proxied answers."""
    direct = await Raw.connect(env.pg.port)
    try:
        direct.send(*frames)
        expected = rawpg.rows(await direct.until_ready())
    finally:
        await direct.close()
    proxied = []
    raw = await Raw.connect(env.proxy.port)
    try:
        for n in range(runs):
            before = hits(env.proxy)
            raw.send(*frames)
            got = rawpg.rows(await raw.until_ready())
            hit = hits(env.proxy) > before
            assert got == expected, f"run {n + 1} (hit={hit}): proxy {got!r} != origin {expected!r}"
            proxied.append(got)
    finally:
        await raw.close()
    return proxied


async def test_statement_name_reused_within_one_batch(env: Env) -> None:
    t = await _two_rows(env)
    await _raw_and_direct(
        env,
        parse("s1", f"SELECT v FROM {t} WHERE id = 1"), bind("", "s1"), execute(), close_statement("s1"),
        parse("s1", f"SELECT v FROM {t} WHERE id = 2"), bind("", "s1"), execute(), close_statement("s1"),
        SYNC,
    )


async def test_statement_name_redefined_between_batches(env: Env) -> None:
    """The same Bind/Execute bytes run whatever s1 is at the time."""
    t = await _two_rows(env)
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(parse("s1", f"SELECT v FROM {t} WHERE id = 1"), SYNC)
        await raw.until_ready()
        for _ in range(3):
            raw.send(bind("", "s1"), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"one"]]
        raw.send(close_statement("s1"), parse("s1", f"SELECT v FROM {t} WHERE id = 2"), SYNC)
        await raw.until_ready()
        before = hits(env.proxy)
        raw.send(bind("", "s1"), execute(), SYNC)
        got = rawpg.rows(await raw.until_ready())
        assert got == [[b"two"]], f"s1 redefined, proxy answered {got!r} (hit={hits(env.proxy) > before})"
    finally:
        await raw.close()


async def test_unnamed_statement_reparsed_between_bind_and_execute(env: Env) -> None:
    """The portal keeps the statement it was bound from; a later unnamed Parse does not
    change what Execute of that portal runs."""
    t = await _two_rows(env)
    await _raw_and_direct(
        env,
        parse("", f"SELECT v FROM {t} WHERE id = 1"), bind("p", ""),
        parse("", f"SELECT v FROM {t} WHERE id = 2"), execute("p"), bind("", ""), execute(""),
        SYNC,
    )


async def test_portal_with_row_limits(env: Env) -> None:
    t = await _two_rows(env)
    await _raw_and_direct(
        env,
        parse("", f"SELECT v FROM {t} ORDER BY id"), bind("p", ""), execute("p", 1), execute("p", 1), SYNC,
    )
    await _raw_and_direct(
        env, parse("", f"SELECT v FROM {t} ORDER BY id"), bind("p", ""), execute("p", 2), SYNC
    )


async def test_write_then_read_in_one_extended_batch(env: Env) -> None:
    t = await _two_rows(env)
    read = f"SELECT v FROM {t} WHERE id = 1"
    raw = await Raw.connect(env.proxy.port)
    try:
        for _ in range(3):
            raw.send(parse("", read), bind("", ""), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"one"]]
        raw.send(
            parse("", read), bind("", ""), execute(),
            parse("", f"UPDATE {t} SET v = 'uno' WHERE id = 1"), bind("", ""), execute(),
            parse("", read), bind("", ""), execute(),
            SYNC,
        )
        assert rawpg.rows(await raw.until_ready()) == [[b"one"], [b"uno"]]
        raw.send(parse("", read), bind("", ""), execute(), SYNC)
        assert rawpg.rows(await raw.until_ready()) == [[b"uno"]]
    finally:
        await raw.close()


async def test_psycopg_pipeline_read_write_read(env: Env) -> None:
    t = await _two_rows(env)
    read = f"SELECT v FROM {t} WHERE id = 1"
    twin = await env.twin()
    await twin.probe(read)
    conn = await psycopg.AsyncConnection.connect(env.login().url("127.0.0.1", env.proxy.port), autocommit=True)
    try:
        async with conn.pipeline():
            c1 = await conn.execute(read)
            await conn.execute(f"UPDATE {t} SET v = 'uno' WHERE id = %s", (1,))
            c2 = await conn.execute(read)
        assert await c1.fetchall() == [("one",)]
        assert await c2.fetchall() == [("uno",)], "the read after the UPDATE in the same pipeline"
    finally:
        await conn.close()
    await twin.check(read, why="after a pipeline that updated the row")


async def test_asyncpg_prepared_statement_after_ddl(env: Env) -> None:
    t = await _two_rows(env)
    read = f"SELECT * FROM {t} ORDER BY id"
    twin = await env.twin(driver="asyncpg")
    await twin.probe(read)
    writer = await env.client()
    await writer.run(f"ALTER TABLE {t} ADD COLUMN w int DEFAULT 7")
    assert isinstance(twin.via.conn, asyncpg.Connection)
    await twin.check(read, why="asyncpg's cached statement after ALTER TABLE ADD COLUMN through neonpoly")
    await writer.run(f"ALTER TABLE {t} DROP COLUMN v")
    await twin.check(read, why="after ALTER TABLE DROP COLUMN through neonpoly")


async def test_same_bind_bytes_different_parameter_types(env: Env) -> None:
    """Two statements with one text and the same parameter bytes, prepared with different
    parameter types: '1' as int vs as text."""
    raw = await Raw.connect(env.proxy.port)
    try:
        sql = "SELECT pg_typeof($1)::text"

        def typed(name: str, oid: int) -> bytes:
            body = pgwire.cstr(name) + pgwire.cstr(sql) + struct.pack("!hi", 1, oid)
            return pgwire.frame(b"P", body)

        for _ in range(3):
            raw.send(typed("", 23), bind("", "", ("1",)), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"integer"]]
        raw.send(typed("", 25), bind("", "", ("1",)), execute(), SYNC)
        assert rawpg.rows(await raw.until_ready()) == [[b"text"]]
    finally:
        await raw.close()


async def test_simple_query_drops_unnamed_statement_then_rebind(env: Env) -> None:
    t = await _two_rows(env)
    name = unique("s")
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(parse(name, f"SELECT v FROM {t} WHERE id = 3"), SYNC)
        await raw.until_ready()
        for _ in range(3):
            raw.send(bind("", name), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"three"]]
        raw.send(rawpg.query(f"DEALLOCATE {name}"))
        await raw.until_ready()
        raw.send(parse(name, f"SELECT v FROM {t} WHERE id = 2"), SYNC)
        await raw.until_ready()
        raw.send(bind("", name), execute(), SYNC)
        assert rawpg.rows(await raw.until_ready()) == [[b"two"]]
    finally:
        await raw.close()

"""Hostile review of the speed work (issue 10): the hit memo's entry check and TTL re-check,
the relay's fast paths for client and origin reads, and key values read from digits.

Every case first makes the shortcut provably taken (a hit counted for the call, a memo held
by the session) and then compares the proxy's answer with a direct connection's.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import pytest

from tests.adversarial import rawpg
from tests.adversarial.harness import Env, Twin, hits, unique
from tests.adversarial.harness2 import make_known
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.workers import WorkersProxy


def memos(proxy: CachingProxy | WorkersProxy) -> int:
    """Hit memos held by the proxy's sessions (in-process only; `serve --workers` cannot be
    looked into: counted as held, the hit counter still proves the hit)."""
    if not isinstance(proxy, CachingProxy):
        return 1
    return sum(len(getattr(s, "hit_memos", {})) for s in proxy.service.server.sessions)


# --- the hit memo -----------------------------------------------------------------------


async def test_memo_repeat_after_the_entrys_ttl_ran_out(pg: PgServer, tmp_path: Path) -> None:
    """--ttl 1: the memo re-checks the entry's TTL on every repeat (the rules once a second).
    A write straight to the origin is allowed to be stale only until the TTL."""
    async with caching_proxy(pg, tmp_path / "cache", ttl=1.0) as proxy:
        env = Env(pg, proxy, contextlib.AsyncExitStack())
        async with env.stack:
            try:
                table = await env.table("adv_ttl", "id int PRIMARY KEY, v int", "(1, 1)")
                twin = await env.twin()
                read = f"SELECT v FROM {table}"
                await twin.probe(read)
                _, hit = await twin.through(read)  # a repeat: from the memo
                assert hit and memos(proxy) >= 1
                await env.admin(f"UPDATE {table} SET v = 2")  # bypasses neonpoly
                await asyncio.sleep(1.2)  # past the entry's TTL (semantics, not a timing)
                await twin.check(read, why="a memo repeat after its entry's TTL ran out")
            finally:
                await env.run_cleanups()


async def test_memo_repeat_after_search_path_moves_to_another_schema(env: Env) -> None:
    s1, s2 = unique("adv_s1"), unique("adv_s2")
    await env.admin(f"CREATE SCHEMA {s1}", f"CREATE SCHEMA {s2}",
                    f"CREATE TABLE {s1}.t (v int)", f"INSERT INTO {s1}.t VALUES (1)",
                    f"CREATE TABLE {s2}.t (v int)", f"INSERT INTO {s2}.t VALUES (2)",
                    f"GRANT USAGE ON SCHEMA {s1}, {s2} TO PUBLIC",
                    f"GRANT SELECT ON {s1}.t, {s2}.t TO PUBLIC")  # fmt: skip
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {s1} CASCADE", f"DROP SCHEMA IF EXISTS {s2} CASCADE")
    twin = await env.twin()
    await twin.both(f"SET search_path = {s1}")
    await twin.probe("SELECT v FROM t")
    assert (await twin.through("SELECT v FROM t"))[1] and memos(env.proxy) >= 1
    await twin.both(f"SET search_path = {s2}")
    await twin.check("SELECT v FROM t", why="the same bytes after search_path moved")
    await twin.probe("SELECT v FROM t", require_hit=False)


async def test_memo_repeat_inside_a_transaction_sees_its_own_write(env: Env) -> None:
    table = await env.table("adv_tx", "id int PRIMARY KEY, v int", "(1, 1)")
    twin = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await twin.probe(read)
    assert (await twin.through(read))[1]
    await twin.via.run("BEGIN")
    await twin.via.run(f"UPDATE {table} SET v = v + 10 WHERE id = 1")
    # The direct twin cannot share the open transaction: its own write is the answer.
    for _ in range(2):
        assert (await twin.through(read))[0] == [(11,)], "the memo's bytes inside a transaction after its own write"
    await twin.via.run("ROLLBACK")
    await twin.check(read, why="after ROLLBACK")


async def test_two_roles_sending_identical_bytes_see_their_own_rows(env: Env) -> None:
    table = await env.table("adv_rls", "owner text, v int", grant="PUBLIC")
    a, b = await env.role("adv_ra"), await env.role("adv_rb")
    await env.admin(f"INSERT INTO {table} VALUES ('{a}', 1), ('{b}', 2)",
                    f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
                    f"CREATE POLICY p ON {table} USING (owner = current_user)")  # fmt: skip
    read = f"SELECT v FROM {table}"
    ta, tb = await env.twin(env.login(a)), await env.twin(env.login(b))
    rows_a, _ = await ta.probe(read, require_hit=False)
    assert rows_a == [(1,)]
    for _ in range(4):  # whatever A's memo holds, B's identical bytes are B's rows
        await tb.check(read, why="another role's identical bytes")
        await ta.check(read, why="the first role again")


async def _named_statement_memoised(env: Env, raw: rawpg.Raw, table: str, runs: int) -> bytes:
    """Parse `s` over `table` (one row, 1) and run it `runs` times, until a hit is served and
    remembered: the Bind/Execute/Sync bytes the memo now answers."""
    raw.send(rawpg.parse("s", f"SELECT v FROM {table}"), rawpg.SYNC)
    await raw.until_ready()
    run = rawpg.bind("", "s") + rawpg.execute() + rawpg.SYNC
    seen = False
    for _ in range(runs):
        before = hits(env.proxy)
        raw.send(run)
        assert rawpg.rows(await raw.until_ready()) == [[b"1"]]
        seen = seen or hits(env.proxy) > before
    assert seen and memos(env.proxy) >= 1
    return run


async def test_dealloc_and_prepare_again_under_the_same_name(env: Env) -> None:
    """The Bind/Execute/Sync bytes of a named statement stay the same when the statement is
    deallocated (SQL) and parsed again with other text: the memo must not answer them."""
    t1 = await env.table("adv_p1", "v int", "(1)")
    t2 = await env.table("adv_p2", "v int", "(2)")
    raw = await rawpg.Raw.connect(env.proxy.port)
    try:
        run = await _named_statement_memoised(env, raw, t1, 6)
        for again in (rawpg.query("DEALLOCATE s") + rawpg.query(f"PREPARE s AS SELECT v FROM {t2}"),):
            raw.send(again)
            await raw.until_ready()
            await raw.until_ready()
        for _ in range(3):
            raw.send(run)
            assert rawpg.rows(await raw.until_ready()) == [[b"2"]]
        raw.send(rawpg.query("DEALLOCATE s"), rawpg.parse("s", f"SELECT v + 10 FROM {t1}"), rawpg.SYNC)
        await raw.until_ready()
        await raw.until_ready()
        for _ in range(3):
            raw.send(run)
            assert rawpg.rows(await raw.until_ready()) == [[b"11"]]
    finally:
        await raw.close()


async def test_memo_bytes_pipelined_torn_and_behind_a_flush(env: Env) -> None:
    """The memo's request pipelined twice in one read, torn across two reads, and sent
    inside an open Flush batch, each after a write through another session."""
    table = await env.table("adv_pipe", "id int PRIMARY KEY, v int", "(1, 1)")
    await make_known(env, table)
    writer = await env.client()
    raw = await rawpg.Raw.connect(env.proxy.port)
    read = rawpg.query(f"SELECT v FROM {table} WHERE id = 1")
    value = 1
    try:
        for _ in range(5):
            raw.send(read)
            assert rawpg.rows(await raw.until_ready()) == [[b"1"]]
        assert memos(env.proxy) >= 1

        async def bump() -> bytes:
            nonlocal value
            value += 1
            await writer.run(f"UPDATE {table} SET v = {value} WHERE id = 1")
            return str(value).encode()

        want = await bump()
        raw.send(read + read)
        assert rawpg.rows(await raw.until_ready()) == [[want]]
        assert rawpg.rows(await raw.until_ready()) == [[want]]
        want = await bump()
        raw.writer.write(read[:7])
        await raw.writer.drain()
        await asyncio.sleep(0.05)  # a separate read at the proxy (a torn request)
        raw.writer.write(read[7:])
        assert rawpg.rows(await raw.until_ready()) == [[want]]
        want = await bump()
        flushed = rawpg.parse("", f"SELECT v FROM {table} WHERE id = 1") + rawpg.bind("", "") + rawpg.execute()
        raw.send(flushed + pgwire_flush())
        for _ in range(3):
            await raw.message()  # ParseComplete, BindComplete, DataRow
        raw.send(read)  # the memo's bytes while the Flush batch is open
        got = await raw.until_ready()
        assert rawpg.rows(got) == [[want]]
        for _ in range(3):
            raw.send(read)
            assert rawpg.rows(await raw.until_ready()) == [[want]]
    finally:
        await raw.close()


def pgwire_flush() -> bytes:
    from neonpoly import pgwire

    return pgwire.frame(b"H")


async def test_memo_entry_evicted_by_the_size_bound_then_a_write(pg: PgServer, tmp_path: Path) -> None:
    """A memory tier that holds about one answer: the memo's entry is pushed out by another
    key's, comes back from disk, and a write through neonpoly must still end it."""
    async with caching_proxy(pg, tmp_path / "cache", l1_bytes=4096, max_entry_bytes=2048) as proxy:
        env = Env(pg, proxy, contextlib.AsyncExitStack())
        async with env.stack:
            try:
                table = await env.table(
                    "adv_evict", "id int PRIMARY KEY, v text", "(1, repeat('a', 1200))", "(2, repeat('b', 1200))"
                )
                twin = await env.twin()
                one, two = (f"SELECT v FROM {table} WHERE id = {i}" for i in (1, 2))
                await twin.probe(one)
                await twin.probe(two)  # pushes one's entry out of memory
                await twin.probe(one)
                await twin.probe(two)
                writer = await env.client()
                await writer.run(f"UPDATE {table} SET v = 'new' WHERE id = 1")
                await twin.check(one, why="after eviction by size, a write, the memo's bytes")
                await twin.probe(one, require_hit=False)
            finally:
                await env.run_cleanups()


async def test_memo_after_template_purge_and_a_write_on_the_origin(env: Env) -> None:
    table = await env.table("adv_tp", "id int PRIMARY KEY, v int", "(1, 1)")
    twin = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await twin.probe(read)
    assert (await twin.through(read))[1]
    if not isinstance(env.proxy, CachingProxy):
        pytest.skip("looks into the in-process proxy's sessions")
    (memo,) = [m for s in env.proxy.service.server.sessions for m in getattr(s, "hit_memos", {}).values()]
    await env.admin(f"UPDATE {table} SET v = 5")  # bypasses neonpoly: only a purge ends it
    memo.cache.store.purge_template(memo.template_id)
    await twin.check(read, why="a memo repeat after its template was purged")


# --- key values read from digits ------------------------------------------------------------


async def _point_reads(env: Env, table: str, ids: range) -> tuple[Twin, dict[int, str]]:
    twin = await env.twin()
    reads = {i: f"SELECT v FROM {table} WHERE id = {i}" for i in ids}
    for sql in reads.values():
        await twin.probe(sql)
    return twin, reads


async def test_keyed_writes_by_digits_evict_the_right_key(env: Env) -> None:
    """Shapes learnt from earlier texts, then a write of each form to a cached key."""
    table = await env.table("adv_kd", "id int PRIMARY KEY, v int",
                            *(f"({i}, 0)" for i in range(1, 30)))  # fmt: skip
    await make_known(env, table)
    twin, reads = await _point_reads(env, table, range(1, 13))
    writer = await env.client()
    forms = [
        "UPDATE {t} SET v = v + 1 WHERE id = {a}",
        "UPDATE {t} SET v = v + 1 WHERE id = {a} AND id = {a}",
        "UPDATE {t} SET v = v + 1 WHERE id IN ({a}, {b})",
        "UPDATE {t} SET v = v + 1 WHERE id = 007 + 0 * {a} OR id = {b}",
        "UPDATE {t} SET v = v + 1 WHERE id = - -{a}",
        "UPDATE {t} SET v = v + 1 WHERE (id) = ({a}) RETURNING v",
        "UPDATE {t} SET v = v + 1 WHERE id = {a} /* {b} */",
        "DELETE FROM {t} WHERE id = {a} AND v >= 0",
        "WITH w AS (UPDATE {t} SET v = v + 1 WHERE id = {a} RETURNING 1) SELECT count(*) FROM w",
    ]
    targets = iter(range(1, 13))
    for form in forms:
        for a, b in ((20, 21), (22, 23), (24, 25)):  # the shape, learnt on other keys
            await writer.run(form.format(t=table, a=a, b=b))
        a = next(targets)
        b = 26
        await writer.run(form.format(t=table, a=a, b=b))
        await twin.check(reads[a], why=f"after {form.format(t=table, a=a, b=b)!r}")
    inserts = [f"INSERT INTO {table} VALUES ({i}, 0), ({i + 1}, 0)" for i in (40, 42, 44)]
    for sql in inserts:
        await writer.run(sql)
    twin2, new = await _point_reads(env, table, range(50, 52))
    await writer.run(f"INSERT INTO {table} VALUES (49, 7), (51, 7)")
    await twin2.check(new[51], why="a multi-row INSERT read from digits")


# --- found by this review --------------------------------------------------------------------


async def _unnamed_after_a_simple_query(port: int, table: str) -> list[tuple[bytes, list[list[bytes | None]]]]:
    raw = await rawpg.Raw.connect(port)
    try:
        raw.send(rawpg.parse("", f"SELECT v FROM {table}"), rawpg.SYNC)
        await raw.until_ready()
        run = rawpg.bind("", "") + rawpg.execute() + rawpg.SYNC
        for _ in range(4):  # stored on the 2nd, served from the 3rd (and remembered)
            raw.send(run)
            await raw.until_ready()
        raw.send(rawpg.query("SELECT 1"))  # PostgreSQL drops the unnamed statement here
        await raw.until_ready()
        raw.send(run)
        got = await raw.until_ready()
        return [(rawpg.kinds(got), rawpg.rows(got))]
    finally:
        await raw.close()


async def test_bind_of_the_unnamed_statement_after_a_simple_query(env: Env) -> None:
    """A simple Query destroys the unnamed statement at the origin: a later Bind('') errors
    there (26000), and must not be answered from the cache."""
    table = await env.table("adv_unn", "v int", "(1)")
    expected = await _unnamed_after_a_simple_query(env.pg.port, table)
    assert expected[0][0].startswith(b"E")  # what PostgreSQL says
    assert await _unnamed_after_a_simple_query(env.proxy.port, table) == expected


async def test_memo_repeat_after_set_role_and_an_error_between(env: Env) -> None:
    """SET ROLE between two roles (RLS: each sees its own row) with the same bytes, and an
    error answer in between (the origin's read with an ErrorResponse, forwarded as it came)."""
    table = await env.table("adv_role", "owner text, v int")
    a, b = await env.role("adv_sa"), await env.role("adv_sb")
    await env.admin(
        f"INSERT INTO {table} VALUES ('{a}', 1), ('{b}', 2)",
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON {table} USING (owner = current_user)",
        f"GRANT {a}, {b} TO postgres",
    )
    twin = await env.twin()
    read = f"SELECT v FROM {table}"
    await twin.both(f"SET ROLE {a}")
    await twin.probe(read)
    assert (await twin.through(read))[1]
    await twin.both(f"SET ROLE {b}")
    await twin.check(read, why="the memo's bytes after SET ROLE")
    await twin.probe(read, require_hit=False)
    for client in (twin.via, twin.direct):
        try:
            await client.run("SELECT 1 / 0")
        except Exception as exc:  # both sides answer the error; the session goes on
            assert "division by zero" in str(exc)
    await twin.both(f"SET ROLE {a}")
    await twin.check(read, why="back to the first role after an error answer")
    await twin.probe(read, require_hit=False)


async def test_memo_of_a_named_statement_a_function_prepares_again(env: Env) -> None:
    """A function of the user's DEALLOCATEs and PREPAREs the statement again (EXECUTE in
    PL/pgSQL): the same Bind bytes now run other text at the origin."""
    t1 = await env.table("adv_f1", "v int", "(1)")
    t2 = await env.table("adv_f2", "v int", "(2)")
    fn = unique("adv_reprep")
    await env.admin(
        f"CREATE FUNCTION public.{fn}() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        f"EXECUTE 'DEALLOCATE s'; EXECUTE 'PREPARE s AS SELECT v FROM {t2}'; RETURN 0; END $$",
        f"GRANT EXECUTE ON FUNCTION public.{fn}() TO PUBLIC",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{fn}()")
    raw = await rawpg.Raw.connect(env.proxy.port)
    try:
        run = await _named_statement_memoised(env, raw, t1, 5)
        raw.send(rawpg.query(f"SELECT {fn}()"))
        await raw.until_ready()
        for _ in range(4):  # stored again by now, from the statement's new text
            raw.send(run)
            assert rawpg.rows(await raw.until_ready()) == [[b"2"]]
        writer = await env.client()
        await writer.run(f"UPDATE {t2} SET v = 22")  # what the statement reads now
        raw.send(run)
        assert rawpg.rows(await raw.until_ready()) == [[b"22"]]
        other = await rawpg.Raw.connect(env.proxy.port)  # the old text's key, another session
        try:
            other.send(rawpg.parse("s", f"SELECT v FROM {t1}"), rawpg.SYNC)
            await other.until_ready()
            for _ in range(4):
                other.send(run)
                assert rawpg.rows(await other.until_ready()) == [[b"1"]]
        finally:
            await other.close()
    finally:
        await raw.close()


async def test_memo_repeat_after_copy_and_a_notification(env: Env) -> None:
    """COPY FROM STDIN through another session, and a NOTIFY whose NotificationResponse
    reaches the reader between its repeats (an origin read with no request pending)."""
    table = await env.table("adv_copy", "id int PRIMARY KEY, v int", "(1, 1)")
    await make_known(env, table)
    twin = await env.twin()
    read = f"SELECT count(*), sum(v) FROM {table}"
    await twin.probe(read)
    await twin.via.run("LISTEN adv_ch")
    writer = await env.client()
    conn = writer.conn
    assert not isinstance(conn, asyncpg.Connection)
    async with conn.cursor() as cur, cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
        await copy.write_row((2, 5))
    await twin.check(read, why="after COPY FROM STDIN through another session")
    await twin.probe(read)
    await writer.run(f"UPDATE {table} SET v = 9 WHERE id = 2")
    await writer.run("NOTIFY adv_ch, 'x'")
    await asyncio.sleep(0.05)  # the notification reaches the reader's idle origin first
    await twin.check(read, why="after a write and a notification to the reader")
    await twin.probe(read, require_hit=False)


async def test_memo_repeat_after_ddl_and_a_tracked_setting(env: Env) -> None:
    """DDL through another session (the DDL epoch), and SET of a custom setting the read
    asks for (the identity carries it), each between repeats of the same bytes."""
    table = await env.table("adv_ddl", "id int PRIMARY KEY, v int", "(1, 1)")
    twin = await env.twin()
    star = f"SELECT * FROM {table}"
    await twin.probe(star)
    assert (await twin.through(star))[1]
    other = await env.client()
    await other.run(f"ALTER TABLE {table} ADD COLUMN w int DEFAULT 7")
    await twin.check(star, why="the memo's bytes after ALTER TABLE through another session")
    await twin.probe(star, require_hit=False)
    await twin.both("SET adv.x = 'one'")
    setting = f"SELECT current_setting('adv.x'), v FROM {table}"
    await twin.probe(setting)
    assert (await twin.through(setting))[1]
    await twin.both("SET adv.x = 'two'")
    await twin.check(setting, why="the memo's bytes after SET of the setting they read")
    await twin.probe(setting, require_hit=False)


async def test_memo_repeat_after_client_encoding_changes(env: Env) -> None:
    """A LATIN1 session is never answered from the cache (neonpoly reads SQL as UTF-8): the
    memo's bytes after SET client_encoding must go to the origin, and back after UTF8."""
    table = await env.table("adv_enc", "id int PRIMARY KEY, v text", "(1, 'café')")
    twin = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await twin.probe(read)
    assert (await twin.through(read))[1]
    await twin.both("SET client_encoding TO 'LATIN1'")
    for _ in range(3):
        await twin.check(read, why="a LATIN1 session")
        assert not (await twin.through(read))[1], "a LATIN1 session answered from the cache"
    await twin.both("SET client_encoding TO 'UTF8'")
    await twin.probe(read)

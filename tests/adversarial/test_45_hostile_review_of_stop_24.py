"""Hostile review of stop 24's fixes: two-phase commit held by gid, and the operators and
classes a read trusts without naming them.

PREPARE TRANSACTION holds what its transaction wrote until a COMMIT or ROLLBACK PREPARED of
its gid passes through neonpoly (QueryCache.hold_prepared). Each case below FAILED BEFORE
(a read of what a prepared transaction wrote cached, stale after a COMMIT PREPARED made
straight on the origin), and is fixed (QueryCache.two_phase, Classification.prepared):

* a query string that prepares and then fails (`...; PREPARE TRANSACTION 'g'; SELECT 1/0`):
  the hold was skipped for a failed request;
* one that prepares two gids: only the last was held;
* one that prepares and leaves a transaction open (`...; BEGIN`): held only at a COMMIT;
* a session with standard_conforming_strings off: its 'a\\\\b' is another gid to the server
  than to neonpoly's parser, so another session's COMMIT PREPARED of that text released it;
* one gid prepared on two servers (two integrations): a COMMIT PREPARED on one released both;
* a text neonpoly cannot parse (100 nested subqueries) that prepares.

An extended-protocol pipeline that prepares and then fails FAILED BEFORE too (same fix).

Against `serve --workers N` (NEONPOLY_TEST_WORKERS=2) each two-phase case prepares through
one worker and reads through another (two_phase.py): they FAILED BEFORE there too (the hold
was the preparing worker's alone); holds are now shared (cache/siblings.py `BoardHolds`).

Also FAILED BEFORE, fixed: a range type declared with a non-default operator class of the
user's (DISTINCT and @> run its plpgsql comparison); EXPLAIN ANALYZE of a read whose upper()
is the user's (EXPLAIN did not carry the names its query trusts); `COMMIT; BEGIN; UPDATE`
or `COMMIT AND CHAIN; UPDATE` in one string (the COMMIT forgot the open transaction's write).
Held (controls): a failed PREPARE reusing a prepared gid keeps the first one's hold; EXPLAIN
of an IMMUTABLE call of constants that names the user's type.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from neonpoly.proxy.origin import Origin
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.adversarial.harness import Client, Env, unique
from tests.adversarial.harness2 import counter, lying_upper, make_known, ran_code_then_check, warm_counter
from tests.adversarial.two_phase import (
    READING_WORKER,
    prepared_transactions_origin,
    reading_twin,
    session,
)
from tests.pgharness import PgServer, start_pg_server


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    yield from prepared_transactions_origin()


async def _table(env: Env, gid: str) -> tuple[str, str]:
    env.on_cleanup(f"ROLLBACK PREPARED '{gid}'")  # first: it holds a lock on the table
    t = await env.table("adv_2pc", "id int PRIMARY KEY, v text", "(1, 'old')")
    await make_known(env, t)
    return t, f"SELECT v FROM {t} WHERE id = 1"


@pytest.mark.parametrize("after", ["SELECT 1/0", "SELECT * FROM adv_no_such_table"])
async def test_prepared_then_the_query_string_fails(env: Env, after: str) -> None:
    """`BEGIN; UPDATE; PREPARE TRANSACTION 'g'; <fails>`: the transaction is prepared (the
    failure is in the implicit transaction after it), though the query string failed."""
    gid = unique("adv_gid")
    t, read = await _table(env, gid)
    writer = await session(env, t)
    with pytest.raises(psycopg.Error):
        await writer.run(f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{gid}'; {after}")
    assert await env.admin_val("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1", gid) == 1
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly) of a gid prepared by a failed string")
    assert rows == [("new",)]


async def test_two_prepared_in_one_query_string(env: Env) -> None:
    """Two transactions prepared by one query string; the second committed through neonpoly
    (which releases its gid), the first straight on the origin."""
    first, second = unique("adv_gid"), unique("adv_gid")
    t, read = await _table(env, first)
    u, _ = await _table(env, second)
    writer = await session(env, t, u)
    await writer.run(
        f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{first}'; "
        f"BEGIN; UPDATE {u} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{second}'"
    )
    await writer.run(f"COMMIT PREPARED '{second}'")
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED '{first}'")
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly) of the first of two gids")
    assert rows == [("new",)]


async def test_prepared_then_a_transaction_left_open(env: Env) -> None:
    """`BEGIN; UPDATE; PREPARE TRANSACTION 'g'; BEGIN`: the session is in a transaction when
    the string ends, and its next COMMIT prepares nothing."""
    gid = unique("adv_gid")
    t, read = await _table(env, gid)
    writer = await session(env, t)
    await writer.run(f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{gid}'; BEGIN")
    await writer.run("COMMIT")
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly) of a gid prepared before a BEGIN")
    assert rows == [("new",)]


async def test_a_failed_prepare_reusing_a_held_gid(env: Env) -> None:
    """PREPARE TRANSACTION 'g' while 'g' is prepared fails; the gid's hold must stay on what
    the first transaction wrote."""
    gid = unique("adv_gid")
    t, read = await _table(env, gid)
    u = await env.table("adv_2pc_u", "id int PRIMARY KEY, v text", "(1, 'old')")
    writer = await session(env, t)
    await writer.run(f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{gid}'")
    other = await session(env, u, worker=READING_WORKER)  # another worker than the writer's
    with pytest.raises(psycopg.Error):
        await other.run(f"BEGIN; UPDATE {u} SET v = 'x' WHERE id = 1; PREPARE TRANSACTION '{gid}'")
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly); a failed PREPARE reused its gid")
    assert rows == [("new",)]


async def test_a_gid_spelt_with_backslashes_by_a_legacy_strings_session(env: Env) -> None:
    """standard_conforming_strings off: `'a\\\\b'` is the gid a\\b to the server, a\\\\b to
    neonpoly's parser. Another session (strings standard) prepares and commits a\\\\b
    through neonpoly: that must not release the first gid's hold."""
    legacy = rf"adv_gid_{unique('l')}_a\\b"  # the text between the quotes, as typed
    env.on_cleanup(f"ROLLBACK PREPARED E'{legacy}'")  # both gids, before their tables go
    t, read = await _table(env, legacy)
    u = await env.table("adv_2pc_u", "id int PRIMARY KEY, v text", "(1, 'old')")
    writer = await session(env, t)
    await writer.run("SET standard_conforming_strings = off")
    await writer.run(f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{legacy}'")
    server_gid = legacy.replace("\\\\", "\\")  # one backslash
    assert await env.admin_val("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1", server_gid) == 1
    other = await session(env, u, worker=READING_WORKER)  # another worker than the writer's
    await other.run(f"BEGIN; UPDATE {u} SET v = 'x' WHERE id = 1; PREPARE TRANSACTION '{legacy}'")
    await other.run(f"COMMIT PREPARED '{legacy}'")  # the gid with two backslashes
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED E'{legacy}'")  # the legacy session's gid, one backslash
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly) of a gid a legacy-strings session spelt")
    assert rows == [("new",)]


@pytest.mark.parametrize(
    "read",
    [
        "SELECT count(*) FROM {t} WHERE r @> 3",
        "SELECT count(DISTINCT r) FROM {t}",
    ],
)
async def test_a_range_over_a_users_non_default_operator_class(env: Env, read: str) -> None:
    """A range type's bounds compare with the btree operator class it was declared with
    (subtype_opclass), default or not: one of the user's whose comparison (plpgsql) bumps the
    counter runs at every sort, DISTINCT or containment test of the range, with no name of
    the user's in the text."""
    table, bump = await counter(env)
    cmp, ops, rng = unique("adv_cmp"), unique("adv_ops"), unique("adv_rng")
    await env.admin(
        f"CREATE FUNCTION public.{cmp}(int, int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN pg_catalog.btint4cmp($1, $2); END $$",
        f"CREATE OPERATOR CLASS public.{ops} FOR TYPE int USING btree AS OPERATOR 1 pg_catalog.<, "
        "OPERATOR 2 pg_catalog.<=, OPERATOR 3 pg_catalog.=, OPERATOR 4 pg_catalog.>=, OPERATOR 5 pg_catalog.>, "
        f"FUNCTION 1 public.{cmp}(int, int)",
        f"CREATE TYPE public.{rng} AS RANGE (SUBTYPE = int, SUBTYPE_OPCLASS = public.{ops})",
    )
    env.on_cleanup(
        f"DROP TYPE IF EXISTS public.{rng} CASCADE",
        f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING btree CASCADE",
        f"DROP FUNCTION IF EXISTS public.{cmp} CASCADE",
    )
    t = await env.table("adv_rngt", f"id int PRIMARY KEY, r public.{rng}", "(1, '[1,5)')", "(2, '[2,9)')")
    await env.admin(f"UPDATE {table} SET n = 0")
    await make_known(env, t, table)
    # Not required to be a hit: with such a range in the database every read may compare with
    # it (the fix passes them all through); before the fix this was a hit.
    reader = await env.twin()
    count = f"SELECT n FROM {table}"
    await reader.probe(count, require_hit=False)
    sql = read.format(t=t)
    await ran_code_then_check(env, reader, count, sql, "the user's function (its range compares its bounds)")


@contextlib.asynccontextmanager
async def _two_servers(a: PgServer, b: PgServer, cache_dir: Path) -> AsyncIterator[int]:
    """One neonpoly with an integration per server (chosen by application_name)."""
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=cache_dir, cache=CacheSettings()))
    service.add_cache("adv-2pc-a", Origin.from_url(a.url("postgres", "app", "require", host="127.0.0.1")))
    service.add_cache("adv-2pc-b", Origin.from_url(b.url("postgres", "app", "require", host="127.0.0.1")))
    _, port = await service.start()
    try:
        yield port
    finally:
        await service.close(grace=0.5)


async def test_the_same_gid_committed_on_another_server(env: Env, tmp_path: Path) -> None:
    """Two-phase commit across two servers (the use it is for) prepares one gid on each. Its
    COMMIT PREPARED through neonpoly on server B ends B's transaction only: server A's, with
    the same gid, is still prepared and must stay held (then committed on A directly)."""
    gid = unique("adv_gid")
    t, read = await _table(env, gid)
    other = start_pg_server(small=True, extra_settings={"max_prepared_transactions": 5})
    try:
        conn = await asyncpg.connect(**other.dsn("postgres", "app"))
        try:
            await conn.execute("CREATE TABLE adv_2pc_b (id int PRIMARY KEY, v text)")
            await conn.execute("INSERT INTO adv_2pc_b VALUES (1, 'old')")
        finally:
            await conn.close()
        async with _two_servers(env.pg, other, tmp_path) as port:
            login = env.login()
            on_a = await Client.open("psycopg", login.with_params(application_name="adv-2pc-a"), "127.0.0.1", port)
            on_b = await Client.open("psycopg", login.with_params(application_name="adv-2pc-b"), "127.0.0.1", port)
            try:
                await on_a.rows(f"SELECT count(*) FROM {t}")  # looked up
                await on_b.rows("SELECT count(*) FROM adv_2pc_b")
                await on_a.run(f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{gid}'")
                await on_b.run(f"BEGIN; UPDATE adv_2pc_b SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{gid}'")
                await on_b.run(f"COMMIT PREPARED '{gid}'")
                for _ in range(3):
                    assert await on_a.rows(read) == [("old",)]
                await env.admin(f"COMMIT PREPARED '{gid}'")  # on server A, directly
                got = await on_a.rows(read)
                assert got == [("new",)], f"after COMMIT PREPARED on server A made directly: {got!r}"
            finally:
                await on_a.close()
                await on_b.close()
    finally:
        other.destroy()


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN ANALYZE SELECT upper(m) FROM {t}",
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT upper(m) FROM {t} WHERE id = 1",
        # Held: planning folds an IMMUTABLE call of constants (it names the user's type).
        "EXPLAIN SELECT upper('ok'::public.{mood})",
    ],
)
async def test_explain_of_a_read_that_trusts_a_builtin_name(env: Env, sql: str) -> None:
    """As a cursor's query (adversarial 43): EXPLAIN ANALYZE runs its query, EXPLAIN plans
    it, and its `upper(m)` is the user's (lying IMMUTABLE plpgsql over their enum, which
    bumps the counter)."""
    table, bump = await counter(env)
    mood = unique("adv_mood")
    await env.admin(f"CREATE TYPE public.{mood} AS ENUM ('sad', 'ok')")
    env.on_cleanup(f"DROP TYPE IF EXISTS public.{mood} CASCADE")
    t = await env.table("adv_moods", f"id int PRIMARY KEY, m public.{mood}", "(1, 'sad')", "(2, 'ok')")
    await lying_upper(env, mood, bump)
    await make_known(env, t, table)
    reader, count = await warm_counter(env, table)
    sql = sql.format(t=t, mood=mood)
    await ran_code_then_check(env, reader, count, sql, "the user's upper()")


@pytest.mark.parametrize(
    "opens",
    [
        "COMMIT; BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1",
        "COMMIT AND CHAIN; UPDATE {t} SET v = 'new' WHERE id = 1",
    ],
)
async def test_a_write_after_a_commit_in_one_query_string(env: Env, opens: str) -> None:
    """One query string commits and then writes in a new transaction, left open: the write is
    visible only at the next COMMIT, which must evict again what a reader cached meanwhile."""
    t = await env.table("adv_chain", "id int PRIMARY KEY, v text", "(1, 'old')")
    read = f"SELECT v FROM {t} WHERE id = 1"
    await make_known(env, t)
    writer = await env.client()
    await writer.run("BEGIN")
    await writer.run(opens.format(t=t))
    reader = await env.twin()
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await writer.run("COMMIT")
    rows = await reader.check(read, why=f"after COMMIT of the transaction {opens!r} left open")
    assert rows == [("new",)]


async def test_prepared_in_a_query_string_neonpoly_cannot_parse(env: Env) -> None:
    """The server takes 100 nested subqueries; neonpoly's parse of them runs out of Python's
    recursion (an unreadable text: it evicts the database). A PREPARE TRANSACTION in it
    must still be held."""
    gid = unique("adv_gid")
    t, read = await _table(env, gid)
    deep = "SELECT " + "(SELECT " * 100 + "1" + ")" * 100
    writer = await session(env, t)
    await writer.run(f"BEGIN; UPDATE {t} SET v = 'new' WHERE id = 1; PREPARE TRANSACTION '{gid}'; {deep}")
    assert await env.admin_val("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1", gid) == 1
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly) of a gid prepared by an unreadable text")
    assert rows == [("new",)]


async def test_prepared_then_an_extended_batch_fails(env: Env) -> None:
    """The same by the extended protocol: one pipeline (psycopg's, one Sync) runs BEGIN, the
    UPDATE, PREPARE TRANSACTION and a failing SELECT."""
    gid = unique("adv_gid")
    t, read = await _table(env, gid)
    writer = await session(env, t)
    assert isinstance(writer.conn, psycopg.AsyncConnection)
    with pytest.raises(psycopg.Error):
        async with writer.conn.pipeline():
            cur = writer.conn.cursor()
            await cur.execute("BEGIN")
            await cur.execute(f"UPDATE {t} SET v = 'new' WHERE id = 1")
            await cur.execute(f"PREPARE TRANSACTION '{gid}'")
            await cur.execute("SELECT 1/0")
    assert await env.admin_val("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1", gid) == 1
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    await env.admin(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why="after COMMIT PREPARED (made directly) of a gid prepared by a failed pipeline")
    assert rows == [("new",)]

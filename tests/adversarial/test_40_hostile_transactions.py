"""Hostile review of transactions and snapshots: a read must see what its own transaction
sees, never a newer answer the cache holds, nor an older one left behind by a write that its
transaction undid or that a procedure committed halfway.

* REPEATABLE READ and SERIALIZABLE snapshots, however the isolation was chosen (BEGIN's own
  words, SET default_transaction_isolation, SET SESSION CHARACTERISTICS, the startup packet),
  and a snapshot imported from another session (SET TRANSACTION SNAPSHOT): after another
  session wrote through neonpoly and a third made the newer answer a provable cache hit, the
  old snapshot's reads must still give the old rows;
* writes undone inside a transaction (ROLLBACK, ROLLBACK TO SAVEPOINT, an error that aborts
  it, COMMIT of an aborted transaction): no reader is served the uncommitted rows, before or
  after;
* procedures and DO blocks that COMMIT between writes and then fail: what they committed is
  seen, what they rolled back is not;
* a holdable cursor materialised before a write: its FETCHes give the old rows, the cache the
  new ones;
* state that changes with no write to a table: a sequence read through a view, a large object
  written with lo_put, advisory locks in pg_locks, the session's cursors in pg_cursors.

Each case compares neonpoly's answers with a direct connection kept in the same state. All
held when written: they pin that a transaction block never takes or gives cached answers.
"""

from __future__ import annotations

import pytest

from tests.adversarial.harness import Env, Login, Twin, unique


async def _old_row(env: Env) -> tuple[str, str]:
    t = await env.table("adv_snap", "id int PRIMARY KEY, v text", "(1, 'old')", "(2, 'other')")
    return t, f"SELECT v FROM {t} WHERE id = 1"


async def _newer_answer_cached(env: Env, t: str, read: str) -> None:
    """Another session writes through neonpoly; a third makes the new row a provable hit."""
    writer = await env.client()
    await writer.run(f"UPDATE {t} SET v = 'new' WHERE id = 1")
    third = await env.twin()
    rows, _ = await third.probe(read)
    assert rows == [("new",)]


@pytest.mark.parametrize(
    ("setup", "begin", "options"),
    [
        ((), "BEGIN ISOLATION LEVEL REPEATABLE READ", ""),
        ((), "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", ""),
        (("SET default_transaction_isolation = 'repeatable read'",), "BEGIN", ""),
        (("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",), "BEGIN", ""),
        ((), "BEGIN", "-c default_transaction_isolation=serializable"),
    ],
)
async def test_a_snapshot_older_than_the_cached_answer(
    env: Env, setup: tuple[str, ...], begin: str, options: str
) -> None:
    t, read = await _old_row(env)
    login: Login = env.login(options=options) if options else env.login()
    twin = await env.twin(login)
    await twin.probe(read)  # the old row is a hit before the transaction starts
    await twin.both(*setup, begin)
    rows = await twin.check(read, why="the snapshot's first read")
    assert rows == [("old",)]
    await _newer_answer_cached(env, t, read)
    for _ in range(3):
        rows = await twin.check(read, why=f"inside {begin} {setup or options}: the snapshot predates the write")
    assert rows == [("old",)]
    await twin.both("COMMIT")
    await twin.check(read, why="after COMMIT")


async def test_a_snapshot_imported_from_another_session(env: Env) -> None:
    """The exporter (through neonpoly) holds a snapshot taken before the write; the twin
    imports it with SET TRANSACTION SNAPSHOT on both of its sides."""
    t, read = await _old_row(env)
    exporter = await env.client()
    await exporter.run("BEGIN ISOLATION LEVEL REPEATABLE READ")
    snapshot = (await exporter.rows("SELECT pg_export_snapshot()"))[0][0]
    await _newer_answer_cached(env, t, read)
    twin = await env.twin()
    await twin.both("BEGIN ISOLATION LEVEL REPEATABLE READ", f"SET TRANSACTION SNAPSHOT '{snapshot}'")
    for _ in range(3):
        rows = await twin.check(read, why="inside an imported snapshot older than the cached answer")
    assert rows == [("old",)]
    await twin.both("COMMIT")
    await exporter.run("COMMIT")
    await twin.check(read, why="after COMMIT")


@pytest.mark.parametrize(
    "ending",
    [
        ("ROLLBACK",),
        ("ROLLBACK TO SAVEPOINT s", "COMMIT"),
        ("SELECT 1/0", "ROLLBACK"),
        ("SELECT 1/0", "COMMIT"),  # COMMIT of an aborted transaction rolls it back
        ("SELECT 1/0", "ROLLBACK TO SAVEPOINT s", "COMMIT"),
    ],
)
async def test_writes_undone_inside_a_transaction(env: Env, ending: tuple[str, ...]) -> None:
    """The writer reads its own uncommitted row (through neonpoly, inside the transaction),
    a reader is served the committed one meanwhile; after the undo both see the old row."""
    t, read = await _old_row(env)
    reader = await env.twin()
    await reader.probe(read)
    writer = await env.client()  # one side only: a direct double would wait for its row lock
    for sql in ("BEGIN", "SAVEPOINT s", f"UPDATE {t} SET v = 'uncommitted' WHERE id = 1"):
        await writer.run(sql)
    for _ in range(3):
        assert await writer.rows(read) == [("uncommitted",)], "the writer's own uncommitted row"
        rows = await reader.check(read, why="another session while the write is uncommitted")
        assert rows == [("old",)]
    for sql in ending:
        try:
            await writer.run(sql)
        except Exception as error:  # the division by zero (and, after it, nothing else)
            assert "division by zero" in str(error), error
    for _ in range(3):
        assert await writer.rows(read) == [("old",)], f"the writer after {' then '.join(ending)}"
        rows = await reader.check(read, why=f"after {' then '.join(ending)}")
        assert rows == [("old",)]


@pytest.mark.parametrize("kind", ["procedure", "do"])
async def test_code_that_commits_halfway_then_fails(env: Env, kind: str) -> None:
    """A procedure (or DO block) updates, COMMITs, updates again and fails: the first write
    is there, the second is not. A reader had the old rows cached."""
    t, read = await _old_row(env)
    body = (
        f"BEGIN UPDATE public.{t} SET v = 'first' WHERE id = 1; COMMIT; "
        f"UPDATE public.{t} SET v = 'second' WHERE id = 1; PERFORM 1/0; END"
    )
    if kind == "procedure":
        proc = unique("adv_halfway")
        await env.admin(f"CREATE PROCEDURE public.{proc}() LANGUAGE plpgsql AS $$ {body} $$")
        env.on_cleanup(f"DROP PROCEDURE IF EXISTS public.{proc}()")
        statement = f"CALL public.{proc}()"
    else:
        statement = f"DO $$ {body} $$"
    reader = await env.twin()
    await reader.probe(read)
    writer = await env.client()
    with pytest.raises(Exception, match="division by zero"):
        await writer.run(statement)
    rows = await reader.check(read, why=f"after {kind} committed one write and failed in the next")
    assert rows == [("first",)]
    await reader.probe(read)  # cached again, and right


async def test_holdable_cursor_materialised_before_a_write(env: Env) -> None:
    """DECLARE … WITH HOLD outside a transaction materialises its rows at once: FETCH after a
    write gives the old rows; the same read as a query gives the new one (a hit)."""
    t, read = await _old_row(env)
    twin = await env.twin()
    await twin.both(f"DECLARE c CURSOR WITH HOLD FOR SELECT id, v FROM {t} ORDER BY id")
    await _newer_answer_cached(env, t, read)
    for sql in ("FETCH 1 FROM c", "MOVE BACKWARD ALL IN c", "FETCH ALL FROM c", "FETCH ABSOLUTE 1 FROM c"):
        got = await twin.via.rows(sql)
        want = await twin.direct.rows(sql)
        assert got == want, f"{sql}: proxy {got!r} != direct {want!r}"
    rows = await twin.check("SELECT count(*) FROM pg_cursors WHERE name = 'c'", why="the session's own cursors")
    assert rows == [(1,)]
    await twin.both("CLOSE c")
    await twin.check("SELECT count(*) FROM pg_cursors WHERE name = 'c'", why="after CLOSE")
    await twin.check(read, why="after the cursor")


async def _same_twice(twin: Twin, read: str, why: str) -> None:
    await twin.probe(read, require_hit=False)
    await twin.check(read, why=why)


async def test_a_sequence_read_through_a_view(env: Env) -> None:
    seq, view = unique("adv_seq"), unique("adv_seqv")
    await env.admin(
        f"CREATE SEQUENCE public.{seq}",
        f"CREATE VIEW public.{view} AS SELECT last_value, is_called FROM public.{seq}",
        f"GRANT ALL ON public.{seq}, public.{view} TO PUBLIC",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}", f"DROP SEQUENCE IF EXISTS public.{seq}")
    twin = await env.twin()
    read = f"SELECT last_value, is_called FROM {view}"
    _, hit = await twin.probe(read, require_hit=False)
    assert not hit, "a sequence read through a view was served from the cache"
    writer = await env.client()
    await writer.rows(f"SELECT nextval('public.{seq}')")
    await twin.check(read, why="after nextval through neonpoly")


async def test_a_large_object_written_in_place(env: Env) -> None:
    """lo_put changes pg_largeobject, no table a query names: lo_get must not be cached."""
    oid = await env.admin_val("SELECT lo_from_bytea(0, 'old'::bytea)")
    await env.admin(f"GRANT SELECT, UPDATE ON LARGE OBJECT {oid} TO PUBLIC")
    env.on_cleanup(f"SELECT lo_unlink({oid})")
    twin = await env.twin()
    for read in (f"SELECT lo_get({oid})", f"SELECT count(*) FROM pg_largeobject_metadata WHERE oid = {oid}"):
        await twin.probe(read, require_hit=False)
    writer = await env.client()
    await writer.rows(f"SELECT lo_put({oid}, 0, 'new'::bytea)")
    rows = await twin.check(f"SELECT lo_get({oid})", why="after lo_put through neonpoly")
    assert rows == [(b"new",)]
    await writer.rows(f"SELECT lo_unlink({oid})")
    await twin.check(f"SELECT count(*) FROM pg_largeobject_metadata WHERE oid = {oid}", why="after lo_unlink")


async def test_advisory_locks_seen_in_pg_locks(env: Env) -> None:
    key = 4_200_000 + (hash(unique("k")) % 100_000)
    twin = await env.twin()
    read = f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = {key}"
    await _same_twice(twin, read, "before the lock")
    holder = await env.client()
    await holder.rows(f"SELECT pg_advisory_lock({key})")
    rows = await twin.check(read, why="after pg_advisory_lock through neonpoly")
    assert rows == [(1,)]
    await holder.rows(f"SELECT pg_advisory_unlock({key})")
    await twin.check(read, why="after pg_advisory_unlock")

"""Hostile review of the session's write memo (proxy/writes.py): a keyed write whose text has
the shape (numbers zeroed) of one the full path decided before is decided from the memo,
and evicts only its key. Every case makes the memo first (the same shape twice through one
session), caches reads that the next write may change, sends a text of that shape (or one
that only looks like it) whose meaning reaches further, and compares every read with the
origin: a memo that outlives what it rested on, or a shape that hides another meaning, would
leave a stale answer behind."""

from __future__ import annotations

import random
from collections.abc import Sequence

from neonpoly.cache import key_shapes
from tests.adversarial import rawpg
from tests.adversarial.harness import Client, Env, Twin, evil_equals, unique

ROWS = ("(1, 10)", "(2, 20)", "(3, 30)", "(4, 40)", "(-2, -20)")


async def accounts(env: Env) -> str:
    return await env.table("adv_wm", "aid int PRIMARY KEY, v int NOT NULL", *ROWS)


def points(table: str, *aids: int) -> list[str]:
    return [f"SELECT v FROM {table} WHERE aid = {aid}" for aid in aids]


async def memo_decides(env: Env, writer: Client, sql: str) -> bool | None:
    """Whether `sql` would be decided from the writer's memo (None: the sessions live in
    other processes, NEONPOLY_TEST_WORKERS)."""
    service = getattr(env.proxy, "service", None)
    if service is None:
        return None
    pid = await writer.backend_pid()
    (session,) = [s for s in service.server.sessions if s.origin_key and s.origin_key[0] == pid]
    found = key_shapes.shape_of(sql)
    return found is not None and found[0] in session.write_memos


async def primed(env: Env, writer: Client, primer: str, *, memo: bool | None = True) -> None:
    """The primer's shape decided twice by `writer` (full path, then the memo); `memo`: a
    keyed write the memo must now hold (False: one it must never hold; None: either)."""
    await writer.run(primer)
    await writer.run(primer)
    held = await memo_decides(env, writer, primer)
    assert held is None or memo is None or held == memo, f"memo for {primer!r}: {held}, wanted {memo}"


async def strike(reader: Twin, writer: Client, reads: Sequence[str], write: str) -> None:
    """Every read provably cached, the write through neonpoly, every read as the origin says."""
    for sql in reads:
        await reader.probe(sql)
    await writer.run(write)
    for sql in reads:
        await reader.check(sql, why=f"after {write!r}")


# (primer, hostile write, keys read, whether the primer's shape is remembered)
SAME_SHAPE = [
    # A minus belongs to the shape: the key is read with its sign.
    ("UPDATE {t} SET v = v + 1 WHERE aid = -1", "UPDATE {t} SET v = v + 1 WHERE aid = -2", (-2, 2), True),
    # Numbers in comments are runs of the shape too, and change nothing.
    (
        "UPDATE {t} SET v = v + 1 WHERE aid = 1 /* 9; 2 */ -- 9\n",
        "UPDATE {t} SET v = v + 1 WHERE aid = 3 /* 1; 4 */ -- 4\n",
        (1, 3, 4),
        True,
    ),
    (
        "UPDATE {t} SET v = v + 1 WHERE aid = 1 AND 1 = 1",
        "UPDATE {t} SET v = v + 1 WHERE aid = 2 AND 4 = 4",
        (2, 4),
        True,
    ),
    # Numbers that make a disjunction true: never keyed.
    (
        "UPDATE {t} SET v = v + 1 WHERE aid = 1 OR 1 = 0",
        "UPDATE {t} SET v = v + 1 WHERE aid = 1 OR 2 = 2",
        (2, 3),
        False,
    ),
    # A key computed from several numbers.
    ("UPDATE {t} SET v = v + 1 WHERE aid = 1 + 0", "UPDATE {t} SET v = v + 1 WHERE aid = 1 + 2", (1, 3), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid = 1 * 1", "UPDATE {t} SET v = v + 1 WHERE aid = 2 * 2", (2, 4), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid IN (1, 2)", "UPDATE {t} SET v = v + 1 WHERE aid IN (3, 4)", (2, 3, 4), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid = 1::int", "UPDATE {t} SET v = v + 1 WHERE aid = 3::int", (1, 3), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid = (1)", "UPDATE {t} SET v = v + 1 WHERE aid = (4)", (1, 4), True),
    # Spelled otherwise: not runs of 1-9 digits, so never decided from a memo.
    ("UPDATE {t} SET v = v + 1 WHERE aid = 1.0", "UPDATE {t} SET v = v + 1 WHERE aid = 2.0", (1, 2), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid = 1e0", "UPDATE {t} SET v = v + 1 WHERE aid = 3e0", (1, 3), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid = '1'", "UPDATE {t} SET v = v + 1 WHERE aid = '4'", (1, 4), False),
    ("UPDATE {t} SET v = v + 1 WHERE aid = 0000000001", "UPDATE {t} SET v = v + 1 WHERE aid = 0000000003", (3,), False),
    # A write that moves the key: the rows of both keys change.
    ("UPDATE {t} SET aid = 11 WHERE aid = 10", "UPDATE {t} SET aid = 12 WHERE aid = 2", (2, 12), False),
    (
        "UPDATE {t} SET v = v + 1, aid = aid + 0 WHERE aid = 1",
        "UPDATE {t} SET v = v + 1, aid = aid + 30 WHERE aid = 3",
        (3, 33),
        False,
    ),
    # Two statements in one Query.
    (
        "UPDATE {t} SET v = v + 1 WHERE aid = 1; UPDATE {t} SET v = v + 1 WHERE aid = 1",
        "UPDATE {t} SET v = v + 1 WHERE aid = 1; UPDATE {t} SET v = v + 1 WHERE aid = 4",
        (1, 4),
        False,
    ),
    (
        "UPDATE {t} SET v = v + 1 WHERE aid = 1 RETURNING v",
        "UPDATE {t} SET v = v + 1 WHERE aid = 4 RETURNING v",
        (1, 4),
        True,
    ),
    ("UPDATE {t} AS x SET v = v + 1 WHERE x.aid = 1", "UPDATE {t} AS x SET v = v + 1 WHERE x.aid = 3", (1, 3), True),
    ("UPDATE public.{t} SET v = v + 1 WHERE aid = 1", "UPDATE public.{t} SET v = v + 1 WHERE aid = 2", (1, 2), True),
    # The key from a subquery: reads another row.
    (
        "UPDATE {t} SET v = v + 1 WHERE aid = (SELECT 1)",
        "UPDATE {t} SET v = v + 1 WHERE aid = (SELECT 3)",
        (1, 3),
        False,
    ),
    (
        "INSERT INTO {t} (aid, v) VALUES (1, 5) ON CONFLICT (aid) DO UPDATE SET v = {t}.v + 1",
        "INSERT INTO {t} (aid, v) VALUES (3, 5) ON CONFLICT (aid) DO UPDATE SET v = {t}.v + 1",
        (1, 3),
        True,
    ),
    (
        "INSERT INTO {t} (aid, v) VALUES (20, 5), (21, 6) ON CONFLICT DO NOTHING",
        "INSERT INTO {t} (aid, v) VALUES (22, 5), (23, 6) ON CONFLICT DO NOTHING",
        (22, 23),
        True,
    ),
    ("DELETE FROM {t} WHERE aid = 100", "DELETE FROM {t} WHERE aid = 4", (3, 4), True),
    ("update {t} set v = v + 1 where aid = 1", "update {t} set v = v + 1 where aid = 2", (1, 2), True),
    ("uPdAtE {t} SeT v = v + 1 WhErE aid = 1", "uPdAtE {t} SeT v = v + 1 WhErE aid = 3", (1, 3), True),
]


async def test_texts_of_a_remembered_shape_keep_their_own_meaning(env: Env) -> None:
    t = await accounts(env)
    writer = await env.client()
    reader = await env.twin()
    await env.admin(f"INSERT INTO {t} VALUES (10, 100)")  # moved by the first key-moving primer
    for primer, hostile, aids, memo in SAME_SHAPE:
        primer, hostile = primer.format(t=t), hostile.format(t=t)
        await primed(env, writer, primer, memo=memo)
        await strike(reader, writer, points(t, *aids), hostile)


async def test_a_remembered_write_inside_a_transaction(env: Env) -> None:
    """Evicted when sent and again at COMMIT: a read by another session cached while the
    write is not yet visible must not outlive the COMMIT; a rolled-back write changes none."""
    t = await accounts(env)
    writer = await env.client()
    reader = await env.twin()
    update = f"UPDATE {t} SET v = v + 1 WHERE aid = "
    await primed(env, writer, update + "1")
    for end in ("ROLLBACK", "COMMIT"):
        await writer.run("BEGIN")
        await writer.run("SAVEPOINT s")
        await writer.run(update + "2")
        await writer.run("ROLLBACK TO SAVEPOINT s")
        await writer.run(update + "3")
        await reader.probe(points(t, 3)[0], require_hit=True)  # the committed value, cached
        await writer.run(end)
        for sql in points(t, 2, 3):
            await reader.check(sql, why=f"after {end}")


async def test_a_memo_does_not_outlive_ddl_through_another_session(env: Env) -> None:
    """A trigger, a rule, another primary key: each made by another session through
    neonpoly after the memo was made; the memo's next text must widen as the full path."""
    t = await accounts(env)
    audit = await env.table("adv_wm_audit", "id int PRIMARY KEY, n int NOT NULL", "(1, 0)")
    writer = await env.client()
    ddl = await env.client()
    reader = await env.twin()
    update = f"UPDATE {t} SET v = v + 1 WHERE aid = "
    count = f"SELECT n FROM {audit} WHERE id = 1"
    await primed(env, writer, update + "1")
    fn = unique("adv_wm_fn")
    env.on_cleanup(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")
    await ddl.run(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN UPDATE {audit} SET n = n + 1 WHERE id = 1; RETURN NEW; END $$"
    )
    await ddl.run(f"CREATE TRIGGER {fn}_t AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {fn}()")
    await strike(reader, writer, [count], update + "2")
    await ddl.run(f"DROP TRIGGER {fn}_t ON {t}")
    await primed(env, writer, update + "1")
    await ddl.run(f"CREATE RULE {fn}_r AS ON UPDATE TO {t} DO ALSO UPDATE {audit} SET n = n + 10 WHERE id = 1")
    await strike(reader, writer, [count], update + "3")
    await ddl.run(f"DROP RULE {fn}_r ON {t}")
    # The key moves to another column: a point read of v = 41 is then changed by a write of aid 4.
    await primed(env, writer, update + "1")
    await ddl.run(f"ALTER TABLE {t} DROP CONSTRAINT {t}_pkey, ADD PRIMARY KEY (v)")
    await strike(
        reader, writer, [f"SELECT aid FROM {t} WHERE v = 41", f"SELECT aid FROM {t} WHERE v = 42"], update + "4"
    )


async def test_a_memo_does_not_outlive_a_table_made_anew(env: Env) -> None:
    """The table dropped and made again (through neonpoly) with its key on another column."""
    t = await accounts(env)
    writer = await env.client()
    reader = await env.twin()
    update = f"UPDATE {t} SET v = v + 1 WHERE aid = "
    await primed(env, writer, update + "1")
    await writer.run(f"DROP TABLE {t}")
    await writer.run(f"CREATE TABLE {t} (aid int NOT NULL, v int PRIMARY KEY)")
    await writer.run(f"INSERT INTO {t} VALUES (1, 1), (1, 5), (2, 3)")
    await strike(reader, writer, [f"SELECT aid FROM {t} WHERE v = {v}" for v in (1, 2, 3, 5, 6)], update + "1")


async def test_a_role_whose_search_path_brings_the_users_operator(env: Env) -> None:
    """Another role's sessions start with the user's `=` on their path (ALTER ROLE … SET): its
    writes by `aid = 1` change every row, and are never remembered as keyed."""
    evil = await evil_equals(env)
    t = await accounts(env)
    role = await env.role()
    await env.admin(f"ALTER ROLE {role} SET search_path = {evil}, pg_catalog, public")
    reader = await env.twin()
    writer = await env.client(env.login(role))
    update = f"UPDATE {t} SET v = v + 1 WHERE aid = "
    await primed(env, writer, update + "1", memo=False)
    await strike(reader, writer, points(t, 2, 3), update + "1")


async def test_a_memo_does_not_outlive_a_search_path_that_brings_the_users_operator(env: Env) -> None:
    """An `=` of the user's for integers (always true) brought onto the search_path by
    set_config in a SELECT, and by SET LOCAL inside a transaction: `aid = 1` then matches
    every row, and the memo made under the old path must not decide it."""
    evil = await evil_equals(env)
    t = await accounts(env)
    writer = await env.client()
    reader = await env.twin()
    update = f"UPDATE {t} SET v = v + 1 WHERE aid = "
    path = f"{evil}, pg_catalog, public"
    await primed(env, writer, update + "1", memo=None)
    await writer.run(f"SELECT pg_catalog.set_config('search_path', '{path}', false)")
    await strike(reader, writer, points(t, 2, 3), update + "1")
    await writer.run("RESET search_path")
    await primed(env, writer, update + "1")
    for sql in points(t, 2, 3):
        await reader.probe(sql)
    await writer.run("BEGIN")
    await writer.run(f"SET LOCAL search_path = {path}")
    await writer.run(update + "1")
    await writer.run("COMMIT")
    for sql in points(t, 2, 3):
        await reader.check(sql, why="after a write under SET LOCAL search_path")
    await primed(env, writer, update + "1")  # the path is the old one again after COMMIT
    await strike(reader, writer, points(t, 2, 3), update + "4")


async def test_a_write_pipelined_behind_a_read_that_changes_the_search_path(env: Env) -> None:
    """A read of a view not looked up yet is judged when it completes; a keyed write sent
    right behind it (memo or full path) must not be decided with the search_path of before:
    the view's function brings an `=` of the user's (always true) onto it, so the write changes
    every row, and a read cached by another session while it runs must not survive it (the
    `=` waits on an advisory lock the case holds, so that the read comes while it runs)."""
    evil = unique("adv_wm_evil")
    lock = random.randrange(1 << 40)
    t = await accounts(env)
    view = unique("adv_wm_view")
    await env.admin(
        f"CREATE SCHEMA {evil}",
        f"GRANT USAGE ON SCHEMA {evil} TO PUBLIC",
        f"CREATE FUNCTION {evil}.always(int, int) RETURNS bool VOLATILE LANGUAGE sql AS "
        f"$$ SELECT pg_catalog.pg_advisory_xact_lock_shared({lock}) IS NOT NULL $$",
        f"CREATE OPERATOR {evil}.= (LEFTARG = int, RIGHTARG = int, FUNCTION = {evil}.always)",
        f"CREATE FUNCTION {evil}.path() RETURNS text VOLATILE LANGUAGE sql AS "
        f"$$ SELECT pg_catalog.set_config('search_path', '{evil}, pg_catalog, public', false) $$",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {evil} CASCADE")
    update = f"UPDATE {t} SET v = v + 1 WHERE aid = 1"
    writer = await rawpg.Raw.connect(env.proxy.port)
    env.stack.push_async_callback(writer.close)
    reader = await env.twin()
    await reader.probe(points(t, 3)[0])  # the catalog looked up: the writes are keyed
    for _ in range(2):
        writer.send(rawpg.query(update))
        await writer.until_ready()
    await env.admin(f"CREATE VIEW {view} AS SELECT {evil}.path() AS p", f"GRANT SELECT ON {view} TO PUBLIC")
    env.on_cleanup(f"DROP VIEW IF EXISTS {view}")
    holder = await env.client(via=False)
    await holder.run(f"SELECT pg_catalog.pg_advisory_lock({lock})")
    writer.send(rawpg.query(f"SELECT p FROM {view}"), rawpg.query(update))
    await writer.until_ready()  # the view ran: the search_path is the user's now
    await reader.probe(points(t, 2)[0])  # while the write waits: the committed value
    await holder.run(f"SELECT pg_catalog.pg_advisory_unlock({lock})")
    answer = await writer.until_ready()
    assert not [m for m in answer if m[0] == b"E"], answer
    assert await reader.origin(points(t, 2)[0]) == [(21,)]  # every row: the user's `=`
    for sql in points(t, 2, 3):
        await reader.check(sql, why="after a write behind a read that changed the search_path")

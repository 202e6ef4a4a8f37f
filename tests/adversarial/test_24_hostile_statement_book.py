"""The hostile review of primary-key precision, part two: the statement book (what the origin
confirmed, not what the client sent) and more regression cases. Part one and the helpers are
in test_23_hostile_key_precision.py."""

from __future__ import annotations

import pytest
from psycopg.types.numeric import Int4

from neonpoly import pgwire
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, hits, unique
from tests.adversarial.rawpg import SYNC, Raw, bind, execute, parse, query
from tests.adversarial.test_22_primary_key_precision import accounts, attack, points, warmed
from tests.adversarial.test_23_hostile_key_precision import apg, pcon, raw_run

# -- the statement book (proxy/extended.py) -------------------------------------------------


async def test_bind_of_a_statement_prepared_in_sql(env: Env) -> None:
    """FAILED BEFORE (not specific to keys: whole tables too). SQL-level PREPARE and protocol
    Parse share one namespace, but the book only learns protocol Parses. A Bind of s1 is
    refused as "a statement neonpoly has not seen" (StatementBook.plan) and contributes no
    writes, so the UPDATE it runs evicts nothing at all."""
    t = await accounts(env)
    reader = await warmed(env, [*points(t, 1, 2), f"SELECT count(*) FROM {t} WHERE v = 'all'"])
    s1 = unique("s")
    raw = await Raw.connect(env.proxy.port)
    try:
        await raw_run(raw, query(f"PREPARE {s1}(int) AS UPDATE {t} SET v = 'all' WHERE aid >= $1"))
        got = await raw_run(raw, bind("", s1, ("1",)), execute(), SYNC)
        assert b"UPDATE 4" in b"".join(body for kind, body in got if kind == b"C"), got
    finally:
        await raw.close()
    for sql in [*points(t, 1, 2), f"SELECT count(*) FROM {t} WHERE v = 'all'"]:
        await reader.check(sql, why="after a Bind of a statement PREPAREd in SQL")


async def test_deallocate_refused_in_a_failed_transaction(env: Env) -> None:
    """FAILED BEFORE (not specific to keys). `DEALLOCATE s1` in an aborted transaction fails at
    the origin, but decisions._query calls book.deallocated() before sending it. s1 (a write
    of every row) lives on at the origin; its next Bind is "a statement neonpoly has not
    seen" and evicts nothing."""
    t = await accounts(env)
    reader = await warmed(env, points(t, 1, 2, 3))
    s1 = unique("s")
    raw = await Raw.connect(env.proxy.port)
    try:
        await raw_run(raw, parse(s1, f"UPDATE {t} SET v = 'all' WHERE aid >= $1"), SYNC)
        await raw_run(raw, query("BEGIN"))
        await raw_run(raw, query("SELECT 1/0"))
        got = await raw_run(raw, query(f"DEALLOCATE {s1}"))
        assert rawpg.kinds(got).startswith(b"E"), got  # 25P02: the transaction is aborted
        await raw_run(raw, query("ROLLBACK"))
        got = await raw_run(raw, bind("", s1, ("1",)), execute(), SYNC)
        assert b"UPDATE 4" in b"".join(body for kind, body in got if kind == b"C"), got
    finally:
        await raw.close()
    for sql in points(t, 1, 2, 3):
        await reader.check(sql, why="after a Bind of a statement a refused DEALLOCATE dropped from the book")


async def test_refused_parse_poisons_another_sessions_point_read(env: Env) -> None:
    """FAILED BEFORE (not specific to keys). The book believes a Parse the origin refused (see
    test_parse_refused_by_the_origin_is_believed), and the cache key of a Bind is built from
    the book's text: rows of the SQL-prepared `aid <> $1` get stored under the key of
    `aid = $1`, and another session running the honest point read is served them."""
    t = await accounts(env)
    s1 = unique("s")
    raw = await Raw.connect(env.proxy.port)
    try:
        await raw_run(raw, query(f"PREPARE {s1}(int) AS SELECT v FROM {t} WHERE aid <> $1 ORDER BY aid LIMIT 1"))
        await raw_run(raw, parse(s1, f"SELECT v FROM {t} WHERE aid = $1 ORDER BY aid LIMIT 1"), SYNC)
        for _ in range(3):
            got = await raw_run(raw, bind("", s1, ("1",)), execute(), SYNC)
            assert rawpg.rows(got) == [[b"b"]], got
    finally:
        await raw.close()
    honest = await Raw.connect(env.proxy.port)  # same identity, an honest named statement
    try:
        await raw_run(honest, parse("honest", f"SELECT v FROM {t} WHERE aid = $1 ORDER BY aid LIMIT 1"), SYNC)
        before = hits(env.proxy)
        answer = rawpg.rows(await raw_run(honest, bind("", "honest", ("1",)), execute(), SYNC))
        hit = hits(env.proxy) > before
    finally:
        await honest.close()
    expected = await env.admin_val(f"SELECT v FROM {t} WHERE aid = 1")
    assert answer == [[expected.encode()]], f"honest point read answered {answer!r} (hit={hit}), origin: {expected!r}"


# -- more regression cases (pass today) -------------------------------------------------------


async def test_column_alias_keeping_the_key_name(env: Env) -> None:
    """The benign twin of the alias attack: the key keeps its name (first column)."""
    t = await accounts(env, "aid int PRIMARY KEY, n int, v text", ("(1, 2, 'a')", "(2, 1, 'b')"))
    reads = [f"SELECT v FROM {t} AS x(aid) WHERE aid = 1", f"SELECT v FROM {t} AS x(k, n) WHERE n = 1"]
    await attack(env, reads, [f"UPDATE {t} SET v = 'k2' WHERE aid = 2", f"UPDATE {t} SET v = 'k1' WHERE aid = 1"])


async def test_qualified_and_unqualified_names(env: Env) -> None:
    t = await accounts(env)
    reads = [
        *points(t, 1, 2),
        f"SELECT v FROM public.{t} WHERE aid = 1",
        f"SELECT x.v FROM public.{t} x WHERE x.aid = 2",
    ]
    await attack(env, reads, [f"UPDATE public.{t} SET v = 'q' WHERE aid = 1", f"DELETE FROM {t} AS d WHERE d.aid = 2"])


async def test_explain_analyze_writes(env: Env) -> None:
    t = await accounts(env)
    await attack(
        env,
        points(t, 1, 2, 3),
        [
            f"EXPLAIN ANALYZE UPDATE {t} SET v = 'ex' WHERE aid = 1",
            f"EXPLAIN ANALYZE UPDATE {t} SET v = 'ex2' WHERE aid > 1",
        ],
    )


async def test_commit_and_chain_after_keyed_write(env: Env) -> None:
    t = await accounts(env)
    reader = await warmed(env, points(t, 1, 2))
    writer = await env.client()
    await writer.run("BEGIN")
    await writer.run(f"UPDATE {t} SET v = 'chained' WHERE aid = 1")
    for sql in points(t, 1, 2):
        await reader.probe(sql, require_hit=False)
    await writer.run("COMMIT AND CHAIN")
    for sql in points(t, 1, 2):
        await reader.check(sql, why="after COMMIT AND CHAIN")
    await writer.run(f"UPDATE {t} SET v = 'chained 2' WHERE aid = 2")
    await writer.run("COMMIT")
    for sql in points(t, 1, 2):
        await reader.check(sql, why="after the chained transaction's COMMIT")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_executemany_keyed_writes(env: Env, driver: str) -> None:
    t = await accounts(env)
    reader = await warmed(env, [*points(t, 1, 2, 3, 4), f"SELECT count(*) FROM {t}"])
    writer = await env.client(driver="asyncpg" if driver == "asyncpg" else "psycopg")
    if driver == "asyncpg":
        await apg(writer).executemany(f"UPDATE {t} SET v = $2 WHERE aid = $1", [(1, "m1"), (3, "m3")])
        await apg(writer).executemany(f"INSERT INTO {t} (aid, v) VALUES ($1, $2)", [(5, "i5")])
    else:
        async with pcon(writer).cursor() as cur:
            await cur.executemany(f"UPDATE {t} SET v = %s WHERE aid = %s", [("m1", 1), ("m3", 3)])
            await cur.executemany(f"DELETE FROM {t} WHERE aid = %s", [(2,)])
    for sql in [*points(t, 1, 2, 3, 4), f"SELECT count(*) FROM {t}"]:
        await reader.check(sql, why="after executemany of keyed writes")


async def test_asyncpg_point_reads_after_key_moves_in_binary(env: Env) -> None:
    t = await accounts(env)
    reader = await env.twin(driver="asyncpg")
    read = f"SELECT v FROM {t} WHERE aid = $1"
    for aid in (1, 2, 9):
        await reader.probe(read, (aid,))
    writer = await env.client(driver="asyncpg")
    await apg(writer).execute(f"UPDATE {t} SET aid = $2 WHERE aid = $1", 1, 9)
    await apg(writer).execute(f"INSERT INTO {t} (aid, v) VALUES ($1, 'n') ON CONFLICT (aid) DO UPDATE SET v = 'c'", 2)
    for aid in (1, 2, 9):
        await reader.check(read, (aid,), why="after binary keyed writes moving a key")


async def test_multi_statement_simple_query_mixing_keyed_and_whole(env: Env) -> None:
    t = await accounts(env)
    reader = await warmed(env, points(t, 1, 2, 3))
    writer = await env.client()
    await writer.run(f"UPDATE {t} SET v = 'k' WHERE aid = 1; UPDATE {t} SET v = 'w' WHERE aid > 1")
    for sql in points(t, 1, 2, 3):
        await reader.check(sql, why="after a multi-statement query")


@pytest.mark.parametrize("protocol", ["simple", "extended"])
async def test_operator_created_on_a_stale_search_path(env: Env, protocol: str) -> None:
    """Passes today, narrowly. The writer's search_path names a schema that does not exist yet; its
    identity (current_schemas(false)) holds pg_catalog and public only. Another session then
    creates that schema with an `=` for integers that is always true (DDL through neonpoly:
    the epoch moves, the book forgets), and a reader's lookup teaches the book the table and
    the new rival. The writer's next statement is a keyed UPDATE: decisions._query calls
    _note_effects -> _keyed_write before _cache_decision notices the identity's epoch is
    old, so the rival is checked against the stale schemas and the write IS judged keyed
    (t@1, t#rows). What saves it: the same request's _cache_decision then forgets the stale
    identity, resolves the trusted `=` with schemas None, finds the rival, and evicts the
    database (_runs_code) before the UPDATE is sent. Keep: reordering those two calls
    breaks it."""
    t = await accounts(env)
    evil = unique("adv_late")
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {evil} CASCADE")
    writer = await env.twin()
    await writer.both(f"SET search_path = {evil}, pg_catalog, public")
    await writer.probe(f"SELECT v FROM {t} WHERE aid = 4")  # a hit: the identity is known
    ddl = await env.client()
    await ddl.run(f"CREATE SCHEMA {evil}")
    await ddl.run(f"GRANT USAGE ON SCHEMA {evil} TO PUBLIC")
    await ddl.run(f"CREATE FUNCTION {evil}.always(int, int) RETURNS bool IMMUTABLE LANGUAGE sql AS $$ SELECT true $$")
    await ddl.run(f"CREATE OPERATOR {evil}.= (LEFTARG = int, RIGHTARG = int, FUNCTION = {evil}.always)")
    reader = await warmed(env, points(t, 1, 2, 3))  # its lookups teach the book t and the rival
    if protocol == "simple":
        await writer.via.run(f"UPDATE {t} SET v = 'everyone' WHERE aid = 1")
    else:
        await pcon(writer.via).execute(f"UPDATE {t} SET v = 'everyone' WHERE aid = %s", (Int4(1),))
    assert await writer.direct.rows(f"SELECT count(*) FROM public.{t} WHERE v OPERATOR(pg_catalog.=) 'everyone'") == [
        (4,)
    ]
    for sql in points(t, 1, 2, 3):
        await reader.check(sql, why="after a keyed UPDATE whose = appeared after the writer's identity was learned")


@pytest.mark.parametrize(
    "rewrite",
    [
        "VACUUM FULL {t}",
        "VACUUM (FULL, ANALYZE) {t}",
        "CLUSTER {t} USING {t}_pkey",
        "ALTER TABLE {t} ALTER v TYPE varchar",
    ],
)
async def test_table_rewrite_moves_every_ctid(env: Env, rewrite: str) -> None:
    """Was stale (fixed) for VACUUM FULL and CLUSTER (not specific to keys: any cached read of
    ctid, point or whole). Both rewrite the heap, so every row's ctid changes, but they were
    classified as maintenance statements with no effects, so nothing was evicted. Now
    statements.py treats them as writes of the tables named (of the database when none is).
    ALTER TABLE … TYPE (a rewrite that is DDL) always passed."""
    t = await accounts(env)
    await env.admin(f"DELETE FROM {t} WHERE aid = 1")  # a hole, so the rewrite moves rows
    await attack(
        env, [f"SELECT ctid FROM {t} WHERE aid = 3", f"SELECT ctid::text FROM {t} ORDER BY aid"], [rewrite.format(t=t)]
    )


async def test_raw_keyed_write_ended_by_flush_then_whole_write(env: Env) -> None:
    """A keyed write sent with Flush (no Sync: the implicit transaction stays open), a read of
    its key while it is open, then a write of every row and the Sync."""
    t = await accounts(env)
    reader = await warmed(env, points(t, 1, 2, 3))
    raw = await Raw.connect(env.proxy.port)
    flush = pgwire.frame(b"H")
    try:
        raw.send(parse("", f"UPDATE {t} SET v = 'flushed' WHERE aid = $1"), bind("", "", ("1",)), execute(), flush)
        while (await raw.message())[0] != b"C":
            pass
        for sql in points(t, 1, 2):  # the write is not committed yet: the old values, not cached
            await reader.check(sql, why="while a flushed keyed write is uncommitted")
        await raw_run(
            raw, parse("", f"UPDATE {t} SET v = 'all' WHERE aid >= $1"), bind("", "", ("2",)), execute(), SYNC
        )
    finally:
        await raw.close()
    for sql in points(t, 1, 2, 3):
        await reader.check(sql, why="after a flushed keyed write and a synced write of every row")


async def test_keyed_write_in_a_pipeline_that_fails_later(env: Env) -> None:
    """[keyed write, division by zero, Sync]: the implicit transaction rolls back."""
    t = await accounts(env)
    reader = await warmed(env, points(t, 1, 2))
    raw = await Raw.connect(env.proxy.port)
    try:
        got = await raw_run(
            raw,
            parse("", f"UPDATE {t} SET v = 'undone' WHERE aid = $1"),
            bind("", "", ("1",)),
            execute(),
            parse("", "SELECT 1/0"),
            bind("", ""),
            execute(),
            SYNC,
        )
        assert b"E" in rawpg.kinds(got)
        await raw_run(
            raw, parse("", f"UPDATE {t} SET v = 'kept' WHERE aid = $1"), bind("", "", ("2",)), execute(), SYNC
        )
    finally:
        await raw.close()
    for sql in points(t, 1, 2):
        await reader.check(sql, why="after a rolled-back pipeline and a keyed write")


async def test_cascade_from_a_partition_of_a_referenced_partitioned_table(env: Env) -> None:
    p = unique("adv_refp")
    await env.admin(
        f"CREATE TABLE {p} (aid int PRIMARY KEY, v text) PARTITION BY RANGE (aid)",
        f"CREATE TABLE {p}_a PARTITION OF {p} FOR VALUES FROM (0) TO (10)",
        f"INSERT INTO {p} VALUES (1, 'a'), (2, 'b')",
        f"GRANT ALL ON {p}, {p}_a TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {p} CASCADE")
    child = await env.table(
        "adv_refc", f"cid int PRIMARY KEY, aid int REFERENCES {p}(aid) ON DELETE CASCADE", "(10, 1)", "(20, 2)"
    )
    reads = [*points(f"{p}_a", 1, 2), f"SELECT aid FROM {child} WHERE cid = 10", f"SELECT count(*) FROM {child}"]
    await attack(env, reads, [f"DELETE FROM {p}_a WHERE aid = 1"])


async def test_self_reference_through_the_partitioned_parent(env: Env) -> None:
    p = unique("adv_selfp")
    await env.admin(
        f"CREATE TABLE {p} (aid int PRIMARY KEY, up int, v text) PARTITION BY RANGE (aid)",
        f"CREATE TABLE {p}_a PARTITION OF {p} FOR VALUES FROM (0) TO (10)",
        f"ALTER TABLE {p} ADD FOREIGN KEY (up) REFERENCES {p}(aid) ON DELETE CASCADE",
        f"INSERT INTO {p} VALUES (1, NULL, 'a'), (2, 1, 'b'), (3, NULL, 'c')",
        f"GRANT ALL ON {p}, {p}_a TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {p} CASCADE")
    await attack(env, points(f"{p}_a", 1, 2, 3), [f"DELETE FROM {p}_a WHERE aid = 1"])


async def test_row_security_on_the_parent_of_a_keyed_partition(env: Env) -> None:
    role = await env.role()
    p = unique("adv_rlsp")
    await env.admin(
        f"CREATE TABLE {p} (aid int PRIMARY KEY, owner text, v text) PARTITION BY RANGE (aid)",
        f"CREATE TABLE {p}_a PARTITION OF {p} FOR VALUES FROM (0) TO (10)",
        f"INSERT INTO {p} VALUES (1, '{role}', 'a'), (2, 'x', 'b')",
        f"ALTER TABLE {p} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY mine ON {p} USING (owner = current_user)",
        f"GRANT ALL ON {p}, {p}_a TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {p} CASCADE")
    reader = await env.twin(env.login(role))
    reads = [f"SELECT v FROM {p} WHERE aid = 1", f"SELECT count(*) FROM {p}"]
    for sql in reads:
        await reader.probe(sql)
    writer = await env.client()
    await writer.run(f"UPDATE {p}_a SET owner = 'x' WHERE aid = 1")
    await writer.run(f"UPDATE {p}_a SET owner = '{role}' WHERE aid = 2")
    for sql in reads:
        await reader.check(sql, why="after keyed writes to a partition of a table with row security")

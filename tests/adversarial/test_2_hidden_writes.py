"""Class 2: writes that go through neonpoly but that its classifier may not see as writes.

Shape of every case: a reader twin caches a read until a provable hit; a write goes through
neonpoly (once); the reader's next answer must equal the origin's.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import counter, warm_counter

# --- EXPLAIN ANALYZE ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "explain",
    [
        "EXPLAIN ANALYZE",
        "EXPLAIN (ANALYZE true, FORMAT JSON)",
        "EXPLAIN (FORMAT JSON, ANALYZE)",
        "EXPLAIN (ANALYZE on, COSTS off)",
        "EXPLAIN (ANALYZE 1)",
        "EXPLAIN ANALYZE VERBOSE",
    ],
)
async def test_explain_analyze_of_an_update(env: Env, explain: str) -> None:
    table = await env.table("adv_ex", "id int PRIMARY KEY, v int", "(1, 0)")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"{explain} UPDATE {table} SET v = v + 1 WHERE id = 1")
    await reader.check(read, why=f"after {explain} UPDATE through neonpoly")


async def test_explain_analyze_1_after_analyze_0_of_the_same_shape(env: Env) -> None:
    """EXPLAIN (ANALYZE 0) does not execute; EXPLAIN (ANALYZE 1) of the same text shape does.
    A classification memo keyed by the text with numbers blanked must not mix them up."""
    table = await env.table("adv_ex", "id int PRIMARY KEY, v int", "(1, 0)")
    writer = await env.client()
    await writer.run(f"EXPLAIN (ANALYZE 0) UPDATE {table} SET v = v + 0 WHERE id = 1")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    await writer.run(f"EXPLAIN (ANALYZE 1) UPDATE {table} SET v = v + 1 WHERE id = 1")
    await reader.check(read, why="after EXPLAIN (ANALYZE 1) UPDATE (shape seen before as ANALYZE 0)")


async def test_explain_analyze_of_a_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run(f"EXPLAIN ANALYZE SELECT {fn}()")
    await reader.check(read, why=f"after EXPLAIN ANALYZE SELECT {fn}() (a function that UPDATEs)")


async def test_explain_analyze_of_a_data_modifying_cte(env: Env) -> None:
    table = await env.table("adv_ex", "id int PRIMARY KEY, v int", "(1, 0)")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"EXPLAIN ANALYZE WITH u AS (UPDATE {table} SET v = 5 RETURNING 1) SELECT * FROM u")
    await reader.check(read, why="after EXPLAIN ANALYZE of a data-modifying CTE")


# --- COPY and cursors ---------------------------------------------------------------------


async def _copy_out(env: Env, sql: str) -> list[bytes]:
    client = await env.client()
    out: list[bytes] = []
    conn = client.conn
    assert isinstance(conn, psycopg.AsyncConnection)
    cur = conn.cursor()
    async with cur.copy(sql) as copy:
        async for chunk in copy:
            out.append(bytes(chunk))
    return out


async def test_copy_of_delete_returning(env: Env) -> None:
    table = await env.table("adv_cp", "id int PRIMARY KEY, v text", "(1, 'a')", "(2, 'b')")
    reader = await env.twin()
    read = f"SELECT id, v FROM {table} ORDER BY id"
    await reader.probe(read)
    await _copy_out(env, f"COPY (DELETE FROM {table} WHERE id = 1 RETURNING *) TO STDOUT")
    await reader.check(read, why="after COPY (DELETE ... RETURNING *) TO STDOUT through neonpoly")


async def test_copy_of_update_returning(env: Env) -> None:
    table = await env.table("adv_cp", "id int PRIMARY KEY, v text", "(1, 'a')")
    reader = await env.twin()
    read = f"SELECT v FROM {table}"
    await reader.probe(read)
    await _copy_out(env, f"COPY (UPDATE {table} SET v = 'z' RETURNING v) TO STDOUT")
    await reader.check(read, why="after COPY (UPDATE ... RETURNING) TO STDOUT")


async def test_copy_of_a_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    await _copy_out(env, f"COPY (SELECT {fn}()) TO STDOUT")
    await reader.check(read, why=f"after COPY (SELECT {fn}()) TO STDOUT")


async def test_declare_with_hold_cursor_over_a_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run(f"DECLARE c CURSOR WITH HOLD FOR SELECT {fn}()")  # runs it at COMMIT (holdable)
    await writer.rows("FETCH ALL FROM c")
    await writer.run("CLOSE c")
    await reader.check(read, why=f"after DECLARE ... WITH HOLD FOR SELECT {fn}() and FETCH")


async def test_cursor_in_a_transaction_over_a_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run("BEGIN")
    await writer.run(f"DECLARE c CURSOR FOR SELECT {fn}()")
    await writer.rows("FETCH 1 FROM c")
    await writer.run("COMMIT")
    await reader.check(read, why=f"after BEGIN; DECLARE c CURSOR FOR SELECT {fn}(); FETCH; COMMIT")


# --- sequences ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write", ["SELECT nextval('{s}')", "SELECT setval('{s}', 42)", "INSERT INTO {t} DEFAULT VALUES"]
)
async def test_sequence_last_value_after(env: Env, write: str) -> None:
    table = await env.table("adv_seq", "id serial PRIMARY KEY")
    seq = f"{table}_id_seq"
    await env.admin(f"GRANT ALL ON SEQUENCE {seq} TO PUBLIC")
    reader = await env.twin()
    # Teach neonpoly both relations first: a write to a relation it has not looked up yet
    # evicts everything, which would hide the bug.
    await reader.probe(f"SELECT count(*) FROM {table}")
    read = f"SELECT last_value, is_called FROM {seq}"
    # A sequence changes without any write neonpoly could see: never served from cache.
    _, hit = await reader.probe(read, require_hit=False)
    assert not hit
    writer = await env.client()
    await writer.run(write.format(s=seq, t=table))
    await reader.check(read, why=f"after {write.format(s=seq, t=table)} through neonpoly")


# --- functions and views that write ---------------------------------------------------------


async def test_select_of_a_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.rows(f"SELECT {fn}()")
    await reader.check(read, why=f"after SELECT {fn}()")


async def test_select_of_a_writing_function_extended_protocol(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    writer = await env.client(driver="asyncpg")
    await writer.rows(f"SELECT {fn}() WHERE $1::int = 1", (1,))
    await reader.check(read, why=f"after asyncpg SELECT {fn}()")


async def test_view_over_a_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    view = unique("adv_v")
    await env.admin(f"CREATE VIEW {view} AS SELECT {fn}() AS n", f"GRANT SELECT ON {view} TO PUBLIC")
    env.on_cleanup(f"DROP VIEW IF EXISTS {view}")
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.rows(f"SELECT n FROM {view}")
    await reader.check(read, why=f"after SELECT from a view over {fn}()")


async def test_writing_function_called_through_an_operator(env: Env) -> None:
    """A user-defined operator whose function writes: no function name in the text."""
    table, fn = await counter(env)
    op_fn = unique("adv_opfn")
    await env.admin(
        f"CREATE FUNCTION {op_fn}(int, int) RETURNS int VOLATILE LANGUAGE sql AS $$ SELECT {fn}() $$",
        f"CREATE OPERATOR public.### (LEFTARG = int, RIGHTARG = int, FUNCTION = {op_fn})",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS {op_fn}(int, int) CASCADE")
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.rows("SELECT 1 ### 2")
    await reader.check(read, why="after SELECT 1 ### 2 (operator over a writing function)")


@pytest.mark.parametrize(
    "write",
    [
        "WITH d AS (UPDATE {t} SET v = 'cte' RETURNING 1) SELECT count(*) FROM d",
        "WITH d AS (DELETE FROM {t} RETURNING 1) SELECT 1",
        "SELECT v INTO TEMP {x} FROM {t}; UPDATE {t} SET v = 'multi'",
        "INSERT INTO {t} VALUES (1, 'upsert') ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        "MERGE INTO {t} USING (VALUES (1, 'merged')) s(id, v) ON {t}.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
        "UPDATE {t} SET v = 'quoted' WHERE id = 1 AND 'x;y' <> $q$;$q$",
        "/* a comment; */ UPDATE {t} SET v = 'commented'",
        "UPDATE public.{t} SET v = 'qualified'",
        'UPDATE "{t}" SET v = \'quoted name\'',
        "UPDATE {t} AS alias SET v = 'aliased'",
        "UPDATE ONLY {t} SET v = 'only'",
        "DELETE FROM {t} USING (SELECT 1) s",
        "TRUNCATE {t}",
        "UPDATE U&\"\\0061{u}\" SET v = 'unicode escape'",
    ],
)
async def test_plain_write_forms(env: Env, write: str) -> None:
    table = await env.table("adv_w", "id int PRIMARY KEY, v text", "(1, 'old')")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(write.format(t=table, u=table[1:], x=unique("adv_into")))
    await reader.check(read, why=f"after {write!r}")


async def test_select_into_and_create_table_as_with_writing_function(env: Env) -> None:
    table, fn = await counter(env)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run(f"SELECT {fn}() AS n INTO TEMP {unique('adv_into')}")
    await reader.check(read, why="after SELECT writing_function() INTO")
    await writer.run(f"CREATE TEMP TABLE {unique('adv_ctas')} AS SELECT {fn}() AS n")
    await reader.check(read, why="after CREATE TABLE AS SELECT writing_function()")


# --- writes that reach other tables ---------------------------------------------------------


async def test_rule_writes_another_table(env: Env) -> None:
    source = await env.table("adv_src", "v int")
    audit = await env.table("adv_audit", "v int")
    await env.admin(
        f"CREATE RULE {unique('adv_r')} AS ON INSERT TO {source} DO ALSO INSERT INTO {audit} VALUES (NEW.v)"
    )
    reader = await env.twin()
    read = f"SELECT count(*) FROM {audit}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"INSERT INTO {source} VALUES (1)")
    await reader.check(read, why="after an INSERT whose rule writes another table")


async def test_trigger_writes_another_table(env: Env) -> None:
    source = await env.table("adv_src", "v int")
    audit = await env.table("adv_audit", "v int")
    fn = unique("adv_trg")
    await env.admin(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN INSERT INTO {audit} VALUES (NEW.v); RETURN NEW; END $$",
        f"CREATE TRIGGER {fn} AFTER INSERT ON {source} FOR EACH ROW EXECUTE FUNCTION {fn}()",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")
    reader = await env.twin()
    read = f"SELECT count(*) FROM {audit}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"INSERT INTO {source} VALUES (1)")
    await reader.check(read, why="after an INSERT whose trigger writes another table")


@pytest.mark.parametrize("action", ["CASCADE", "SET NULL"])
async def test_foreign_key_on_delete(env: Env, action: str) -> None:
    parent = await env.table("adv_par", "id int PRIMARY KEY", "(1)", "(2)")
    child = await env.table("adv_chi", f"id int, pid int REFERENCES {parent} ON DELETE {action}", "(10, 1)", "(20, 2)")
    reader = await env.twin()
    read = f"SELECT id, pid FROM {child} ORDER BY id"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"DELETE FROM {parent} WHERE id = 1")
    await reader.check(read, why=f"after DELETE of a parent row (ON DELETE {action})")


@pytest.mark.parametrize("where", ["parent", "child"])
async def test_partitions(env: Env, where: str) -> None:
    parent = unique("adv_part")
    await env.admin(
        f"CREATE TABLE {parent} (id int, v text) PARTITION BY RANGE (id)",
        f"CREATE TABLE {parent}_a PARTITION OF {parent} FOR VALUES FROM (0) TO (100)",
        f"INSERT INTO {parent} VALUES (1, 'old')",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {parent} CASCADE")
    reads = [f"SELECT v FROM {parent} WHERE id = 1", f"SELECT v FROM {parent}_a WHERE id = 1"]
    reader = await env.twin()
    for read in reads:
        await reader.probe(read)
    writer = await env.client()
    target = parent if where == "parent" else f"{parent}_a"
    await writer.run(f"UPDATE {target} SET v = 'new' WHERE id = 1")
    for read in reads:
        await reader.check(read, why=f"after UPDATE of the {where}")


async def test_inheritance_child_write_seen_by_parent_read(env: Env) -> None:
    parent = await env.table("adv_inh", "id int, v text")
    child = unique("adv_inhc")
    await env.admin(f"CREATE TABLE {child} () INHERITS ({parent})", f"INSERT INTO {child} VALUES (1, 'old')")
    env.on_cleanup(f"DROP TABLE IF EXISTS {child}")
    reader = await env.twin()
    read = f"SELECT v FROM {parent}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"UPDATE {child} SET v = 'new'")
    await reader.check(read, why="after UPDATE of an inheritance child")


# --- text PostgreSQL splits differently from a naive tokenizer --------------------------------


async def test_backslash_quote_with_standard_conforming_strings_off(env: Env) -> None:
    """With standard_conforming_strings = off, 'a\\' does not end at the second quote:
    PostgreSQL sees SELECT '...'; UPDATE ...; while a standard tokenizer sees one SELECT."""
    table = await env.table("adv_scs", "v int", "(0)")
    reader = await env.twin()
    read = f"SELECT v FROM {table}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run("SET standard_conforming_strings = off")
    await writer.run("SET escape_string_warning = off")
    await writer.run(f"SELECT 'a\\' AS x, ' ; UPDATE {table} SET v = v + 1; -- '")
    assert (await reader.origin(read)) == [(1,)], "the UPDATE did not run: the case proves nothing"
    await reader.check(read, why="after an UPDATE hidden behind \\' with standard_conforming_strings off")


@pytest.mark.parametrize(
    "sneaky",
    [
        "SELECT 1 /* /* */ AS x, ' */ ; UPDATE {t} SET v = v + 1 ; -- '",
        "SELECT $A$ $a$ AS x, ' $A$; UPDATE {t} SET v = v + 1; -- '",
        "SELECT E'a\\' AS x, ' ; UPDATE {t} SET v = v + 1; -- '",
        "SELECT 1 AS \"x\"\"; UPDATE {t} SET v = v + 1; --\"",
        "SELECT 1; UPDATE {t} SET v = v + 1",
    ],
    ids=["nested-comment", "dollar-tag-case", "e-string", "doubled-quote-identifier", "plain-multi"],
)
async def test_write_hidden_by_lexical_tricks(env: Env, sneaky: str) -> None:
    table = await env.table("adv_lex", "v int", "(0)")
    reader = await env.twin()
    read = f"SELECT v FROM {table}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(sneaky.format(t=table))
    await reader.check(read, why=f"after {sneaky!r}")


# --- transaction control ----------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["COMMIT", "COMMIT AND CHAIN", "END AND CHAIN", "ROLLBACK AND CHAIN"])
async def test_transaction_endings(env: Env, ending: str) -> None:
    """W updates inside a transaction; R caches the (still old) row meanwhile; after W's
    COMMIT the row is new and R must see it, also when the COMMIT chains a new transaction."""
    table = await env.table("adv_tx", "id int PRIMARY KEY, v text", "(1, 'old')")
    writer = await env.client()
    await writer.run("BEGIN")
    await writer.run(f"UPDATE {table} SET v = 'new' WHERE id = 1")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    rows, _ = await reader.probe(read)
    assert rows == [("old",)]
    await writer.run(ending)
    await reader.check(read, why=f"after {ending} of a transaction that updated the row")
    await writer.run("COMMIT")
    await reader.check(read, why="after the chained transaction's COMMIT")


async def test_begin_inside_a_multi_statement_string(env: Env) -> None:
    table = await env.table("adv_tx", "id int PRIMARY KEY, v text", "(1, 'old')")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"SELECT 1; BEGIN; UPDATE {table} SET v = 'new' WHERE id = 1; COMMIT")
    await reader.check(read, why="after SELECT; BEGIN; UPDATE; COMMIT in one string")


async def test_prepared_update_executed(env: Env) -> None:
    table = await env.table("adv_prep", "id int PRIMARY KEY, v int", "(1, 0)")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"PREPARE p AS UPDATE {table} SET v = v + 1 WHERE id = 1")
    await writer.run("EXECUTE p")
    await reader.check(read, why="after PREPARE p AS UPDATE ...; EXECUTE p")


async def test_procedure_that_commits(env: Env) -> None:
    table = await env.table("adv_proc", "id int PRIMARY KEY, v int", "(1, 0)")
    proc = unique("adv_proc")
    await env.admin(
        f"CREATE PROCEDURE {proc}() LANGUAGE plpgsql AS "
        f"$$ BEGIN UPDATE {table} SET v = 1; COMMIT; UPDATE {table} SET v = 2; COMMIT; END $$"
    )
    env.on_cleanup(f"DROP PROCEDURE IF EXISTS {proc}()")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"CALL {proc}()")
    await reader.check(read, why="after CALL of a procedure that commits twice")

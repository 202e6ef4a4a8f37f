"""Class 8: writes through neonpoly that run code of the user's without a trigger or rule.

The relation lookup calls a table "opaque" (its writes evict the whole database and make the
session learn its identity again) only for triggers and rules. A plain INSERT or UPDATE also
runs column DEFAULTs, CHECK constraints, domain CHECKs, the WHERE clause of an auto-updatable
view and row-level-security policies; any of them may call a function that writes another
table or changes the session's settings. Every case first lets neonpoly look the written
table up (so the write is judged by the catalog, not evicted blindly as an unknown table).
"""

from __future__ import annotations

import psycopg
import pytest

from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import counter, make_known, warm_counter

# What the written table looks like; {fn} bumps the counter and returns the new n.
WRITE_PATHS = [
    ("default", "id int, v int DEFAULT {fn}()", "INSERT INTO {t} (id) VALUES (1)"),
    ("check", "id int, v int CHECK ({fn}() > 0)", "INSERT INTO {t} (id, v) VALUES (1, 1)"),
    ("domain-check", "id int, v {d}", "INSERT INTO {t} (id, v) VALUES (1, 1)"),
    ("update-default", "id int, v int DEFAULT {fn}()", "UPDATE {t} SET v = DEFAULT"),
    ("copy-from-default", "id int, v int DEFAULT {fn}()", "COPY {t} (id) FROM STDIN"),
]


@pytest.mark.parametrize("shape,columns,write", WRITE_PATHS, ids=[w[0] for w in WRITE_PATHS])
async def test_write_runs_a_function_that_writes_another_table(env: Env, shape: str, columns: str, write: str) -> None:
    """A write to table t runs {fn}() (which UPDATEs the counter): the counter's cached read
    must not survive it."""
    table, fn = await counter(env)
    domain = unique("adv_dom")
    await env.admin(f"CREATE DOMAIN public.{domain} AS int CHECK (public.{fn}() > 0)")
    env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{domain} CASCADE")
    target = await env.table("adv_w", columns.format(fn=f"public.{fn}", d=f"public.{domain}"), "(0, 5)")
    await env.admin(f"UPDATE public.{table} SET n = 0")  # CHECKs ran for the first row
    await make_known(env, target)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    sql = write.format(t=target)
    if sql.startswith("COPY"):
        assert isinstance(writer.conn, psycopg.AsyncConnection)
        async with writer.conn.cursor() as cur, cur.copy(sql) as copy:
            await copy.write_row((1,))
    else:
        await writer.run(sql)
    assert await reader.origin(read) != [(0,)], "the write did not run the function: the case proves nothing"
    await reader.check(read, why=f"after a write whose {shape} bumped the counter")


async def test_update_through_an_auto_updatable_view_runs_its_where_clause(env: Env) -> None:
    """UPDATE v (a simple view: auto-updatable, no trigger, no rule but its SELECT rule) runs
    the view's WHERE clause, which calls the writing function."""
    table, fn = await counter(env)
    base = await env.table("adv_base", "id int, v text", "(1, 'old')")
    view = unique("adv_uv")
    await env.admin(
        f"CREATE VIEW public.{view} AS SELECT id, v FROM public.{base} WHERE public.{fn}() > 0",
        f"GRANT ALL ON public.{view} TO PUBLIC",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    await make_known(env, view)  # reading the view ran the function once
    await env.admin(f"UPDATE public.{table} SET n = 0")
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run(f"UPDATE {view} SET v = 'new' WHERE id = 1")
    assert await reader.origin(read) != [(0,)], "the view's WHERE clause did not run: the case proves nothing"
    await reader.check(read, why="after UPDATE through a view whose WHERE clause bumps the counter")


async def test_update_of_a_table_whose_policy_writes(env: Env) -> None:
    """Row-level security on t with a policy calling the writing function; a non-owner role's
    UPDATE of t evaluates the policy."""
    table, fn = await counter(env)
    role = await env.role()
    target = await env.table("adv_rls", "id int, v text", "(1, 'old')")
    await env.admin(
        f"ALTER TABLE public.{target} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON public.{target} USING (public.{fn}() > 0)",
        f"GRANT ALL ON public.{table} TO {role}",
    )
    writer = await env.client(env.login(role))
    await writer.run(f"UPDATE {target} SET v = 'warm' WHERE false")  # neonpoly looks t up
    reader, read = await warm_counter(env, table)
    await writer.run(f"UPDATE {target} SET v = 'new' WHERE id = 1")
    assert await reader.origin(read) != [(0,)], "the policy did not run: the case proves nothing"
    await reader.check(read, why="after an UPDATE whose row-level-security policy bumped the counter")


async def test_default_that_calls_set_config_on_a_known_table(env: Env) -> None:
    """Like test_1's column-DEFAULT case, but the table was looked up before: the INSERT then
    changes the session's search_path with nothing telling neonpoly to learn it again."""
    schema = unique("adv_s")
    table = unique("adv_t")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{table} (v text)",
        f"INSERT INTO public.{table} VALUES ('public')",
        f"CREATE TABLE {schema}.{table} (v text)",
        f"INSERT INTO {schema}.{table} VALUES ('{schema}')",
        f"GRANT SELECT ON public.{table}, {schema}.{table} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{table}", f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    fn = unique("adv_fn")
    await env.admin(
        f"CREATE FUNCTION public.{fn}() RETURNS int LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM set_config('search_path', '{schema}, public', false); RETURN 1; END $$"
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{fn}() CASCADE")
    log = await env.table("adv_log", f"id int, v int DEFAULT public.{fn}()")
    a = await env.twin()
    await a.both(f"INSERT INTO {log} (id, v) VALUES (0, 0)")  # no DEFAULT run: the lookup of log
    read = f"SELECT v FROM {table}"
    rows, _ = await a.probe(read)  # cached under A's identity (search_path public)
    assert rows == [("public",)]
    await a.both(f"INSERT INTO {log} (id) VALUES (1)")  # the DEFAULT moves A's search_path
    assert await a.origin(read) == [(schema,)]
    await a.check(read, why="A's search_path moved by a column DEFAULT of a table neonpoly had looked up")


async def test_dblink_exec_writes_through_a_second_connection(env: Env) -> None:
    """SELECT dblink_exec(…, 'UPDATE t …') sent through neonpoly writes t over another
    connection; neonpoly relayed the statement, so t's cached read must not survive it."""
    await env.admin("CREATE EXTENSION IF NOT EXISTS dblink SCHEMA public")
    env.on_cleanup("DROP EXTENSION IF EXISTS dblink")
    table = await env.table("adv_w", "id int, v text", "(1, 'old')")
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    writer = await env.client()
    conninfo = f"host=127.0.0.1 port={env.pg.port} dbname=app user=trust_user"
    await env.admin(f"GRANT UPDATE ON public.{table} TO trust_user")
    await writer.rows(f"SELECT dblink_exec('{conninfo}', 'UPDATE public.{table} SET v = ''new''')")
    assert await reader.origin(read) == [("new",)]
    await reader.check(read, why="after SELECT dblink_exec(… UPDATE …) through neonpoly")


# A user function whose name neonpoly takes for a builtin it knows to be volatile (so it is
# only "not cached", never "may write"): random(int), a name with a volatile prefix.
VOLATILE_LOOKALIKES = ["random", "lo_touch", "pg_stat_bump", "txid_note", "now"]


@pytest.mark.parametrize("name", VOLATILE_LOOKALIKES)
async def test_user_function_named_like_a_volatile_builtin_writes(env: Env, name: str) -> None:
    table, _ = await counter(env)
    await env.admin(
        f"CREATE FUNCTION public.{name}(step int) RETURNS int VOLATILE LANGUAGE sql AS "
        f"$$ UPDATE public.{table} SET n = n + step RETURNING n $$",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{name}(int)")
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.rows(f"SELECT {name}(1)")
    await reader.check(read, why=f"after SELECT {name}(1), a user function that UPDATEs the counter")


async def test_user_function_named_like_a_volatile_builtin_sets_search_path(env: Env) -> None:
    """public.random(int) calls set_config: the session's identity must be learned again."""
    schema = unique("adv_s")
    table = unique("adv_t")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{table} (v text)",
        f"INSERT INTO public.{table} VALUES ('public')",
        f"CREATE TABLE {schema}.{table} (v text)",
        f"INSERT INTO {schema}.{table} VALUES ('{schema}')",
        f"GRANT SELECT ON public.{table}, {schema}.{table} TO PUBLIC",
        f"CREATE FUNCTION public.random(step int) RETURNS text LANGUAGE sql AS "
        f"$$ SELECT set_config('search_path', '{schema}, public', false) $$",
    )
    env.on_cleanup(
        f"DROP TABLE IF EXISTS public.{table}",
        f"DROP SCHEMA IF EXISTS {schema} CASCADE",
        "DROP FUNCTION IF EXISTS public.random(int)",
    )
    a = await env.twin()
    read = f"SELECT v FROM {table}"
    await a.probe(read)
    await a.both("SELECT random(1)")
    assert await a.origin(read) == [(schema,)]
    await a.check(read, why="after SELECT random(1) (a user function calling set_config)")


async def test_implicit_cast_with_a_writing_function(env: Env) -> None:
    """A cast between builtin types added by the DBA (smallint to text, AS IMPLICIT, through a
    function): length(s) of a smallint column names only builtins but runs that function."""
    table, fn = await counter(env)
    cast_fn = unique("adv_cast")
    await env.admin(
        f"CREATE FUNCTION public.{cast_fn}(x int2) RETURNS text VOLATILE LANGUAGE sql "
        f"AS $$ SELECT public.{fn}(); SELECT x::int4::text $$",
        f"CREATE CAST (int2 AS text) WITH FUNCTION public.{cast_fn}(int2) AS IMPLICIT",
    )
    env.on_cleanup("DROP CAST IF EXISTS (int2 AS text)", f"DROP FUNCTION IF EXISTS public.{cast_fn}(int2)")
    source = await env.table("adv_src", "s int2", "(42)")
    await make_known(env, source)
    # While such a cast exists, no query in the database is trusted (any may run it): the
    # counter's read is never served from cache, so it cannot go stale.
    reader = await env.twin()
    read = f"SELECT n FROM {table}"
    _, hit = await reader.probe(read, require_hit=False)
    assert not hit
    writer = await env.client()
    await writer.rows(f"SELECT length(s) FROM {source}")
    assert await reader.origin(read) != [(0,)], "the cast did not run: the case proves nothing"
    await reader.check(read, why="after SELECT length(smallint column) through a DBA's implicit cast")


# --- controls: writes that reach further and are handled ---------------------------------


async def test_foreign_key_on_update_cascade_across_schemas(env: Env) -> None:
    schema = unique("adv_s")
    parent = unique("adv_par")
    child = unique("adv_chi")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{parent} (id int PRIMARY KEY)",
        f"INSERT INTO public.{parent} VALUES (1)",
        f"CREATE TABLE {schema}.{child} (id int, pid int REFERENCES public.{parent} ON UPDATE CASCADE)",
        f"INSERT INTO {schema}.{child} VALUES (10, 1)",
        f"GRANT ALL ON public.{parent}, {schema}.{child} TO PUBLIC",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE", f"DROP TABLE IF EXISTS public.{parent}")
    await make_known(env, parent)
    reader = await env.twin()
    read = f"SELECT pid FROM {schema}.{child}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"UPDATE {parent} SET id = 2")
    await reader.check(read, why="after UPDATE of the parent key (ON UPDATE CASCADE into another schema)")


async def test_rename_table_then_create_one_with_the_old_name(env: Env) -> None:
    table = await env.table("adv_w", "v text", "('first')")
    reader = await env.twin()
    read = f"SELECT v FROM {table}"
    await reader.probe(read)
    writer = await env.client()
    moved = unique("adv_moved")
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{moved}")
    await writer.run(f"ALTER TABLE {table} RENAME TO {moved}")
    await writer.run(f"CREATE TABLE {table} (v text)")
    await writer.run(f"INSERT INTO {table} VALUES ('second')")
    await reader.check(read, why="after RENAME and a new table with the old name")
    await reader.probe(read)
    await writer.run(f"INSERT INTO {moved} VALUES ('into the renamed one')")
    await reader.check(read, why="after a write to the renamed table")


async def test_view_recreated_over_another_table(env: Env) -> None:
    first = await env.table("adv_a", "v text", "('a')")
    second = await env.table("adv_b", "v text", "('b')")
    view = unique("adv_v")
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    await env.admin(f"CREATE VIEW public.{view} AS SELECT v FROM public.{first}", f"GRANT SELECT ON {view} TO PUBLIC")
    reader = await env.twin()
    read = f"SELECT v FROM {view}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"DROP VIEW {view}; CREATE VIEW {view} AS SELECT v FROM {second}")
    await reader.check(read, why="after DROP/CREATE of the view over another table")
    await reader.probe(read)
    await writer.run(f"UPDATE {second} SET v = 'b2'")
    await reader.check(read, why="after a write to the new base table")


async def test_merge_with_a_cte_and_truncate_cascade(env: Env) -> None:
    parent = await env.table("adv_par", "id int PRIMARY KEY, v text", "(1, 'old')")
    child = await env.table("adv_chi", f"id int, pid int REFERENCES {parent}", "(10, 1)")
    source = await env.table("adv_src", "id int, v text", "(1, 'merged')")
    reader = await env.twin()
    reads = [f"SELECT v FROM {parent}", f"SELECT count(*) FROM {child}"]
    for read in reads:
        await reader.probe(read)
    writer = await env.client()
    await writer.run(
        f"WITH s AS (SELECT id, v FROM {source}) MERGE INTO {parent} p USING s ON p.id = s.id "
        f"WHEN MATCHED THEN UPDATE SET v = s.v"
    )
    await reader.check(reads[0], why="after MERGE … USING a CTE")
    await reader.probe(reads[1])
    await writer.run(f"TRUNCATE {parent} CASCADE")
    for read in reads:
        await reader.check(read, why="after TRUNCATE … CASCADE")

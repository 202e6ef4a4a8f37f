"""Hostile review of stop 25: writes that run code of the user's through the relation they
name, where the relation book judged only its triggers, rules, defaults, checks and policies.

FAILED BEFORE (a cached read of a counter stale after a write through neonpoly that bumped
it), each the second write once the relation was looked up (the first, to a relation not
known yet, evicts everything):

* UPDATE, DELETE and UPDATE … RETURNING of an automatically updatable view whose WHERE or
  select list calls a function of the user's (the rewriter adds the view's quals to the
  write: the function runs per row), an INSERT into one WITH CHECK OPTION (the quals check
  the new row), and a view over such a view: a view's definition was judged for reads
  (`Relation.runs_code`) but a write to it reached only its base tables;
* an UPDATE, by a role its policy applies to, of a table whose policy reads such a view (the
  policy's text names only the view, which the write's own judgement never looked into).

Fixed by making a relation whose read runs code opaque to writes (relations.py).

Also FAILED BEFORE, fixed (statements.py): a superuser's UPDATE of pg_description through
neonpoly (a COMMENT by hand, schema-qualified or not) evicted only the catalog's own name,
which no cached read carries, so obj_description()'s cached answer stayed stale. A write to a
system catalog is now DDL of every database.

Also FAILED BEFORE, fixed (statements.py): COPY (…) TO PROGRAM and COPY t FROM PROGRAM run a
shell command on the server, which may connect back and write anything (psql bumps the
counter, as dblink_exec did in adversarial 27); COPY TO was judged a read, COPY FROM a write
of its table only. Now judged as server code (CALL, DO).

Also FAILED BEFORE, fixed (statements.py): REINDEX TABLE, ANALYZE and VACUUM (ANALYZE) were
notaquery and evicted nothing, though REINDEX and ANALYZE evaluate an expression index (a
lying IMMUTABLE function of the user's bumped the counter), and ANALYZE changes plans: a read
without ORDER BY came back in the index's order directly, in heap order from the cache. Now a
write of the tables they name (opaque when their indexes run code of the user's), of every
table when none is named.

Also FAILED BEFORE, fixed (relation_lookup.py): a foreign key takes its equality from its
parent's unique index's operator class; a non-default one with a plpgsql `=` ran in the check
of an INSERT into the child, which had no trigger, index or code of its own and evicted only
itself. A write to either side of such a key is now opaque. And ANALYZE computing an
expression's extended statistics (CREATE STATISTICS … ON (f(id))) ran the lying function:
those expressions are now judged as a write's code, as index expressions are.

Also FAILED BEFORE, fixed (relation_lookup.py, relations.py): a plain read answered by an
index whose non-default operator class compares in plpgsql ran it (only a write's indexes
were judged, and only default operator classes for reads). Reading a relation that reaches
such an index now runs code; so does one whose index expressions or partial-index predicate
call code of the user's, which FAILED BEFORE too: a new session's first plan of the table
folds their calls of constants (`WHERE id > f(0)`) when it loads the index.

Held (controls): a row trigger declared on a partitioned table fires for an INSERT naming
a partition (PostgreSQL 15 clones it as an ordinary trigger of the partition: opaque); a role
renamed, or commented on, through a session of database app while database postgres has
pg_get_userbyid()'s or shobj_description()'s answer cached (DDL evicts every database's
entries; these fail with that eviction kept to the DDL's own database).
"""

from __future__ import annotations

import shutil

import pytest

from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import commented_by_hand_then_check, counter, make_known, warm_counter

# (view definition's tail after the base table, the write through it): each runs bump().
_VIEW_WRITES = {
    "update": ("WHERE public.{bump}() > 0", "UPDATE {view} SET v = 'new'"),
    "delete": ("WHERE public.{bump}() > 0", "DELETE FROM {view}"),
    "returning": ("", "UPDATE {view} SET v = 'new' RETURNING b"),
    "check-option": ("WHERE public.{bump}() > 0 WITH CHECK OPTION", "INSERT INTO {view} (id, v) VALUES ({row}, 'x')"),
    "nested": ("WHERE public.{bump}() > 0", "UPDATE {outer} SET v = 'new'"),
}


@pytest.mark.parametrize("case", sorted(_VIEW_WRITES))
async def test_write_through_a_view_that_runs_code(env: Env, case: str) -> None:
    """The view's quals (or RETURNING's select list) call bump(), which updates the counter."""
    count, bump = await counter(env)
    t = await env.table("adv_vt", "id int PRIMARY KEY, v text", "(1, 'old')")
    view, outer = unique("adv_view"), unique("adv_outer")
    tail, write = _VIEW_WRITES[case]
    await env.admin(
        f"CREATE VIEW public.{view} AS SELECT id, v, public.{bump}() AS b FROM public.{t} "
        + tail.format(bump=bump),
        f"CREATE VIEW public.{outer} AS SELECT * FROM public.{view}",
        f"GRANT ALL ON public.{view}, public.{outer} TO PUBLIC",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{outer}", f"DROP VIEW IF EXISTS public.{view}")
    writer = await env.client()
    await writer.run(write.format(view=view, outer=outer, row=2))  # not looked up yet: evicts everything
    await env.admin(f"UPDATE {count} SET n = 0", f"INSERT INTO {t} VALUES (1, 'old') ON CONFLICT DO NOTHING")
    reader, read = await warm_counter(env, count)
    await writer.run(write.format(view=view, outer=outer, row=3))
    assert await reader.origin(read) != [(0,)], "the write never ran bump(): proves nothing"
    await reader.check(read, why=f"after {case} through a view that runs bump()")


async def test_write_into_a_partition_fires_the_parents_trigger(env: Env) -> None:
    count, bump = await counter(env)
    parent = unique("adv_part")
    await env.admin(
        f"CREATE TABLE public.{parent} (id int, v text) PARTITION BY RANGE (id)",
        f"CREATE TABLE public.{parent}_1 PARTITION OF public.{parent} FOR VALUES FROM (0) TO (100)",
        f"GRANT ALL ON public.{parent}, public.{parent}_1 TO PUBLIC",
        f"CREATE FUNCTION public.{parent}_trg() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN NEW; END $$",
        f"CREATE TRIGGER bump AFTER INSERT ON public.{parent} FOR EACH ROW EXECUTE FUNCTION public.{parent}_trg()",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{parent} CASCADE", f"DROP FUNCTION IF EXISTS public.{parent}_trg()")
    await make_known(env, f"{parent}_1")
    reader, read = await warm_counter(env, count)
    writer = await env.client()
    await writer.run(f"INSERT INTO {parent}_1 VALUES (1, 'x')")
    assert await reader.origin(read) != [(0,)]
    await reader.check(read, why="after INSERT into a partition whose cloned trigger bumps the counter")


async def test_write_to_a_table_whose_policy_reads_a_view_that_runs_code(env: Env) -> None:
    """t's policy reads a view whose WHERE calls bump(): an UPDATE of t by a role the policy
    applies to runs it per row (the policy's text names only the view)."""
    count, bump = await counter(env)
    role = await env.role()
    t = await env.table("adv_pt", "id int PRIMARY KEY, v text", "(1, 'old')")
    view = unique("adv_view")
    await env.admin(
        f"CREATE VIEW public.{view} AS SELECT 1 AS one WHERE public.{bump}() > 0",
        f"GRANT ALL ON public.{view} TO PUBLIC",
        f"ALTER TABLE public.{t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON public.{t} USING (EXISTS (SELECT 1 FROM public.{view}))",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{t} CASCADE", f"DROP VIEW IF EXISTS public.{view}")
    writer = await env.client(env.login(role))
    await writer.run(f"UPDATE {t} SET v = 'first'")  # not looked up yet: evicts everything
    await env.admin(f"UPDATE {count} SET n = 0")
    reader, read = await warm_counter(env, count)
    await writer.run(f"UPDATE {t} SET v = 'new'")
    assert await reader.origin(read) != [(0,)], "the write never ran bump(): proves nothing"
    await reader.check(read, why="after an UPDATE whose table's policy reads a view that runs bump()")


@pytest.mark.parametrize("schema", ["pg_catalog.", ""])
async def test_superuser_write_to_a_system_catalog(env: Env, schema: str) -> None:
    """obj_description() is trusted: it reads pg_description, "changed only by DDL". A
    superuser may write the catalog itself (an UPDATE of pg_description is a COMMENT)."""
    t = await env.table("adv_cmt", "id int")
    await env.admin(f"COMMENT ON TABLE public.{t} IS 'old'")
    oid = await env.admin_val(f"SELECT 'public.{t}'::regclass::oid")
    why = "after a superuser's UPDATE of pg_description through neonpoly"
    await commented_by_hand_then_check(env, f"{schema}pg_description", oid, why)


@pytest.mark.parametrize("direction", ["to", "from"])
async def test_copy_program_that_writes_through_its_own_connection(env: Env, direction: str) -> None:
    """COPY … TO/FROM PROGRAM runs a shell command on the server, which may connect back and
    write anything, as dblink_exec does (adversarial 27): here psql bumps the counter."""
    count, _ = await counter(env)
    psql = shutil.which("psql")
    assert psql is not None
    conninfo = f"host=127.0.0.1 port={env.pg.port} dbname=app user=trust_user"
    program = f"{psql} -X -q -d ''{conninfo}'' -c ''UPDATE public.{count} SET n = n + 1'' >/dev/null"
    sink = await env.table("adv_sink", "line text")
    await make_known(env, sink)  # else its COPY FROM evicts everything, as a write to a table not known
    copy = (f"COPY (SELECT 1) TO PROGRAM '{program}'" if direction == "to"
            else f"COPY {sink} FROM PROGRAM '{program}; echo done'")
    reader, read = await warm_counter(env, count)
    writer = await env.client()
    await writer.run(copy)
    assert await reader.origin(read) != [(0,)], "the program never ran: proves nothing"
    await reader.check(read, why=f"after COPY {direction.upper()} PROGRAM (its psql bumped the counter)")


_EXPRESSION_OWNERS = {"index": "CREATE INDEX ON public.{t} ((public.{fn}(id)))",
                      "statistics": "CREATE STATISTICS public.{fn}_st ON (public.{fn}(id)) FROM public.{t}"}


@pytest.mark.parametrize(
    ("maintenance", "owner"),
    [("REINDEX TABLE {t}", "index"), ("ANALYZE {t}", "index"), ("VACUUM (ANALYZE) {t}", "index"),
     ("ANALYZE {t}", "statistics")],
)
async def test_maintenance_runs_an_expression_of_the_users(env: Env, maintenance: str, owner: str) -> None:
    """REINDEX rebuilds an expression index and ANALYZE computes its statistics (and those of
    an expression's extended statistics): both evaluate the expression, here a lying IMMUTABLE
    function of the user's that bumps the counter (a write with such an index is opaque,
    adversarial 38; these were notaquery)."""
    count, bump = await counter(env)
    t = await env.table("adv_ix", "id int", "(1)", "(2)")
    fn = unique("adv_lying")
    await env.admin(
        f"CREATE FUNCTION public.{fn}(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1; END $$",
        _EXPRESSION_OWNERS[owner].format(t=t, fn=fn),
        f"UPDATE public.{count} SET n = 0",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{t}", f"DROP FUNCTION IF EXISTS public.{fn}(int)")
    await make_known(env, t)
    reader, read = await warm_counter(env, count)
    writer = await env.client()
    await writer.run(maintenance.format(t=t))
    assert await reader.origin(read) != [(0,)], "the expression never ran: proves nothing"
    await reader.check(read, why=f"after {maintenance.split(' ')[0]} through neonpoly ran the {owner}'s expression")


async def test_analyze_changes_the_plan_and_so_the_row_order(env: Env) -> None:
    """Without statistics the planner scans the table (rows in heap order, shuffled here);
    ANALYZE through neonpoly makes it use the key's index (rows in key order). Row order is
    part of the answer (adversarial 1's plan settings)."""
    t = unique("adv_plan")
    await env.admin(
        f"CREATE TABLE public.{t} (id int PRIMARY KEY, pad text) WITH (autovacuum_enabled = off)",
        f"INSERT INTO public.{t} SELECT g, 'x' FROM generate_series(1, 20000) g ORDER BY g DESC",
        f"GRANT ALL ON public.{t} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{t}")
    await make_known(env, t)
    reader = await env.twin()
    read = f"SELECT id FROM {t} WHERE id < 6"
    before, _ = await reader.probe(read)
    writer = await env.client()
    await writer.run(f"ANALYZE {t}")
    assert await reader.origin(read) != before, "the plan (or its order) did not change: proves nothing"
    await reader.check(read, why="after ANALYZE through neonpoly changed the plan")


async def test_foreign_key_check_runs_an_equality_of_the_users(env: Env) -> None:
    """The parent's unique index uses a non-default operator class whose `=` is plpgsql (a
    lying IMMUTABLE one that bumps the counter): the foreign key takes its equality from that
    class, so an INSERT into the child (no trigger, index or code of its own) runs it in the
    check of the parent's row."""
    count, bump = await counter(env)
    ops, parent, child = unique("adv_ops"), unique("adv_parent"), unique("adv_child")
    await env.admin(
        f"CREATE FUNCTION public.{ops}_eq(int, int) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$",
        f"CREATE OPERATOR public.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = public.{ops}_eq)",
        f"CREATE OPERATOR CLASS public.{ops} FOR TYPE int USING btree AS OPERATOR 1 pg_catalog.<, "
        f"OPERATOR 2 pg_catalog.<=, OPERATOR 3 public.===, OPERATOR 4 pg_catalog.>=, OPERATOR 5 pg_catalog.>, "
        f"FUNCTION 1 pg_catalog.btint4cmp(int, int)",
        f"CREATE TABLE public.{parent} (id int)",
        f"CREATE UNIQUE INDEX ON public.{parent} (id public.{ops})",
        f"INSERT INTO public.{parent} VALUES (1)",
        f"CREATE TABLE public.{child} (pid int REFERENCES public.{parent} (id))",
        f"GRANT ALL ON public.{parent}, public.{child} TO PUBLIC",
    )
    env.on_cleanup(
        f"DROP TABLE IF EXISTS public.{child}", f"DROP TABLE IF EXISTS public.{parent}",
        f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING btree CASCADE",
        "DROP OPERATOR IF EXISTS public.=== (int, int)",
        f"DROP FUNCTION IF EXISTS public.{ops}_eq(int, int)",
    )
    await make_known(env, child)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    writer = await env.client()
    await writer.run(f"INSERT INTO {child} VALUES (1)")
    assert await reader.origin(read) != [(0,)], "the foreign key's check never ran the operator: proves nothing"
    await reader.check(read, why="after an INSERT whose foreign-key check ran an = of the user's")


async def test_read_through_an_index_whose_operator_class_is_the_users(env: Env) -> None:
    """An index with a non-default operator class whose comparison is plpgsql (a lying one
    that bumps the counter) serves `id = 5` with the builtin `=`: a plain read of the table
    that the planner answers by that index runs the comparison for every key it meets."""
    count, bump = await counter(env)
    ops = unique("adv_ops")
    t = await env.table("adv_ixr", "id int, v text")
    await env.admin(
        f"CREATE FUNCTION public.{ops}_cmp(int, int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN pg_catalog.btint4cmp($1, $2); END $$",
        f"CREATE OPERATOR CLASS public.{ops} FOR TYPE int USING btree AS OPERATOR 1 pg_catalog.<, "
        f"OPERATOR 2 pg_catalog.<=, OPERATOR 3 pg_catalog.=, OPERATOR 4 pg_catalog.>=, OPERATOR 5 pg_catalog.>, "
        f"FUNCTION 1 public.{ops}_cmp(int, int)",
        f"INSERT INTO public.{t} SELECT g, 'x' FROM generate_series(1, 2000) g",
        f"CREATE INDEX ON public.{t} (id public.{ops})",
        f"ANALYZE public.{t}",
        f"UPDATE public.{count} SET n = 0",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{t}",
                   f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING btree CASCADE",
                   f"DROP FUNCTION IF EXISTS public.{ops}_cmp(int, int)")
    await make_known(env, t)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    client = await env.client()
    await client.rows(f"SELECT v FROM {t} WHERE id = 5")
    assert await reader.origin(read) != [(0,)], "the read never used the index: proves nothing"
    await reader.check(read, why="after a read whose index scan ran a comparison of the user's")


@pytest.mark.parametrize("index", ["(id) WHERE id > public.{fn}(0)", "((id + public.{fn}(0)))"])
async def test_read_plans_with_an_index_that_folds_code_of_the_users(env: Env, index: str) -> None:
    """A partial index's predicate and an index's expressions are folded when a session first
    plans a read of the table (relcache): an IMMUTABLE call of constants, here a lying one
    that bumps the counter, runs in a plain read by a new session."""
    count, bump = await counter(env)
    t = await env.table("adv_ixp", "id int, v text", "(1, 'x')")
    fn = unique("adv_lying")
    await env.admin(
        f"CREATE FUNCTION public.{fn}(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1; END $$",
        f"CREATE INDEX ON public.{t} " + index.format(fn=fn),
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{t}", f"DROP FUNCTION IF EXISTS public.{fn}(int)")
    await make_known(env, t)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    client = await env.client()  # a new session: its first plan of t loads the index
    await client.rows(f"SELECT v FROM {t} WHERE id = 1")
    assert await reader.origin(read) != [(0,)], "planning never ran the function: proves nothing"
    await reader.check(read, why="after a read whose planning folded an index's call of the user's")


# --- held: shared objects changed through neonpoly from another database ---------------------


@pytest.mark.parametrize(
    ("read", "change"),
    [("SELECT pg_catalog.pg_get_userbyid({oid})::text", "ALTER ROLE {role} RENAME TO {role}_renamed"),
     ("SELECT pg_catalog.shobj_description({oid}, 'pg_authid')", "COMMENT ON ROLE {role} IS 'new'")],
)
async def test_shared_object_changed_from_another_database(env: Env, read: str, change: str) -> None:
    """Roles are every database's: a rename or COMMENT through a session of database app must
    reach a cached read in database postgres (held: DDL evicts every database's entries)."""
    role = await env.role()
    env.on_cleanup(f"REVOKE ALL ON SCHEMA public FROM {role}_renamed", f"DROP ROLE IF EXISTS {role}_renamed")
    oid = await env.admin_val(f"SELECT '{role}'::regrole::oid")
    reader = await env.twin(env.login(database="postgres"))
    sql = read.format(oid=oid)
    await reader.probe(sql)
    writer = await env.client()
    await writer.run(change.format(role=role))
    await reader.check(sql, why=f"after {change.split(' ')[0]} … through neonpoly in database app")
    await reader.probe(sql, require_hit=False)  # every answer equal to the origin's, hits or not

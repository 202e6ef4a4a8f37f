"""Class 12: answers decided before an earlier request in the same pipeline has shown what it
does, and tenants kept apart by settings and temporary tables.

A cache hit queued behind an outstanding request is released in order, but it was decided
when it arrived: if the request ahead of it turns out (once the catalog answers) to run the
user's code, the hit may be older than the write or SET that code did.
"""

from __future__ import annotations

from tests.adversarial import rawpg
from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import counter, make_known
from tests.adversarial.rawpg import Raw


async def test_hit_queued_behind_a_first_read_of_a_writing_view(env: Env) -> None:
    """One write with two simple queries: SELECT from a view never seen before (its
    definition calls a function that bumps the counter), then the counter's cached read.
    The second runs after the first, so it must see n = 1."""
    table, fn = await counter(env)
    view = unique("adv_v")
    await env.admin(f"CREATE VIEW public.{view} AS SELECT public.{fn}() AS n", f"GRANT SELECT ON {view} TO PUBLIC")
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    reader = await env.twin(env.login("trust_user"))  # the raw client's role: the same key
    read = f"SELECT n FROM {table}"
    rows, _ = await reader.probe(read)
    assert rows == [(0,)]
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(rawpg.query(f"SELECT n FROM {view}"), rawpg.query(read))
        first = rawpg.rows(await raw.until_ready())
        second = rawpg.rows(await raw.until_ready())
    finally:
        await raw.close()
    assert first == [[b"1"]]
    assert second == [[b"1"]], f"the counter read pipelined after the view's write answered {second!r}"
    await reader.check(read, why="after the pipeline")


async def test_hit_queued_behind_a_first_read_of_a_table_whose_policy_sets_search_path(env: Env) -> None:
    """The same with a row-level-security policy that moves the session's search_path."""
    schema = unique("adv_s")
    t = unique("adv_t")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{t} (v text)",
        f"INSERT INTO public.{t} VALUES ('public')",
        f"CREATE TABLE {schema}.{t} (v text)",
        f"INSERT INTO {schema}.{t} VALUES ('{schema}')",
        f"GRANT SELECT ON public.{t}, {schema}.{t} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{t}", f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    role = "trust_user"  # what the raw client logs in as (trust): the same key as the twin
    guarded = await env.table("adv_g", "id int", "(1)")
    await env.admin(
        f"ALTER TABLE {guarded} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY mover ON {guarded} USING (set_config('search_path', '{schema}, public', false) IS NOT NULL)",
    )
    read = f"SELECT v FROM {t}"
    a = await env.twin(env.login(role))
    rows, _ = await a.probe(read)
    assert rows == [("public",)]
    raw = await Raw.connect(env.proxy.port, user=role)
    try:
        raw.send(rawpg.query(f"SELECT count(*) FROM {guarded}"), rawpg.query(read))
        await raw.until_ready()
        second = rawpg.rows(await raw.until_ready())
    finally:
        await raw.close()
    assert second == [[schema.encode()]], f"the read pipelined after the policy moved search_path: {second!r}"


async def test_temp_table_created_by_a_default_is_not_shared(env: Env) -> None:
    """A column DEFAULT (of a table neonpoly has looked up) creates a TEMP table that shadows
    public.t for session A only. A's rows of t must never be served to B."""
    table = await env.table("adv_t", "v text", "('public')")
    fn = unique("adv_fn")
    await env.admin(
        f"CREATE FUNCTION public.{fn}() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        f"CREATE TEMP TABLE IF NOT EXISTS {table} (v text); "
        f"INSERT INTO pg_temp.{table} VALUES ('private to A'); RETURN 1; END $$",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{fn}() CASCADE")
    log = await env.table("adv_log", f"id int, v int DEFAULT public.{fn}()")
    await make_known(env, log, table)
    a = await env.twin()
    await a.both(f"INSERT INTO {log} (id) VALUES (1)")
    read = f"SELECT v FROM {table}"
    rows, _ = await a.probe(read, require_hit=False)
    assert rows == [("private to A",)]
    b = await env.twin()
    await b.check(read, why="B after A (whose DEFAULT made a TEMP table) read t")


async def test_custom_setting_in_a_view_set_per_session(env: Env) -> None:
    """Control: a view filtered by current_setting('app.tenant'), SET differently per session."""
    table = await env.table("adv_ten", "tenant text, secret text", "('a', 'secret of a')", "('b', 'secret of b')")
    view = unique("adv_v")
    await env.admin(
        f"CREATE VIEW public.{view} AS SELECT secret FROM public.{table} "
        f"WHERE tenant = current_setting('app.tenant', true)",
        f"GRANT SELECT ON {view} TO PUBLIC",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    read = f"SELECT secret FROM {view}"
    a = await env.twin()
    await a.both("SET app.tenant = 'a'")
    rows, _ = await a.probe(read)
    assert rows == [("secret of a",)]
    b = await env.twin()
    await b.both("SET app.tenant = 'b'")
    await b.check(read, why="tenant b after tenant a cached the view")
    c = await env.twin()  # app.tenant never set: current_setting(…, true) is NULL
    await c.check(read, why="no tenant after tenant a cached the view")
    d = await env.twin(env.login("postgres", options="-c app.tenant=b"))
    await d.check(read, why="tenant b from startup options")


async def test_many_custom_settings_in_one_policy(env: Env) -> None:
    """Control: a policy reading several custom settings; sessions differ in the last one."""
    names = [f"app.k{i}" for i in range(6)]
    cond = " AND ".join(f"coalesce(current_setting('{n}', true), '') = ''" for n in names[:-1])
    table = await env.table("adv_ten", "tenant text, secret text", "('x', 'secret of x')", "('y', 'secret of y')")
    role = await env.role()
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON {table} USING ({cond} AND tenant = current_setting('{names[-1]}', true))",
    )
    read = f"SELECT secret FROM {table}"
    a = await env.twin(env.login(role))
    await a.both(f"SET {names[-1]} = 'x'")
    await a.probe(read)
    b = await env.twin(env.login(role))
    await b.both(f"SET {names[-1]} = 'y'")
    await b.check(read, why="tenant y after tenant x cached")

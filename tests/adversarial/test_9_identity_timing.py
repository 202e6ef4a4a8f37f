"""Class 9: when the session's identity is learned, and whether it is still true when used.

The identity (role OIDs, settings, temp objects, the search_path's schemas) is learned in
idle time after anything that may change it. These cases change the session in the same
write as the query that follows, inside transactions that are rolled back, through prepared
statements run later, and change what the search_path *means* from another session.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.adversarial import rawpg
from tests.adversarial.harness import Env, Twin, hits, unique
from tests.adversarial.rawpg import SYNC, Raw, bind, execute, parse


async def _schema_and_public(env: Env) -> tuple[str, str]:
    """public.<t> holds 'public', <schema>.<t> holds the schema's name; both readable."""
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
    return schema, table


async def _warm(env: Env, read: str) -> Twin:
    """Another session with the default search_path caches `read` (public's rows)."""
    other = await env.twin()
    rows, _ = await other.probe(read)
    assert rows == [("public",)]
    return other


def _url(env: Env) -> str:
    return env.login().url("127.0.0.1", env.proxy.port)


async def test_psycopg_pipeline_set_then_select(env: Env) -> None:
    schema, table = await _schema_and_public(env)
    read = f"SELECT v FROM {table}"
    await _warm(env, read)
    conn = await psycopg.AsyncConnection.connect(_url(env), autocommit=True)
    try:
        async with conn.pipeline():
            await conn.execute(f"SET search_path = {schema}, public")
            cur = await conn.execute(read)
        assert await cur.fetchall() == [(schema,)], "SELECT pipelined after SET search_path"
    finally:
        await conn.close()


async def test_raw_simple_queries_set_and_select_in_one_write(env: Env) -> None:
    schema, table = await _schema_and_public(env)
    read = f"SELECT v FROM {table}"
    await _warm(env, read)
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(rawpg.query(f"SET search_path = {schema}, public"), rawpg.query(read), rawpg.query(read))
        await raw.until_ready()
        first = rawpg.rows(await raw.until_ready())
        second = rawpg.rows(await raw.until_ready())
        assert first == second == [[schema.encode()]], (first, second)
    finally:
        await raw.close()


async def test_extended_batch_sets_then_selects_before_sync(env: Env) -> None:
    schema, table = await _schema_and_public(env)
    read = f"SELECT v FROM {table}"
    await _warm(env, read)
    raw = await Raw.connect(env.proxy.port)
    try:
        for _ in range(3):
            raw.send(
                parse("", f"SET search_path = {schema}, public"), bind("", ""), execute(),
                parse("", read), bind("", ""), execute(), SYNC,
            )
            assert rawpg.rows(await raw.until_ready()) == [[schema.encode()]]
            raw.send(parse("", read), bind("", ""), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[schema.encode()]]
            raw.send(rawpg.query("RESET search_path"))
            await raw.until_ready()
    finally:
        await raw.close()


async def test_set_in_a_prepared_statement_executed_later(env: Env) -> None:
    """Parse 'SET search_path …' as a named statement in one batch; Bind/Execute it in a later
    batch; then read."""
    schema, table = await _schema_and_public(env)
    read = f"SELECT v FROM {table}"
    await _warm(env, read)
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(parse("setter", f"SET search_path = {schema}, public"), parse("reader", read), SYNC)
        await raw.until_ready()
        for _ in range(3):
            raw.send(bind("", "reader"), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"public"]]
        raw.send(bind("", "setter"), execute(), SYNC)
        await raw.until_ready()
        raw.send(bind("", "reader"), execute(), SYNC)
        assert rawpg.rows(await raw.until_ready()) == [[schema.encode()]]
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "statements,expected",
    [
        (["BEGIN", "SET search_path = {s}, public", "ROLLBACK"], "public"),
        (["BEGIN", "SET search_path = {s}, public", "COMMIT"], "{s}"),
        (["BEGIN", "SAVEPOINT a", "SET search_path = {s}, public", "ROLLBACK TO a", "COMMIT"], "public"),
        (["BEGIN", "SAVEPOINT a", "SET search_path = {s}, public", "RELEASE a", "COMMIT"], "{s}"),
        (["SET search_path = {s}, public; SELECT 1"], "{s}"),
        (["SET search_path = {s}, public", "DISCARD ALL"], "public"),
        (["SET search_path = {s}, public", "RESET ALL"], "public"),
        (["BEGIN", "SET LOCAL search_path = {s}, public", "COMMIT"], "public"),
    ],
    ids=["rollback", "commit", "rollback-to-savepoint", "release-savepoint", "multi-statement", "discard-all",
         "reset-all", "set-local"],
)
async def test_set_inside_transactions(env: Env, statements: list[str], expected: str) -> None:
    schema, table = await _schema_and_public(env)
    read = f"SELECT v FROM {table}"
    await _warm(env, read)
    a = await env.twin()
    await a.probe(read)
    for sql in statements:
        await a.both(sql.format(s=schema))
    got = await a.check(read, why=f"after {statements!r}")
    assert got == [(expected.format(s=schema),)]


async def test_set_role_to_a_role_with_other_rows_and_back(env: Env) -> None:
    """SET ROLE to a role under row-level security, RESET ROLE, a failing SET ROLE."""
    owner_only = await env.role()
    table = await env.table("adv_rls", "owner text, secret text", f"('{owner_only}', 'mine')", "('someone', 'theirs')")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY own ON {table} USING (owner = current_user)",
    )
    read = f"SELECT secret FROM {table} ORDER BY secret"
    a = await env.twin()
    rows, _ = await a.probe(read)
    assert rows == [("mine",), ("theirs",)]
    await a.both(f"SET ROLE {owner_only}")
    await a.check(read, why="after SET ROLE to a role under RLS")
    await a.probe(read)
    await a.both("RESET ROLE")
    await a.check(read, why="after RESET ROLE")
    await a.both(f"SET ROLE {owner_only}")
    for side in (a.via, a.direct):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            await side.run("SET ROLE adv_no_such_role_at_all")
    await a.check(read, why="after a failing SET ROLE")


async def test_row_security_off_for_the_owner(env: Env) -> None:
    """row_security = off makes a query that RLS would filter fail for a non-bypass role."""
    role = await env.role()
    table = await env.table("adv_rls", "owner text, secret text", f"('{role}', 'mine')", "('someone', 'theirs')")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY own ON {table} USING (owner = current_user)",
    )
    read = f"SELECT secret FROM {table} ORDER BY secret"
    a = await env.twin(env.login(role))
    await a.probe(read)
    await a.both("SET row_security = off")
    for side in (a.via, a.direct):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await side.rows(read)


# --- the search_path's schemas, learned once, changed by another session -------------------


async def test_user_schema_created_later_shadows_a_builtin(env: Env) -> None:
    """A session with the default search_path ("$user", public) learned its schemas when no
    schema named after its role existed. Another session (through neonpoly) then creates that
    schema with a lower(varchar) that reads table u. The first session's lower(v) now runs
    it, so its cached answer depends on u; a write to u must not leave it stale."""
    role = await env.role()
    table = await env.table("adv_t", "v varchar", "('ABC')")
    u = await env.table("adv_u", "w text", "('before')")
    a = await env.twin(env.login(role))
    read = f"SELECT lower(v) FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [("abc",)]
    admin = await env.client()
    await admin.run(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    await admin.run(
        f"CREATE FUNCTION {role}.lower(x varchar) RETURNS text STABLE LANGUAGE sql "
        f"AS $$ SELECT w FROM public.{u} $$"
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {role} CASCADE")
    await admin.rows(f"SELECT count(*) FROM {table}")  # neonpoly looks the database up again
    await admin.rows(f"SELECT count(*) FROM {u}")  # and u, so the write below evicts only u
    assert await a.origin(read) == [("before",)]
    await a.probe(read, require_hit=False)
    await admin.run(f"UPDATE {u} SET w = 'after'")
    await a.check(read, why="after a write to the table the session's own lower(varchar) reads")


async def test_usage_granted_later_on_a_schema_with_a_rival(env: Env) -> None:
    """Same, with the schema on the search_path from the start but without USAGE for the role
    (current_schemas() leaves it out) until a GRANT through neonpoly."""
    role = await env.role()
    schema = unique("adv_s")
    table = await env.table("adv_t", "v varchar", "('ABC')")
    u = await env.table("adv_u", "w text", "('before')")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"CREATE FUNCTION {schema}.lower(x varchar) RETURNS text STABLE LANGUAGE sql AS $$ SELECT w FROM public.{u} $$",
        f"ALTER ROLE {role} SET search_path = {schema}, public",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    a = await env.twin(env.login(role))
    read = f"SELECT lower(v) FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [("abc",)]
    admin = await env.client()
    await admin.run(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    await admin.rows(f"SELECT count(*) FROM {table}")  # neonpoly looks the database up again
    await admin.rows(f"SELECT count(*) FROM {u}")  # and u, so the write below evicts only u
    assert await a.origin(read) == [("before",)]
    await a.probe(read, require_hit=False)
    await admin.run(f"UPDATE {u} SET w = 'after'")
    await a.check(read, why="after a write to the table the newly visible lower(varchar) reads")


async def test_session_opened_after_the_rival_exists_is_not_served(env: Env) -> None:
    """Control for the two above: a fresh session opened after the schema exists is not cached
    (its lower() may be the user's)."""
    role = await env.role()
    table = await env.table("adv_t", "v varchar", "('ABC')")
    await env.admin(
        f"CREATE SCHEMA {role} AUTHORIZATION {role}",
        f"CREATE FUNCTION {role}.lower(x varchar) RETURNS text STABLE LANGUAGE sql AS $$ SELECT 'mine' $$",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {role} CASCADE")
    a = await env.twin(env.login(role))
    read = f"SELECT lower(v) FROM {table}"
    before = hits(env.proxy)
    for _ in range(4):
        await a.check(read, why="a session whose lower(varchar) is its own")
    assert hits(env.proxy) == before, "a query calling the user's lower() was served from cache"

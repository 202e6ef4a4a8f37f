"""Hostile review: operators that syntax implies without naming them the way the
classifier looks for them. A builtin is trusted by name only after the database's catalog
says no object of the user's can stand in for it ("operator =", "cast int4"); so the name
must be found wherever the server will resolve one:

* `CASE m WHEN 'ok' …`: an `=` with no operator in the tree's CASE node;
* `x IN (SELECT …)`, `x = ANY (SELECT …)`: a sublink whose operator (`=`, or none for IN)
  is not an A_Expr (nor, so, was a schema-qualified `OPERATOR(s.=)` there seen as the user's);
* `JOIN … USING (id)`: an `=` on the join columns.

Each user function here is plpgsql that bumps a counter (IMMUTABLE where a lie lets it be
picked): the counter's cached read must not survive a read that ran it.

A cursor's query is checked the same way (it trusted nothing before: DECLARE carried its
query's relations but not the builtins it trusts by name).

Every case FAILED BEFORE; the walk now finds the operator these nodes imply (queries.py
`implied_operator`: CaseExpr with an argument, ANY/ALL/ROWCOMPARE sublinks, JoinExpr with
USING or NATURAL, SortBy's USING). Held: a function-call spelling of a cast (`int4(m)`)
cannot reach a user's cast function (PostgreSQL takes it only for binary or I/O coercions).
"""

from __future__ import annotations

import pytest

from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import counter, lying_upper, make_known, ran_code_then_check, warm_counter


async def _mood_table(env: Env) -> tuple[str, str]:
    mood = unique("adv_mood")
    await env.admin(f"CREATE TYPE public.{mood} AS ENUM ('sad', 'ok')")
    env.on_cleanup(f"DROP TYPE IF EXISTS public.{mood} CASCADE")
    t = await env.table("adv_moods", f"id int PRIMARY KEY, m public.{mood}", "(1, 'sad')", "(2, 'ok')")
    return mood, t


async def test_case_when_compares_with_the_users_equals(env: Env) -> None:
    table, bump = await counter(env)
    mood, t = await _mood_table(env)
    eq = unique("adv_eq")
    await env.admin(
        f"CREATE FUNCTION public.{eq}(public.{mood}, public.{mood}) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$",
        f"CREATE OPERATOR public.= (LEFTARG = public.{mood}, RIGHTARG = public.{mood}, FUNCTION = public.{eq})",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{eq} CASCADE")
    sql = f"SELECT id, CASE m WHEN 'ok' THEN 'yes' ELSE 'no' END FROM {t} ORDER BY id"
    await make_known(env, t, table)
    reader, count = await warm_counter(env, table)
    await ran_code_then_check(env, reader, count, sql, "the user's = (its CASE compares with it)")


@pytest.mark.parametrize(
    "read",
    [
        "SELECT id FROM {t} WHERE id IN (SELECT 1) ORDER BY id",
        "SELECT id FROM {t} WHERE id = ANY (SELECT 2) ORDER BY id",
        "SELECT id FROM {t} WHERE id NOT IN (SELECT 1) ORDER BY id",
        "SELECT id FROM {t} WHERE id OPERATOR({evil}.=) ANY (SELECT 1) ORDER BY id",
        "SELECT a.id FROM {t} a JOIN {t} b USING (id) ORDER BY 1",
    ],
)
async def test_a_sublink_compares_with_the_users_equals(env: Env, read: str) -> None:
    """An `=` of the user's for integers, first on the reader's search_path (before
    pg_catalog), plpgsql that bumps the counter."""
    table, bump = await counter(env)
    t = await env.table("adv_ids", "id int PRIMARY KEY", "(1)", "(2)")
    evil, eq = unique("adv_evil"), unique("adv_eq")
    await env.admin(
        f"CREATE SCHEMA {evil}",
        f"GRANT USAGE ON SCHEMA {evil} TO PUBLIC",
        f"CREATE FUNCTION {evil}.{eq}(int, int) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$",
        f"CREATE OPERATOR {evil}.= (LEFTARG = int, RIGHTARG = int, FUNCTION = {evil}.{eq})",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {evil} CASCADE")
    sql = read.format(t=t, evil=evil)
    await make_known(env, t, table)
    reader, count = await warm_counter(env, table)
    client = await env.client()
    await client.run(f"SET search_path = {evil}, pg_catalog, public")
    await client.rows(sql)
    assert await reader.origin(count) != [(0,)], f"{sql!r} never ran the user's =: proves nothing"
    await reader.check(count, why=f"after {sql!r}, whose sublink compared with the user's =")


async def test_a_cursor_over_a_read_that_trusts_a_builtin_name(env: Env) -> None:
    """DECLARE … WITH HOLD (outside a transaction) runs its query at once; a FETCH from a
    cursor in a transaction runs it as rows are fetched. Its `upper(m)` is the user's (lying
    IMMUTABLE plpgsql over their enum, which bumps the counter)."""
    table, bump = await counter(env)
    mood, t = await _mood_table(env)
    await lying_upper(env, mood, bump)
    await make_known(env, t, table)
    reader, count = await warm_counter(env, table)
    client = await env.client()
    await client.run(f"DECLARE h CURSOR WITH HOLD FOR SELECT upper(m) FROM {t} ORDER BY id")
    assert await reader.origin(count) != [(0,)], "the holdable cursor never ran upper(): proves nothing"
    await reader.check(count, why="after DECLARE … WITH HOLD over the user's upper()")
    await client.rows("FETCH ALL FROM h")
    await reader.probe(count, require_hit=False)
    await client.run("BEGIN")
    await client.run(f"DECLARE c CURSOR FOR SELECT upper(m) FROM {t} ORDER BY id")
    before = await reader.origin(count)
    await client.rows("FETCH 1 FROM c")
    await reader.probe(count, require_hit=False)  # the bump is not committed yet: old is right
    await client.run("COMMIT")
    assert await reader.origin(count) != before, "the FETCH never ran upper(): proves nothing"
    await reader.check(count, why="after COMMIT of the transaction whose FETCH ran the user's upper()")

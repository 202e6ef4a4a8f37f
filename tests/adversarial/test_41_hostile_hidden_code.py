"""Hostile review: code of the user's that a trusted builtin runs with no name of it in the
text. The classifier trusts `to_json()`, `row_to_json()`, `json_agg()`, `array_in()`, an
ORDER BY on a column, by their names; but PostgreSQL runs a user's function from each of
them when the values are of a type the user made:

* the json builders (to_json, to_jsonb, row_to_json, json_agg, json_build_object …) call a
  type's cast to json, when the type is not a builtin and has one (json.c,
  `json_categorize_type`), even an explicit-only cast, which `::json` in no text names;
* `array_in(text, type, typmod)` and `record_in(…)` run the input function, and the domain
  CHECKs, of a type named by OID or `'name'::regtype`: a string, not a type name;
* ORDER BY (and DISTINCT, GROUP BY) of a column sorts with its type's default btree operator
  class, which for a type of the user's may be theirs, with a comparison function of theirs.

Such a function may write another table (a counter here): the read that ran it must evict
like any code of the user's, or the counter's cached answer outlives a write neonpoly saw
pass; and a read answered from the cache would skip the function and repeat its answer.
Each case makes the table read known to neonpoly first (so the read is judged by the
catalog), proves the counter's read a cache hit, runs the read through neonpoly, and
compares the counter with a direct connection.

Every case FAILED BEFORE (the counter's read stayed stale; the builder's answer repeated
from the cache). Now the database's catalog lists, as rivals the read trusts by name (relations
lookup, kind 's'): a cast to json in SQL or plpgsql ("json cast", trusted by every json builder
and the SQL/JSON syntax), a default operator class with a support function or operator in SQL
or plpgsql ("operator class", trusted by every query), and functions and operators named like
builtins over the user's own types unless written in C (an extension's, trusted as builtins);
array_in, record_in and the populate_record family are code of the user's. A view's (or a
policy's, a default's) definition naming such a builtin, with a rival anywhere in the
database, runs code (relations.py `_definition_rivals`): its printed names may be the user's.
"""

from __future__ import annotations

import pytest

from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import counter, lying_upper, make_known, ran_code_then_check, warm_counter


async def _mood(env: Env, bump: str) -> tuple[str, str]:
    """An enum type of the user's with an explicit cast to json whose function bumps the
    counter (and returns its new value), and a table of two rows of it."""
    mood = unique("adv_mood")
    cast_fn = unique("adv_mood_json")
    await env.admin(
        f"CREATE TYPE public.{mood} AS ENUM ('sad', 'ok')",
        f"CREATE FUNCTION public.{cast_fn}(public.{mood}) RETURNS json VOLATILE LANGUAGE sql AS "
        f"$$ SELECT pg_catalog.to_json(public.{bump}()) $$",
        f"CREATE CAST (public.{mood} AS json) WITH FUNCTION public.{cast_fn}(public.{mood})",
    )
    env.on_cleanup(f"DROP TYPE IF EXISTS public.{mood} CASCADE", f"DROP FUNCTION IF EXISTS public.{cast_fn} CASCADE")
    t = await env.table("adv_moods", f"id int PRIMARY KEY, m public.{mood}", "(1, 'sad')", "(2, 'ok')")
    return mood, t


@pytest.mark.parametrize(
    "read",
    [
        "SELECT to_json(m)::text FROM {t} WHERE id = 1",
        "SELECT to_jsonb(m)::text FROM {t} WHERE id = 1",
        "SELECT row_to_json(x)::text FROM {t} x WHERE id = 1",
        "SELECT json_agg(m)::text FROM {t}",
        "SELECT json_build_object('m', m)::text FROM {t} WHERE id = 1",
    ],
)
async def test_json_builders_call_a_types_cast_to_json(env: Env, read: str) -> None:
    """A json builder over a value of the user's enum calls its (explicit) cast to json,
    which bumps the counter: the counter's cached read must not survive it, and the read
    itself (a new counter value each time) must never be answered from the cache."""
    table, bump = await counter(env)
    _, t = await _mood(env, bump)
    sql = read.format(t=t)
    await make_known(env, t, table)
    reader, count = await warm_counter(env, table)
    client = await env.client()
    answers = [(await client.rows(sql))[0][0] for _ in range(3)]
    assert len(set(answers)) == 3, f"{sql!r} was answered from the cache (its cast runs each time): {answers}"
    await reader.check(count, why=f"after {sql!r}, whose cast to json bumped the counter")


async def test_json_builders_over_builtin_types_stay_cached(env: Env) -> None:
    """The control: with no cast to json of the user's in SQL or plpgsql (hstore's, in C, is
    trusted as a builtin), a PostgREST-style read (json_agg of rows, row_to_json) is still
    served from the cache."""
    await env.admin("CREATE EXTENSION IF NOT EXISTS hstore")
    env.on_cleanup("DROP EXTENSION IF EXISTS hstore CASCADE")
    t = await env.table("adv_plain", "id int PRIMARY KEY, v text", "(1, 'a')", "(2, 'b')")
    twin = await env.twin()
    await twin.probe(f"SELECT coalesce(json_agg(x), '[]')::text FROM (SELECT * FROM {t} ORDER BY id) x")
    await twin.probe(f"SELECT row_to_json(x)::text FROM {t} x WHERE id = 2")


async def _checked_domain(env: Env, bump: str) -> str:
    """A domain whose CHECK bumps the counter, and a composite type holding it."""
    dom = unique("adv_dom")
    await env.admin(f"CREATE DOMAIN public.{dom} AS int CHECK (public.{bump}() > -1 AND VALUE > 0)")
    env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{dom} CASCADE")
    return dom


@pytest.mark.parametrize(
    "read",
    [
        "SELECT record_in('(5)', '{row}'::regtype, -1)::text",
        "SELECT array_to_string(array_in('{{5}}', '{dom}'::regtype, -1), ',')",
        "SELECT array_to_string(array_in('{{5}}', {dom_oid}, -1), ',')",
        "SELECT (json_populate_record(x, '{{\"v\": 5}}')).v FROM {rows} x",
        "SELECT (jsonb_populate_recordset(x, '[{{\"v\": 5}}]')).v FROM {rows} x",
    ],
)
async def test_input_functions_called_by_type_oid_run_domain_checks(env: Env, read: str) -> None:
    """`record_in` and `array_in` take the type as an OID (a `'name'::regtype` string, or a
    number), the populate_record family from its first argument's type (a table's row here):
    the domain's CHECK runs for every value made, with no type name in the text."""
    table, bump = await counter(env)
    dom = await _checked_domain(env, bump)
    row = unique("adv_row")
    await env.admin(f"CREATE TYPE public.{row} AS (v public.{dom})")
    env.on_cleanup(f"DROP TYPE IF EXISTS public.{row} CASCADE")
    dom_oid = await env.admin_val(f"SELECT 'public.{dom}'::regtype::oid")
    rows = await env.table("adv_domrows", f"v public.{dom}", "(1)")
    await env.admin(f"UPDATE {table} SET n = 0")
    sql = read.format(row=f"public.{row}", dom=f"public.{dom}", dom_oid=dom_oid, rows=rows)
    await make_known(env, rows, table)
    reader, count = await warm_counter(env, table)
    client = await env.client()
    try:
        await client.rows(sql)
    except Exception as error:  # the server refused it: then it ran nothing either
        pytest.fail(f"{sql!r} failed: {error}")
    assert await reader.origin(count) != [(0,)], f"{sql!r} never ran the CHECK: proves nothing"
    await reader.check(count, why=f"after {sql!r}, whose domain CHECK bumped the counter")


@pytest.mark.parametrize("read", ["SELECT m::text FROM {t} GROUP BY m ORDER BY 1", "SELECT count(DISTINCT m) FROM {t}"])
async def test_sorting_by_a_users_default_operator_class(env: Env, read: str) -> None:
    """The user's enum gets a DEFAULT btree operator class of their own (a lying IMMUTABLE
    comparison that bumps the counter): GROUP BY m and count(DISTINCT m) sort with it, with no
    operator in the text."""
    table, bump = await counter(env)
    mood, t = await _mood(env, bump)
    cmp, lt, eq, ops = unique("adv_cmp"), unique("adv_lt"), unique("adv_eq"), unique("adv_ops")
    await env.admin(
        f"CREATE FUNCTION public.{cmp}(public.{mood}, public.{mood}) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN CASE WHEN $1 < $2 THEN -1 WHEN $1 > $2 THEN 1 ELSE 0 END; END $$",
        f"CREATE FUNCTION public.{lt}(public.{mood}, public.{mood}) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1 OPERATOR(pg_catalog.<) $2; END $$",
        f"CREATE FUNCTION public.{eq}(public.{mood}, public.{mood}) RETURNS bool IMMUTABLE LANGUAGE sql AS "
        "$$ SELECT $1 OPERATOR(pg_catalog.=) $2 $$",
        f"CREATE OPERATOR public.<<< (LEFTARG = public.{mood}, RIGHTARG = public.{mood}, FUNCTION = public.{lt})",
        f"CREATE OPERATOR public.=== (LEFTARG = public.{mood}, RIGHTARG = public.{mood}, FUNCTION = public.{eq})",
        f"CREATE OPERATOR CLASS public.{ops} DEFAULT FOR TYPE public.{mood} USING btree AS "
        f"OPERATOR 1 public.<<<, OPERATOR 3 public.===, FUNCTION 1 public.{cmp}(public.{mood}, public.{mood})",
    )
    env.on_cleanup(
        f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING btree CASCADE",
        f"DROP FUNCTION IF EXISTS public.{cmp} CASCADE",
        f"DROP FUNCTION IF EXISTS public.{lt} CASCADE",
        f"DROP FUNCTION IF EXISTS public.{eq} CASCADE",
    )
    sql = read.format(t=t)
    await make_known(env, t, table)
    # Not required to be a hit: with an operator class of the user's in the database, every
    # read may sort with it (the fix passes them all through); before the fix this was a hit.
    reader = await env.twin()
    count = f"SELECT n FROM {table}"
    await reader.probe(count, require_hit=False)
    client = await env.client()
    await client.rows(sql)
    assert await reader.origin(count) != [(0,)], f"{sql!r} never ran the comparison: proves nothing"
    await reader.check(count, why=f"after {sql!r}, whose sort ran the user's comparison")


@pytest.mark.parametrize("read", ["SELECT id FROM {t} WHERE m = 'ok'", "SELECT upper(m) FROM {t} WHERE id = 1"])
async def test_a_lying_immutable_builtin_name_over_the_users_type(env: Env, read: str) -> None:
    """An `=` and an `upper()` of the user's, declared IMMUTABLE over their own enum (so not
    listed as rivals of the builtins: they "cannot be picked for builtin types"), are picked
    for a column of that enum; written in plpgsql, they bump the counter."""
    table, bump = await counter(env)
    mood, t = await _mood(env, bump)
    eq, up = unique("adv_eq"), unique("adv_up")
    await env.admin(
        f"CREATE FUNCTION public.{eq}(public.{mood}, public.{mood}) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$",
        f"CREATE OPERATOR public.= (LEFTARG = public.{mood}, RIGHTARG = public.{mood}, FUNCTION = public.{eq})",
        f"CREATE FUNCTION public.upper(public.{mood}) RETURNS text IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN pg_catalog.upper($1::text); END $$",
    )
    env.on_cleanup(
        f"DROP FUNCTION IF EXISTS public.upper(public.{mood}) CASCADE",
        f"DROP FUNCTION IF EXISTS public.{eq} CASCADE",
        f"DROP FUNCTION IF EXISTS public.{up} CASCADE",
    )
    sql = read.format(t=t)
    await make_known(env, t, table)
    reader, count = await warm_counter(env, table)
    await ran_code_then_check(env, reader, count, sql, "the user's code for a column of their type")


@pytest.mark.parametrize("select", ["upper(m)", "to_json(m)::text"])
async def test_a_view_whose_definition_trusts_a_builtin_name(env: Env, select: str) -> None:
    """A view's definition is judged by the classifier too, and comes back from
    pg_get_viewdef with names as they resolve: `upper(m)` printed bare is the user's
    upper(mood) (IMMUTABLE plpgsql), `to_json(m)` calls the cast to json; each bumps the
    counter when the view is read. (A sort in a view: every read trusts "operator class".)"""
    table, bump = await counter(env)
    mood, t = await _mood(env, bump)
    await lying_upper(env, mood, bump)
    view = unique("adv_view")
    await env.admin(
        f"CREATE VIEW public.{view} AS SELECT {select} AS x FROM {t}", f"GRANT SELECT ON public.{view} TO PUBLIC"
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    await make_known(env, view, table)
    reader, count = await warm_counter(env, table)
    client = await env.client()
    await client.rows(f"SELECT * FROM {view}")
    assert await reader.origin(count) != [(0,)], "reading the view ran nothing: proves nothing"
    await reader.check(count, why=f"after a read of a view defined with {select}")

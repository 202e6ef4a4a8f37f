"""Hostile review of what keys an answer (the session's settings, as the server says) and of
code that writes run where no statement names it.

A configuration reload (ALTER SYSTEM, then pg_reload_conf() through neonpoly) changes every
open session's settings with no SET in any of them, and no ParameterStatus for most settings
(extra_float_digits here): open sessions kept serving, and storing, answers under the settings
they had. A write runs more code than its table's defaults, checks, policies and triggers:
its indexes' expressions and predicates, their operator classes' support functions, an
exclusion constraint's operators, and the CHECKs of domains its values hold inside arrays,
composites and ranges. A lying IMMUTABLE function there may write another table or SET (both
were missed: a stale counter, a session keyed by settings it no longer had). And a read runs
the checks of a temporary domain named like a builtin type (`pg_temp.text`): a session's
temporary schema comes first for types, and was left out of the builtins' rivals; so were
tables' row types, whose casts (`'(1)'::t`) run the checks of t's domain columns, and types
named outside casts (a column definition list, XMLTABLE's columns): their values are made
from text too (XMLTABLE's 'now' was a cached clock). EXPLAIN without ANALYZE runs no
statement, but its planning runs IMMUTABLE functions (a lying one bumped a counter). A view's
cast to such a domain (or a row type holding one) ran its CHECK on every read, unseen: a view's
names are bound when it is made, so its casts were never judged.

The rest pins risks that held: SET LOCAL in a pipeline's implicit transaction, set_config(…,
true) before a tenant's read in psycopg's pipeline mode, per-session TimeZone at a DST edge,
SET LOCAL search_path ended by COMMIT, and a temporary table's owner terminated through
neonpoly. Each case proves a hit before the change (hits are counted over every worker with
NEONPOLY_TEST_WORKERS=2), then compares with a direct connection.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import psycopg
import pytest

from neonpoly import pgwire
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, Twin, eventually, hits, unique
from tests.adversarial.harness2 import counter, fresh_every_time, make_known, warm_counter
from tests.adversarial.rawpg import SYNC, Raw, bind, execute, parse

FLUSH = pgwire.frame(b"H")
SUM = "(0.1::float8 + x)::text"  # '0.30000000000000004' at extra_float_digits 1, '0.3' at 0
LONG, SHORT = "0.30000000000000004", "0.3"


async def _floats(env: Env) -> tuple[str, str]:
    t = await env.table("adv_fl", "x float8", "(0.2)")
    return t, f"SELECT {SUM} FROM {t}"


# --- a configuration reload through neonpoly -------------------------------------------------


@pytest.fixture
async def short_floats(env: Env) -> AsyncIterator[None]:
    """ALTER SYSTEM SET extra_float_digits = 0 (made directly: it changes nothing until a
    reload), put back and reloaded at the end."""
    await env.admin("ALTER SYSTEM SET extra_float_digits = 0")
    try:
        yield
    finally:
        await env.admin("ALTER SYSTEM RESET extra_float_digits", "SELECT pg_reload_conf()")


def function_call(oid: int) -> bytes:
    """A FunctionCall ('F') without arguments, text result."""
    return pgwire.frame(b"F", struct.pack("!ihhh", oid, 0, 0, 0))


async def _reloaded(twin: Twin) -> None:
    """The origin's own word that the reload reached both backends: an idle one applies it
    only after its next command (asked until it says so; SHOW through neonpoly is relayed)."""
    show = "SHOW extra_float_digits"
    await eventually(lambda: twin.origin(show), lambda rows: rows == [("0",)])
    await eventually(lambda: twin.via.rows(show), lambda rows: rows == [("0",)])


@pytest.mark.parametrize("how", ["SELECT pg_reload_conf()", "FunctionCall"])
async def test_configuration_reload_through_neonpoly_reaches_open_sessions(
    env: Env, short_floats: None, how: str
) -> None:
    """An open session's cached read must not keep the settings a reload replaced."""
    _, read = await _floats(env)
    twin = await env.twin()
    rows, _ = await twin.probe(read)
    assert rows == [(LONG,)]
    if how == "FunctionCall":
        oid = await env.admin_val("SELECT 'pg_catalog.pg_reload_conf'::regproc::oid")
        await env.admin("GRANT EXECUTE ON FUNCTION pg_reload_conf() TO trust_user")
        env.on_cleanup("REVOKE EXECUTE ON FUNCTION pg_reload_conf() FROM trust_user")
        raw = await Raw.connect(env.proxy.port)
        try:
            raw.send(function_call(int(oid)))
            assert b"E" not in rawpg.kinds(await raw.until_ready())
        finally:
            await raw.close()
    else:
        reloader = await env.client()
        await reloader.rows(how)
    await _reloaded(twin)
    for _ in range(3):
        await twin.check(read, why=f"after {how} through neonpoly (extra_float_digits 0 in postgresql.auto.conf)")


# --- code a write runs with no statement naming it -------------------------------------------


async def _lying(env: Env, body: str, returns: str = "int") -> str:
    """An IMMUTABLE plpgsql function of (int) that runs `body` (a PERFORM) and returns its
    argument (or true): PostgreSQL takes its word for IMMUTABLE in indexes and domains."""
    fn = unique("adv_lying")
    result = "$1" if returns == "int" else "true"
    await env.admin(
        f"CREATE FUNCTION public.{fn}(int) RETURNS {returns} IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM {body}; RETURN {result}; END $$"
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{fn}(int) CASCADE")
    return fn


async def _setting_writer(env: Env, shape: str) -> tuple[str, str]:
    """(table, a row to insert) whose write runs a function that sets extra_float_digits = 0
    in the writing session, reached through `shape`."""
    sets = "set_config('extra_float_digits', '0', false)"
    if shape == "index expression":
        fn = await _lying(env, sets)
        w = await env.table("adv_ix", "a int")
        await env.admin(f"CREATE INDEX ON {w} (public.{fn}(a))")
        return w, "(1)"
    check = await _lying(env, sets, returns="bool")
    if shape == "partial index predicate":
        w = await env.table("adv_ip", "a int")
        await env.admin(f"CREATE INDEX ON {w} (a) WHERE public.{check}(a)")
        return w, "(1)"
    dom = unique("adv_dom")
    await env.admin(f"CREATE DOMAIN public.{dom} AS int CHECK (public.{check}(VALUE))")
    env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{dom} CASCADE")
    if shape == "array of a checked domain":
        return await env.table("adv_da", f"a public.{dom}[]"), "('{1}')"
    if shape == "range over a checked domain":
        rng = unique("adv_rng")
        await env.admin(f"CREATE TYPE public.{rng} AS RANGE (subtype = public.{dom})")
        env.on_cleanup(f"DROP TYPE IF EXISTS public.{rng} CASCADE")
        return await env.table("adv_dr", f"a public.{rng}"), "('[1,2)')"
    comp = unique("adv_comp")
    await env.admin(f"CREATE TYPE public.{comp} AS (f public.{dom})")
    env.on_cleanup(f"DROP TYPE IF EXISTS public.{comp} CASCADE")
    return await env.table("adv_dc", f"a public.{comp}"), "(ROW(1))"


@pytest.mark.parametrize(
    "shape",
    [
        "index expression",
        "partial index predicate",
        "array of a checked domain",
        "composite with a checked domain field",
        "range over a checked domain",
    ],
)
async def test_a_write_whose_indexes_or_domains_set_a_setting(env: Env, shape: str) -> None:
    """The writer's own session: its next cached read must be answered with the settings
    the write left it, not the ones its identity said before."""
    t, read = await _floats(env)
    w, row = await _setting_writer(env, shape)
    await make_known(env, w, t)  # judged by what the catalog says of them
    twin = await env.twin()
    rows, _ = await twin.probe(read)
    assert rows == [(LONG,)]
    await twin.both(f"INSERT INTO {w} VALUES {row}")
    assert await twin.origin(read) == [(SHORT,)], "the write left the setting alone: proves nothing"
    await twin.check(read, why=f"after a write whose {shape} ran set_config")


async def test_a_write_whose_index_expression_writes_another_table(env: Env) -> None:
    """An IMMUTABLE function in an index expression calling a VOLATILE one that bumps a
    counter: the INSERT names only its table."""
    table, bump = await counter(env)
    fn = await _lying(env, f"public.{bump}()")
    w = await env.table("adv_ix", "a int")
    await env.admin(f"CREATE INDEX ON {w} (public.{fn}(a))")
    await make_known(env, w, table)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run(f"INSERT INTO {w} VALUES (1)")
    await reader.check(read, why="after an INSERT whose index expression bumped the counter")


@pytest.mark.parametrize("machinery", ["btree operator class", "exclusion constraint"])
async def test_a_write_whose_index_machinery_writes_another_table(env: Env, machinery: str) -> None:
    """A unique index's comparison support function, or an exclusion constraint's operator,
    written in plpgsql: they run for the rows a write meets in the index."""
    table, bump = await counter(env)
    w = await env.table("adv_im", "a int")
    ops = unique("adv_ops")
    env.on_cleanup(
        f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING btree CASCADE",
        f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING hash CASCADE",
        "DROP OPERATOR IF EXISTS public.=== (int, int) CASCADE",
    )
    if machinery == "btree operator class":
        cmp = unique("adv_cmp")
        await env.admin(
            f"CREATE FUNCTION public.{cmp}(int, int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM public.{bump}(); RETURN btint4cmp($1, $2); END $$",
            f"CREATE OPERATOR CLASS public.{ops} FOR TYPE int USING btree AS OPERATOR 1 <, OPERATOR 2 <=, "
            f"OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, FUNCTION 1 public.{cmp}(int, int)",
            f"CREATE UNIQUE INDEX ON {w} (a public.{ops})",
        )
        env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{cmp}(int, int) CASCADE")
        row = "(2)"
    else:
        never = unique("adv_never")
        await env.admin(
            f"CREATE FUNCTION public.{never}(int, int) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM public.{bump}(); RETURN false; END $$",
            f"CREATE OPERATOR public.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = public.{never}, COMMUTATOR = ===)",
            f"CREATE OPERATOR CLASS public.{ops} FOR TYPE int USING hash AS OPERATOR 1 public.===, "
            "FUNCTION 1 hashint4(int)",
            f"ALTER TABLE {w} ADD EXCLUDE USING hash (a public.{ops} WITH public.===)",
        )
        env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{never}(int, int) CASCADE")
        row = "(1)"  # the same hash as the row there: the operator runs
    await env.admin(f"INSERT INTO {w} VALUES (1)", f"UPDATE {table} SET n = 0")
    await make_known(env, w, table)
    reader, read = await warm_counter(env, table)
    writer = await env.client()
    await writer.run(f"INSERT INTO {w} VALUES {row}")
    assert await reader.origin(read) != [(0,)], f"the {machinery} never ran: proves nothing"
    await reader.check(read, why=f"after an INSERT whose {machinery} bumped the counter")


@pytest.mark.parametrize("shadow", ["temporary domain", "temporary table's row type"])
async def test_a_temporary_type_named_like_a_builtin_runs_its_checks(env: Env, shadow: str) -> None:
    """A session's temporary schema is searched first for types: `'x'::text` there makes its
    temporary domain `text`, whose CHECK bumps a counter (or a temporary table `date`'s row
    type, whose field is such a domain). Keyed as itself alone, but still a write."""
    table, bump = await counter(env)
    owner = await env.client()
    if shadow == "temporary domain":
        await owner.run(f"CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (public.{bump}() > 0)")
        sql = "SELECT 'x'::text"
    else:
        dom = unique("adv_bumping")
        await env.admin(f"CREATE DOMAIN public.{dom} AS int CHECK (public.{bump}() > 0)")
        env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{dom} CASCADE")
        await owner.run(f"CREATE TEMP TABLE date (v public.{dom})")
        sql = "SELECT '(1)'::date"
    reader, read = await warm_counter(env, table)
    for _ in range(3):
        await owner.rows(sql)
    assert await reader.origin(read) != [(0,)], "the check never ran: proves nothing"
    await reader.check(read, why=f"after reads of a {shadow} whose check bumped the counter")


@pytest.mark.parametrize("cast", ["'(1)'::{t}", "ROW(1)::{t}"])
async def test_a_cast_to_a_tables_row_type_runs_its_domains_checks(env: Env, cast: str) -> None:
    """A table's row type is a type like any other: a cast to it builds a row, and the CHECK
    of a domain column runs (a literal's read was cached; the ROW() read, volatile for its
    computed input, evicted nothing)."""
    table, bump = await counter(env)
    dom = unique("adv_bumping")
    await env.admin(f"CREATE DOMAIN public.{dom} AS int CHECK (public.{bump}() > 0)")
    env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{dom} CASCADE")
    t = await env.table("adv_rt", f"v public.{dom}")
    await make_known(env, t, table)
    reader, read = await warm_counter(env, table)
    caster = await env.client()
    for _ in range(3):
        await caster.rows(f"SELECT {cast.format(t=t)}")
    assert await reader.origin(read) != [(0,)], "the check never ran: proves nothing"
    await reader.check(read, why=f"after reads of {cast} whose domain's check bumped the counter")


@pytest.mark.parametrize(
    "make",
    [
        "SELECT * FROM jsonb_to_record('{{\"v\": 5}}') AS x(v {d})",
        "SELECT * FROM xmltable('/r' PASSING xml '<r><v>5</v></r>' COLUMNS v {d} PATH 'v')",
    ],
    ids=["column definition list", "XMLTABLE column"],
)
async def test_a_column_of_a_checked_domain_made_from_text_runs_its_checks(env: Env, make: str) -> None:
    """A type named where no cast is (a column definition list, XMLTABLE's columns): the
    values are made with its input, and a domain's CHECK runs (the XMLTABLE read was cached,
    the other, volatile, evicted nothing)."""
    table, bump = await counter(env)
    dom = unique("adv_bumping")
    await env.admin(f"CREATE DOMAIN public.{dom} AS int CHECK (public.{bump}() > 0)")
    env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{dom} CASCADE")
    reader, read = await warm_counter(env, table)
    maker = await env.client()
    for _ in range(3):
        assert await maker.rows(make.format(d=dom)) == [(5,)]
    assert await reader.origin(read) != [(0,)], "the check never ran: proves nothing"
    await reader.check(read, why="after reads whose domain column's check bumped the counter")


async def test_xmltable_column_of_a_date_type_reads_the_clock(env: Env) -> None:
    """XMLTABLE (syntax, not a function call) makes a timestamptz from the document's text:
    'now' there is the clock, read by a query that names no clock."""
    t = await env.table("adv_xml", "body xml", "('<r><v>now</v></r>')")
    client = await env.client()
    await fresh_every_time(client, f"SELECT x.v FROM {t}, xmltable('/r' PASSING body COLUMNS v timestamptz PATH 'v') x")


@pytest.mark.parametrize(
    "body",
    ["SELECT a::public.{d} AS v FROM {t}", "SELECT ROW(a)::public.{rt} AS v FROM {t}", "benign"],
    ids=["cast to a domain", "cast to a row type holding one", "a benign domain stays cached"],
)
async def test_a_view_whose_definition_casts_to_a_checked_domain(env: Env, body: str) -> None:
    """A view's names are bound when it is made, so its casts are not judged by rivals: a
    cast there to a domain whose CHECK runs code of the user's is that code, run by every
    read of the view. A domain whose CHECK is plain SQL is no code: the view stays cached."""
    table, bump = await counter(env)
    dom = unique("adv_checked")
    check = "VALUE > 0" if body == "benign" else f"public.{bump}() > 0"
    await env.admin(f"CREATE DOMAIN public.{dom} AS int CHECK ({check})")
    env.on_cleanup(f"DROP DOMAIN IF EXISTS public.{dom} CASCADE")
    rt = await env.table("adv_rt", f"v public.{dom}")
    t = await env.table("adv_src", "a int", "(1)")
    view = unique("adv_v")
    definition = "SELECT a, 5::public.{d} AS v FROM {t}" if body == "benign" else body
    await env.admin(
        f"CREATE VIEW public.{view} AS {definition.format(d=dom, t=t, rt=rt)}", f"GRANT SELECT ON {view} TO PUBLIC"
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    await make_known(env, view, table)
    reader, read = await warm_counter(env, table)
    viewer = await env.twin()
    if body == "benign":
        await viewer.probe(f"SELECT * FROM {view}")
        return
    for _ in range(3):
        await viewer.via.rows(f"SELECT * FROM {view}")
    assert await reader.origin(read) != [(0,)], "the check never ran: proves nothing"
    await reader.check(read, why="after reads of a view whose cast ran a domain's CHECK that bumped the counter")


async def test_explain_plans_a_lying_immutable_function(env: Env) -> None:
    """EXPLAIN (without ANALYZE) runs nothing, but plans: the planner folds an IMMUTABLE
    call with constant arguments by running it, and this one bumps a counter."""
    table, bump = await counter(env)
    fn = await _lying(env, f"public.{bump}()")
    reader, read = await warm_counter(env, table)
    explainer = await env.client()
    await explainer.rows(f"EXPLAIN SELECT public.{fn}(1)")
    assert await reader.origin(read) == [(1,)], "planning never ran the function: proves nothing"
    await reader.check(read, why="after EXPLAIN planned a function that bumped the counter")


# --- pinned: settings that last only a transaction, per-session time zones, tenants ----------


def _pbe(sql: str) -> bytes:
    return parse("", sql) + bind("", "") + execute("")


async def test_set_local_time_zone_in_a_pipelines_implicit_transaction(env: Env) -> None:
    """SET LOCAL TimeZone, then (after a Flush, whose answers are read) a read before the
    Sync: the read runs in the same implicit transaction, in Tokyo. It must not be answered
    from, nor stored in, the session's UTC entries; a plain session's cached read stays UTC."""
    t = await env.table("adv_tz", "ts timestamptz", "('2024-03-10 06:30+00')")
    read = f"SELECT ts::text FROM {t}"
    seen: list[list[list[list[bytes | None]]]] = []
    for port in (env.proxy.port, env.pg.port):
        plain, piped = await Raw.connect(port), await Raw.connect(port)
        answers = []
        try:
            for _ in range(3):
                plain.send(_pbe(read), SYNC)
                answers.append(rawpg.rows(await plain.until_ready()))
            for _ in range(3):
                piped.send(_pbe("SET LOCAL TimeZone = 'Asia/Tokyo'"), _pbe("SELECT 1"), FLUSH)
                for _ in range(8):  # 1 2 N C, 1 2 D C (the NoticeResponse: SET LOCAL outside a block)
                    await piped.message()
                piped.send(_pbe(read), SYNC)
                answers.append(rawpg.rows(await piped.until_ready()))
            for _ in range(5):  # until a hit (with workers, one that is not provably caught up passes)
                before = hits(env.proxy)
                plain.send(_pbe(read), SYNC)
                last = rawpg.rows(await plain.until_ready())
                if port == env.pg.port or hits(env.proxy) > before:
                    break
            else:
                raise AssertionError("the plain read was never served from cache: proves nothing")
            answers.append(last)
        finally:
            await plain.close()
            await piped.close()
        seen.append(answers)
    assert seen[0] == seen[1], f"proxy {seen[0]!r} != direct {seen[1]!r}"
    assert seen[1][3] == [[b"2024-03-10 15:30:00+09"]]


async def test_set_config_local_before_a_tenants_read_in_psycopg_pipeline_mode(env: Env) -> None:
    """Row-level security on current_setting('app.tenant'): set_config(…, true) and the read
    in one pipeline (one implicit transaction), then the read alone again."""
    t = await env.table("adv_rls", "tenant text, v text", "('a', 'a-row')", "('b', 'b-row')")
    role = await env.role("adv_tenant")
    await env.admin(
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON {t} USING (tenant = current_setting('app.tenant'))",
    )
    twin = await env.twin(env.login(role))
    await twin.both("SET app.tenant = 'a'")
    read = f"SELECT v FROM {t} ORDER BY v"
    rows, _ = await twin.probe(read)
    assert rows == [("a-row",)]
    for side in (twin.via, twin.direct):
        conn = side.conn
        assert isinstance(conn, psycopg.AsyncConnection)
        async with conn.pipeline():
            await conn.execute("SELECT set_config('app.tenant', 'b', true)")
            cur = await conn.execute(read)
        assert [tuple(r) for r in await cur.fetchall()] == [("b-row",)]
    await twin.check(read, why="after the pipeline whose set_config lasted its implicit transaction")


async def test_set_local_search_path_ends_with_its_commit(env: Env) -> None:
    """SET LOCAL search_path in a transaction block: after COMMIT the old path is back."""
    schema = unique("adv_sp")
    name = unique("adv_spt")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{name} AS SELECT 'public'::text AS v",
        f"CREATE TABLE {schema}.{name} AS SELECT '{schema}'::text AS v",
        f"GRANT SELECT ON public.{name}, {schema}.{name} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{name}", f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    twin = await env.twin()
    read = f"SELECT v FROM {name}"
    await twin.probe(read)
    await twin.both("BEGIN", f"SET LOCAL search_path = {schema}, public")
    await twin.check(read, why="inside the transaction")
    await twin.both("COMMIT")
    await twin.probe(read)


async def test_time_zones_from_the_startup_packet_at_a_dst_edge(env: Env) -> None:
    """Two sessions whose TimeZone comes from the startup packet (libpq options): the same
    text, stored and served per zone, around New York's spring-forward gap."""
    t = await env.table("adv_dst", "ts timestamptz", "('2024-03-10 06:59:59+00')", "('2024-03-10 07:00:00+00')")
    read = f"SELECT ts::text, (ts + interval '1 day')::text, date_trunc('day', ts)::text FROM {t} ORDER BY ts"
    answers = []
    for zone in ("UTC", "America/New_York", "Australia/Lord_Howe"):
        twin = await env.twin(env.login(options=f"-c TimeZone={zone}"))
        rows, _ = await twin.probe(read)
        answers.append(rows)
    assert len({repr(a) for a in answers}) == 3, answers


async def test_temporary_table_owner_terminated_through_neonpoly(env: Env) -> None:
    """pg_terminate_backend of the session owning a temporary table: its backend drops the
    table on the way out, with no DDL statement; catalog helpers elsewhere see it go."""
    owner = await env.client()
    name = unique("adv_tmp")
    await owner.run(f"CREATE TEMP TABLE {name} (a int)")
    schema = (await owner.rows("SELECT pg_my_temp_schema()::regnamespace::text"))[0][0]
    pid = await owner.backend_pid()
    twin = await env.twin()
    read = f"SELECT to_regclass('{schema}.{name}') IS NOT NULL"
    rows, _ = await twin.probe(read)
    assert rows == [(True,)]
    killer = await env.client()
    await killer.rows(f"SELECT pg_terminate_backend({pid})")
    # The backend drops the table (and commits) before it closes its socket; neonpoly learns
    # of the drop only from that close. A read in between is a write neonpoly has not seen
    # yet, so the check starts once neonpoly has handled the close (and closed the owner).
    await owner.ended_by_peer()
    await eventually(lambda: twin.origin(read), lambda rows: rows == [(False,)])
    await twin.check(read, why="after the temporary table's owner was terminated through neonpoly")

"""Class 1: session state the cache key cannot see.

Every case builds two sessions (A and B) that send byte-identical SQL with the same role,
database and keyed settings, but whose answers differ because of state outside the key.
One of them warms the cache until a provable hit; the other must still get its own answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.adversarial.harness import Client, Env, psql_lines, unique


async def _public_and_schema_tables(env: Env, schema: str, grant: str = "PUBLIC") -> str:
    """public.<t> holds 'public' and <schema>.<t> holds the schema's name."""
    table = unique("adv_t")
    await env.admin(
        f'CREATE SCHEMA IF NOT EXISTS "{schema}"',
        f'GRANT USAGE ON SCHEMA "{schema}" TO {grant}',
        f"CREATE TABLE public.{table} (v text)",
        f"INSERT INTO public.{table} VALUES ('public')",
        f'CREATE TABLE "{schema}".{table} (v text)',
        f"""INSERT INTO "{schema}".{table} VALUES ('{schema.replace("'", "''")}')""",
        f"GRANT SELECT ON public.{table} TO {grant}",
        f'GRANT SELECT ON "{schema}".{table} TO {grant}',
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{table}", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return table


# --- temporary tables ---------------------------------------------------------------------


async def test_temp_table_rows_are_not_served_to_another_session(env: Env) -> None:
    """A's TEMP table shadows public.t for A only; B must keep reading public.t."""
    table = await env.table("adv_tmp", "v text", "('public')")
    a = await env.twin()
    await a.both(f"CREATE TEMP TABLE {table} (v text)", f"INSERT INTO {table} VALUES ('temp of A')")
    read = f"SELECT v FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [("temp of A",)]
    b = await env.twin()
    await b.check(read, why="session B (no temp table) after A cached its TEMP table's rows")


async def test_public_rows_are_not_served_to_a_session_with_a_temp_table(env: Env) -> None:
    """The other direction: B caches public.t, then A (which has a TEMP t) reads t."""
    table = await env.table("adv_tmp", "v text", "('public')")
    a = await env.twin()
    await a.both(f"CREATE TEMP TABLE {table} (v text)", f"INSERT INTO {table} VALUES ('temp of A')")
    b = await env.twin()
    read = f"SELECT v FROM {table}"
    rows, _ = await b.probe(read)
    assert rows == [("public",)]
    await a.check(read, why="session A (TEMP table) after B cached public's rows")


async def _own_temp_schema(client: Client) -> str:
    # pg_my_temp_schema() is volatile for neonpoly: always answered by the session's backend.
    rows = await client.rows("SELECT nspname::text FROM pg_namespace WHERE oid = pg_my_temp_schema()")
    return str(rows[0][0])


async def test_current_schemas_true_differs_with_a_temp_schema(env: Env) -> None:
    """current_schemas(true) lists the session's own pg_temp_N once it has a TEMP table.
    (Per backend, so each proxy session is compared with its own temp schema's name.)"""
    read = "SELECT current_schemas(true)::text"
    a = await env.twin()
    b = await env.twin()
    for twin in (a, b):
        await twin.both(f"CREATE TEMP TABLE {unique('adv_tmp')} (v int)")
    rows, _ = await a.probe(read, compare=False)
    assert rows == [(f"{{{await _own_temp_schema(a.via)},pg_catalog,public}}",)]
    got, hit = await b.through(read)
    mine = await _own_temp_schema(b.via)
    assert got == [(f"{{{mine},pg_catalog,public}}",)], f"B got {got!r} (hit={hit}), its temp schema is {mine}"


async def test_search_path_pg_temp_first_differs_per_session(env: Env) -> None:
    """SET search_path = pg_temp, public is the same text in every session but names each
    session's own temporary schema (current_schema() = pg_temp_N)."""
    read = "SELECT current_schema()::text"
    a = await env.twin()
    b = await env.twin()
    for twin in (a, b):
        await twin.both(f"CREATE TEMP TABLE {unique('adv_tmp')} (v int)", "SET search_path = pg_temp, public")
    rows, _ = await a.probe(read, compare=False)
    assert rows == [(await _own_temp_schema(a.via),)]
    got, hit = await b.through(read)
    mine = await _own_temp_schema(b.via)
    assert got == [(mine,)], f"B got {got!r} (hit={hit}), its temp schema is {mine}"


# --- defaults set with ALTER ROLE / ALTER DATABASE -----------------------------------------


@dataclass(frozen=True)
class RoleDefault:
    id: str
    setting: str  # the ALTER ROLE ... SET clause
    read: str  # the query; {t} is a table holding 'public', {s}.{t} one holding the schema name


ROLE_DEFAULTS = [
    RoleDefault("search_path", "search_path = {s}, public", "SELECT v FROM {t}"),
    RoleDefault("bytea_output", "bytea_output = 'escape'", "SELECT '\\x01ff'::bytea::text"),
    RoleDefault("extra_float_digits", "extra_float_digits = 0", "SELECT (0.1::float8 + 0.2::float8)::text"),
    RoleDefault("DateStyle", "DateStyle = 'SQL, DMY'", "SELECT '2024-12-31'::date::text"),
    RoleDefault("TimeZone", "TimeZone = 'Asia/Kolkata'", "SELECT '2024-01-01 00:00+00'::timestamptz::text"),
    RoleDefault("IntervalStyle", "IntervalStyle = 'iso_8601'", "SELECT interval '1 day 2 hours'::text"),
    RoleDefault("role", "role = 'trust_user'", "SELECT current_user::text"),
]


@pytest.mark.parametrize("case", ROLE_DEFAULTS, ids=[c.id for c in ROLE_DEFAULTS])
async def test_alter_role_set_default_splits_sessions(env: Env, case: RoleDefault) -> None:
    """Sessions opened before and after ALTER ROLE ... SET (sent through neonpoly) start with
    different values; neither may be served the other's answer."""
    role = await env.role()
    schema = unique("adv_s")
    table = await _public_and_schema_tables(env, schema)
    await env.admin(f"GRANT trust_user TO {role}")
    read = case.read.format(t=table, s=schema)
    before = await env.twin(env.login(role))
    su = await env.client()
    await su.run(f"ALTER ROLE {role} SET {case.setting.format(s=schema)}")
    after = await env.twin(env.login(role))
    first = await before.origin(read)
    second = await after.origin(read)
    assert first != second, f"the default does not change {read!r}: the case proves nothing"
    await before.probe(read)
    await after.check(read, why=f"session opened after ALTER ROLE SET {case.id}, once the older one cached")


async def test_alter_role_set_tenant_with_row_level_security(env: Env) -> None:
    """A multi-tenant table filtered by current_setting('app.tenant'), set per role with
    ALTER ROLE ... SET: the query text never names the setting."""
    role = await env.role()
    table = await env.table("adv_rls", "tenant text, secret text", "('a', 'secret of a')", "('b', 'secret of b')")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant ON {table} USING (tenant = current_setting('app.tenant', true))",
        f"ALTER ROLE {role} SET app.tenant = 'a'",
    )
    tenant_a = await env.twin(env.login(role))
    su = await env.client()
    await su.run(f"ALTER ROLE {role} SET app.tenant = 'b'")
    tenant_b = await env.twin(env.login(role))
    read = f"SELECT secret FROM {table} ORDER BY 1"
    rows, _ = await tenant_a.probe(read)
    assert rows == [("secret of a",)]
    await tenant_b.check(read, why="tenant b's session after tenant a's session cached")


async def test_alter_database_set_search_path(env: Env) -> None:
    """ALTER DATABASE ... SET search_path: sessions before and after it see different tables."""
    database = unique("adv_db")
    await env.admin(f"CREATE DATABASE {database}", database="postgres")
    env.on_cleanup(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    schema = unique("adv_s")
    table = unique("adv_t")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"CREATE TABLE public.{table} (v text)",
        f"INSERT INTO public.{table} VALUES ('public')",
        f"CREATE TABLE {schema}.{table} (v text)",
        f"INSERT INTO {schema}.{table} VALUES ('{schema}')",
        database=database,
    )
    before = await env.twin(env.login("postgres", database))
    await before.via.run(f"ALTER DATABASE {database} SET search_path = {schema}, public")
    await before.direct.run("SELECT 1")
    after = await env.twin(env.login("postgres", database))
    read = f"SELECT v FROM {table}"
    await before.probe(read)
    await after.check(read, why="session opened after ALTER DATABASE SET search_path")


# --- harmless-looking settings that a policy reads -----------------------------------------


async def test_application_name_in_row_level_security_policy(env: Env) -> None:
    """application_name is treated as harmless, but a policy may filter on it."""
    role = await env.role()
    table = await env.table("adv_rls", "app text, secret text", "('app_a', 'secret of a')", "('app_b', 'secret of b')")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY by_app ON {table} USING (app = current_setting('application_name'))",
    )
    a = await env.twin(env.login(role, application_name="app_a"))
    b = await env.twin(env.login(role, application_name="app_b"))
    read = f"SELECT secret FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [("secret of a",)]
    await b.check(read, why="application_name=app_b after app_a cached")


async def test_set_application_name_then_policy(env: Env) -> None:
    """Same, with SET application_name in the session instead of the startup packet."""
    role = await env.role()
    table = await env.table("adv_rls", "app text, secret text", "('app_a', 'secret of a')", "('app_b', 'secret of b')")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY by_app ON {table} USING (app = current_setting('application_name'))",
    )
    a = await env.twin(env.login(role))
    b = await env.twin(env.login(role))
    await a.both("SET application_name = 'app_a'")
    await b.both("SET application_name = 'app_b'")
    read = f"SELECT secret FROM {table}"
    await a.probe(read)
    await b.check(read, why="SET application_name = app_b after app_a cached")


# --- server code that changes the session ----------------------------------------------


async def test_trigger_that_calls_set_config(env: Env) -> None:
    """An INSERT's trigger switches the session's search_path; later reads of that session
    must not be stored under (or served from) the key of the path it started with."""
    schema = unique("adv_s")
    table = await _public_and_schema_tables(env, schema)
    log = await env.table("adv_log", "v int")
    fn = unique("adv_fn")
    await env.admin(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM set_config('search_path', '{schema}, public', false); RETURN NEW; END $$",
        f"CREATE TRIGGER {fn} BEFORE INSERT ON {log} FOR EACH ROW EXECUTE FUNCTION {fn}()",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")
    a = await env.twin()
    await a.both(f"INSERT INTO {log} VALUES (1)")
    read = f"SELECT v FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [(schema,)]
    b = await env.twin()
    await b.check(read, why="a fresh session after a trigger moved another session's search_path")


async def test_column_default_that_calls_set_config(env: Env) -> None:
    """No trigger at all: a column DEFAULT calls a function that sets search_path."""
    schema = unique("adv_s")
    table = await _public_and_schema_tables(env, schema)
    fn = unique("adv_fn")
    await env.admin(
        f"CREATE FUNCTION {fn}() RETURNS int LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM set_config('search_path', '{schema}, public', false); RETURN 1; END $$"
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")
    log = await env.table("adv_log", f"id int, v int DEFAULT {fn}()")
    a = await env.twin()
    await a.both(f"INSERT INTO {log} (id) VALUES (1)")
    read = f"SELECT v FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [(schema,)]
    b = await env.twin()
    await b.check(read, why="a fresh session after a column DEFAULT moved another session's search_path")


# --- roles --------------------------------------------------------------------------------


async def test_set_session_authorization_after_set_role(env: Env) -> None:
    """SET SESSION AUTHORIZATION resets the role: A (SET ROLE x; SET SESSION AUTHORIZATION y)
    is y, B (SET SESSION AUTHORIZATION y; SET ROLE x) is x."""
    a = await env.twin()
    b = await env.twin()
    await env.admin("GRANT trust_user TO md5_user")
    env.on_cleanup("REVOKE trust_user FROM md5_user")
    await a.both("SET ROLE trust_user", "SET SESSION AUTHORIZATION md5_user")
    await b.both("SET SESSION AUTHORIZATION md5_user", "SET ROLE trust_user")
    read = "SELECT current_user::text, session_user::text"
    rows, _ = await a.probe(read)
    assert rows == [("md5_user", "md5_user")]
    await b.check(read, why="B (role trust_user under md5_user) after A (md5_user) cached")


async def test_renamed_role_and_new_role_with_the_old_name(env: Env) -> None:
    """A logs in as r; r is renamed (through neonpoly) and a new role r is created. A is now
    the renamed role, B (new login as r) another role: same startup user, different rows."""
    old = await env.role()
    table = await env.table("adv_rls", "owner text, secret text")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY own ON {table} USING (owner = current_user)",
    )
    a = await env.twin(env.login(old))
    renamed = unique("adv_renamed")
    su = await env.client()
    await su.run(f"ALTER ROLE {old} RENAME TO {renamed}")
    env.on_cleanup(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{renamed}'",
        f"DROP OWNED BY {renamed} CASCADE",
        f"DROP ROLE IF EXISTS {renamed}",
    )
    await su.run(f"CREATE ROLE {old} LOGIN PASSWORD '{env.passwords[old]}'")
    await su.run(f"GRANT SELECT ON {table} TO {old}")
    await su.run(f"INSERT INTO {table} VALUES ('{renamed}', 'secret of the renamed role'), ('{old}', 'secret of new')")
    read = f"SELECT current_user::text, secret FROM {table}"
    rows, _ = await a.probe(read)
    assert rows == [(renamed, "secret of the renamed role")]
    b = await env.twin(env.login(old))
    await b.check(read, why="the new role with the old name after the renamed role's session cached")


# --- search_path spellings ------------------------------------------------------------------


async def test_quoted_search_path_is_one_schema(env: Env) -> None:
    """SET search_path = 'x, y' names ONE schema called "x, y"; SET search_path = x, y
    names two. Same normalised text, different tables."""
    x, y = unique("adv_x"), unique("adv_y")
    odd = f"{x}, {y}"
    table = await _public_and_schema_tables(env, odd)
    await env.admin(
        f"CREATE SCHEMA {x}",
        f"CREATE TABLE {x}.{table} (v text)",
        f"INSERT INTO {x}.{table} VALUES ('{x}')",
        f"CREATE SCHEMA {y}",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {x} CASCADE", f"DROP SCHEMA IF EXISTS {y} CASCADE")
    one = await env.twin()
    two = await env.twin()
    await one.both(f"SET search_path = '{odd}'")
    await two.both(f"SET search_path = {x}, {y}")
    read = f"SELECT v FROM {table}"
    rows, _ = await one.probe(read)
    assert rows == [(odd,)]
    await two.check(read, why=f"search_path {x}, {y} after search_path '{odd}' cached")


async def test_identifier_quoted_search_path_is_one_schema(env: Env) -> None:
    """SET search_path = "x, y" (a quoted identifier) is one schema, too."""
    x, y = unique("adv_x"), unique("adv_y")
    odd = f"{x}, {y}"
    table = await _public_and_schema_tables(env, odd)
    await env.admin(
        f"CREATE SCHEMA {x}", f"CREATE TABLE {x}.{table} (v text)", f"INSERT INTO {x}.{table} VALUES ('{x}')"
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {x} CASCADE")
    one = await env.twin()
    two = await env.twin()
    await two.both(f"SET search_path = {x}, {y}")
    await one.both(f'SET search_path = "{odd}"')
    read = f"SELECT v FROM {table}"
    await two.probe(read)
    await one.check(read, why=f'search_path "{odd}" after search_path {x}, {y} cached')


async def test_startup_options_search_path(env: Env) -> None:
    """search_path in the startup packet (psql, options=-c search_path=...)."""
    schema = unique("adv_s")
    table = await _public_and_schema_tables(env, schema)
    read = f"SELECT v FROM {table}"
    started = env.login().with_params(options=f"-c search_path={schema},public")
    for _ in range(3):
        assert await psql_lines(started.url("127.0.0.1", env.proxy.port), read) == [schema]
    plain = env.login().url("127.0.0.1", env.proxy.port)
    hits_before = env.proxy.totals().get("hit", 0)
    # Three runs hit in one process; each psql is a new connection, and with `--workers N` each
    # worker stores its own entries, so run on until one is served from cache (bounded).
    for _ in range(12):
        assert await psql_lines(plain, read) == ["public"]
        if env.proxy.totals().get("hit", 0) > hits_before:
            break
    assert env.proxy.totals().get("hit", 0) > hits_before, "the plain session never hit: nothing was proven"


async def test_startup_options_custom_setting_with_policy(env: Env) -> None:
    """options=-c app.tenant=... in the startup packet, read by a policy."""
    role = await env.role()
    table = await env.table("adv_rls", "tenant text, secret text", "('a', 'secret of a')", "('b', 'secret of b')")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant ON {table} USING (tenant = current_setting('app.tenant', true))",
    )
    a = await env.twin(env.login(role, options="-c app.tenant=a"))
    b = await env.twin(env.login(role, options="-c app.tenant=b"))
    read = f"SELECT secret FROM {table}"
    await a.probe(read, require_hit=False)
    await b.check(read, why="tenant b (startup options) after tenant a")


# --- functions whose answer is the session ------------------------------------------------


SESSION_FUNCTIONS = [
    "SELECT pg_backend_pid()",
    "SELECT inet_client_port()",
    "SELECT pg_my_temp_schema()::int",
    "SELECT pg_catalog.pg_backend_pid()",
    "SELECT (SELECT pg_backend_pid())",
    "SELECT pid FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    "SELECT current_setting('application_name')",
]


@pytest.mark.parametrize("read", SESSION_FUNCTIONS)
async def test_session_functions_answer_for_their_own_session(env: Env, read: str) -> None:
    """Two sessions through neonpoly (temp tables and application names differ) must get
    different answers: each its own backend, port, temp schema, name. Not caching is right."""
    answers = []
    for name in ("adv_one", "adv_two"):
        client = await env.client(env.login(application_name=name))
        await client.run(f"CREATE TEMP TABLE {unique('adv_tmp')} (v int)")
        for _ in range(3):
            rows = await client.rows(read)
        answers.append(rows)
    assert answers[0] != answers[1], f"two sessions got the same answer to {read!r}: {answers[0]!r}"


async def test_reset_all_and_discard_all_go_back(env: Env) -> None:
    schema = unique("adv_s")
    table = await _public_and_schema_tables(env, schema)
    read = f"SELECT v FROM {table}"
    twin = await env.twin()
    await twin.both(f"SET search_path = {schema}, public")
    await twin.probe(read)
    await twin.both("RESET ALL")
    await twin.check(read, why="after RESET ALL")
    await twin.both(f"SET search_path = {schema}, public")
    await twin.check(read, why="after SET search_path again")
    await twin.both("DISCARD ALL")
    await twin.check(read, why="after DISCARD ALL")
    other = await env.twin()
    await other.probe(read, require_hit=False)


async def test_set_local_ends_with_the_transaction(env: Env) -> None:
    schema = unique("adv_s")
    table = await _public_and_schema_tables(env, schema)
    read = f"SELECT v FROM {table}"
    twin = await env.twin()
    await twin.probe(read)
    await twin.both("BEGIN", f"SET LOCAL search_path = {schema}, public")
    await twin.check(read, why="inside the transaction with SET LOCAL")
    await twin.both("COMMIT")
    await twin.check(read, why="after COMMIT ended SET LOCAL")
    await twin.both("SET search_path = public")
    await twin.both("BEGIN", f"SET LOCAL search_path = {schema}", "COMMIT")
    await twin.check(read, why="SET LOCAL in a committed transaction")


async def test_plan_settings_change_row_order(env: Env) -> None:
    """enable_seqscan & co. are treated as harmless, but without ORDER BY they change the
    order rows come back in: a session with an index scan must not get a seqscan's order."""
    table = unique("adv_ord")
    await env.admin(
        f"CREATE TABLE {table} (id int PRIMARY KEY, pad text)",
        f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 200) g",
        f"UPDATE {table} SET pad = 'y' WHERE id % 3 = 0",  # heap order no longer id order
        f"ANALYZE {table}",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {table}")
    read = f"SELECT id FROM {table} WHERE id > 0"
    seq = await env.twin()
    idx = await env.twin()
    await seq.both("SET enable_indexscan = off", "SET enable_bitmapscan = off")
    await idx.both("SET enable_seqscan = off", "SET enable_bitmapscan = off")
    assert await seq.origin(read) != await idx.origin(read), "plans give the same order: proves nothing"
    await seq.probe(read)
    await idx.check(read, why="index-scan session after a seqscan session cached (row order)")

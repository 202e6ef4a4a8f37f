"""Class 3: what an entry depends on that neonpoly does not track, or tracks wrongly."""

from __future__ import annotations

import pytest

from tests.adversarial.harness import Env, eventually, unique


async def test_cte_named_like_the_table_it_reads(env: Env) -> None:
    """WITH t AS (SELECT * FROM t): the inner t is the table (a plain CTE cannot see itself)."""
    table = await env.table("adv_cte", "id int PRIMARY KEY, v text", "(1, 'old')")
    reader = await env.twin()
    await reader.probe(f"SELECT v FROM {table}")  # neonpoly learns the table
    read = f"WITH {table} AS (SELECT * FROM {table}) SELECT v FROM {table}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"UPDATE {table} SET v = 'new' WHERE id = 1")
    await reader.check(read, why="after UPDATE of the table a same-named CTE reads")


async def test_row_level_security_policy_reads_another_table(env: Env) -> None:
    role = await env.role()
    members = await env.table("adv_mem", "member text, tenant text")
    docs = await env.table("adv_docs", "tenant text, body text", "('a', 'doc of a')", "('b', 'doc of b')")
    await env.admin(
        f"ALTER TABLE {docs} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY m ON {docs} USING (tenant IN (SELECT tenant FROM {members} WHERE member = current_user))",
        f"INSERT INTO {members} VALUES ('{role}', 'a')",
    )
    reader = await env.twin(env.login(role))
    await reader.probe(f"SELECT count(*) FROM {members}")  # neonpoly learns the membership table
    read = f"SELECT body FROM {docs} ORDER BY 1"
    rows, _ = await reader.probe(read)
    assert rows == [("doc of a",)]
    writer = await env.client()
    await writer.run(f"INSERT INTO {members} VALUES ('{role}', 'b')")
    await reader.check(read, why="after a membership INSERT (through neonpoly) that the policy reads")
    await writer.run(f"DELETE FROM {members} WHERE member = '{role}'")
    await reader.check(read, why="after a membership DELETE that revokes access")


async def test_relation_lookup_poisoned_by_a_search_path_operator(env: Env) -> None:
    """A client puts its own = (name, text) operator first on its search_path. neonpoly's
    relation lookup runs in that client's session, so it learns that a view reads nothing;
    every session then keeps the view's entries across writes to its base table."""
    base = await env.table("adv_base", "id int PRIMARY KEY, v text", "(1, 'old')")
    view = unique("adv_view")
    evil = unique("adv_evil")
    await env.admin(
        f"CREATE VIEW {view} AS SELECT v FROM {base} WHERE id = 1",
        f"GRANT SELECT ON {view} TO PUBLIC",
        f"CREATE SCHEMA {evil}",
        f"CREATE FUNCTION {evil}.never(name, text) RETURNS bool IMMUTABLE LANGUAGE sql AS $$ SELECT false $$",
        f"CREATE OPERATOR {evil}.= (LEFTARG = name, RIGHTARG = text, FUNCTION = {evil}.never)",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS {view}", f"DROP SCHEMA IF EXISTS {evil} CASCADE")
    clean = await env.twin()
    await clean.probe(f"SELECT v FROM {base} WHERE id = 1")  # the base table is known
    attacker = await env.twin()
    await attacker.both(f"SET search_path = {evil}, pg_catalog, public")
    # Not required to be hits: with an `=` of the user's anywhere in the database, a view
    # whose definition prints a bare `=` is not cached at all (relations.py
    # `_definition_rivals`: the printed name may be the user's); before that, both were hits.
    await attacker.probe(f"SELECT v FROM {view}", require_hit=False)
    read = f"SELECT v FROM {view}"
    await clean.probe(read, require_hit=False)
    writer = await env.client()
    await writer.run(f"UPDATE {base} SET v = 'new' WHERE id = 1")
    await clean.check(read, why="a clean session's view read after UPDATE of its base table")
    await attacker.check(read, why="the attacker's own view read after UPDATE of its base table")


async def test_view_without_poisoning_control(env: Env) -> None:
    """Control for the poisoning case: the same view and write, no attacker."""
    base = await env.table("adv_base", "id int PRIMARY KEY, v text", "(1, 'old')")
    view = unique("adv_view")
    await env.admin(f"CREATE VIEW {view} AS SELECT v FROM {base} WHERE id = 1", f"GRANT SELECT ON {view} TO PUBLIC")
    env.on_cleanup(f"DROP VIEW IF EXISTS {view}")
    clean = await env.twin()
    await clean.probe(f"SELECT v FROM {base} WHERE id = 1")
    read = f"SELECT v FROM {view}"
    await clean.probe(read)
    writer = await env.client()
    await writer.run(f"UPDATE {base} SET v = 'new' WHERE id = 1")
    await clean.check(read, why="view read after UPDATE of its base table")


async def test_materialized_view_refresh(env: Env) -> None:
    base = await env.table("adv_base", "v int", "(1)")
    mv = unique("adv_mv")
    await env.admin(
        f"CREATE MATERIALIZED VIEW {mv} AS SELECT sum(v) AS s FROM {base}", f"GRANT SELECT ON {mv} TO PUBLIC"
    )
    env.on_cleanup(f"DROP MATERIALIZED VIEW IF EXISTS {mv}")
    reader = await env.twin()
    read = f"SELECT s FROM {mv}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"INSERT INTO {base} VALUES (41)")
    await reader.check(read, why="after INSERT into the base (matview not refreshed yet)")
    await writer.run(f"REFRESH MATERIALIZED VIEW {mv}")
    await reader.check(read, why="after REFRESH MATERIALIZED VIEW")


async def test_foreign_table_over_a_local_table(env: Env) -> None:
    """postgres_fdw loopback: the foreign table reads a table neonpoly sees written."""
    base = await env.table("adv_base", "id int, v text", "(1, 'old')")
    server, ft = unique("adv_srv"), unique("adv_ft")
    await env.admin(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw",
        f"CREATE SERVER {server} FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host '127.0.0.1', port '{env.pg.port}', dbname 'app', sslmode 'disable')",
        f"CREATE USER MAPPING FOR postgres SERVER {server} "
        f"OPTIONS (user 'postgres', password '{env.pg.password_for('postgres')}')",
        f"CREATE FOREIGN TABLE {ft} (id int, v text) SERVER {server} OPTIONS (table_name '{base}')",
    )
    env.on_cleanup(f"DROP SERVER IF EXISTS {server} CASCADE")
    reader = await env.twin()
    await reader.probe(f"SELECT v FROM {base}")
    read = f"SELECT v FROM {ft}"
    # Its rows live elsewhere and change without a write neonpoly sees: never cached.
    _, hit = await reader.probe(read, require_hit=False)
    assert not hit
    writer = await env.client()
    await writer.run(f"UPDATE {base} SET v = 'new'")
    await reader.check(read, why="a foreign table's read after UPDATE of the table it points at")


async def test_role_membership_granted_in_another_database(env: Env) -> None:
    """Roles are cluster-wide: a GRANT sent through neonpoly while connected to database
    `postgres` changes pg_has_role() answers in database `app`."""
    group, member = await env.role("adv_grp"), await env.role("adv_mem")
    reader = await env.twin()
    read = f"SELECT pg_has_role('{member}', '{group}', 'MEMBER')"
    rows, _ = await reader.probe(read)
    assert rows == [(False,)]
    other_db = await env.client(env.login("postgres", "postgres"))
    await other_db.run(f"GRANT {group} TO {member}")
    await reader.check(read, why="pg_has_role in app after GRANT through neonpoly in database postgres")


async def test_row_level_security_by_role_membership_granted_elsewhere(env: Env) -> None:
    group, member = await env.role("adv_grp"), await env.role("adv_mem")
    docs = await env.table("adv_docs", "body text", "('secret')")
    await env.admin(
        f"ALTER TABLE {docs} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY g ON {docs} USING (pg_has_role(current_user, '{group}', 'MEMBER'))",
    )
    reader = await env.twin(env.login(member))
    read = f"SELECT body FROM {docs}"
    rows, _ = await reader.probe(read)
    assert rows == []
    other_db = await env.client(env.login("postgres", "postgres"))
    await other_db.run(f"GRANT {group} TO {member}")
    await reader.check(read, why="RLS by role membership after GRANT through neonpoly in database postgres")


async def test_has_table_privilege_after_grant_same_database(env: Env) -> None:
    member = await env.role("adv_mem")
    table = await env.table("adv_priv", "v int", grant="postgres")
    reader = await env.twin()
    read = f"SELECT has_table_privilege('{member}', '{table}', 'SELECT')"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"GRANT SELECT ON {table} TO {member}")
    await reader.check(read, why="has_table_privilege after GRANT through neonpoly")


async def test_has_database_privilege_after_revoke_in_another_database(env: Env) -> None:
    member = await env.role("adv_mem")
    database = unique("adv_db")
    await env.admin(f"CREATE DATABASE {database}", database="postgres")
    env.on_cleanup(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    reader = await env.twin()
    read = f"SELECT has_database_privilege('{member}', '{database}', 'CREATE')"
    await reader.probe(read)
    other_db = await env.client(env.login("postgres", "postgres"))
    await other_db.run(f"GRANT CREATE ON DATABASE {database} TO {member}")
    env.on_cleanup(f"REVOKE ALL ON DATABASE {database} FROM {member}")
    await reader.check(read, why="has_database_privilege in app after GRANT sent in database postgres")


@pytest.mark.parametrize(
    "names",
    [('"Adv_{u}"', "adv_{u}"), ('"adv {u} 1"', '"adv {u} 2"'), ('"adv.{u}"', "adv_{u}"), ('"adv_ä{u}"', '"adv_a{u}"')],
    ids=["capitals", "digits-and-spaces", "dot", "unicode"],
)
async def test_odd_identifiers_are_kept_apart(env: Env, names: tuple[str, str]) -> None:
    u = unique("x")[2:]
    first, second = (n.format(u=u) for n in names)
    for name, value in ((first, "first"), (second, "second")):
        await env.admin(f"CREATE TABLE {name} (v text)", f"INSERT INTO {name} VALUES ('{value}')")
        env.on_cleanup(f"DROP TABLE IF EXISTS {name}")
    reader = await env.twin()
    reads = [f"SELECT v FROM {first}", f"SELECT v FROM {second}"]
    for read in reads:
        await reader.probe(read, require_hit=False)
    writer = await env.client()
    await writer.run(f"UPDATE {second} SET v = 'second, updated'")
    for read in reads:
        await reader.check(read, why=f"after UPDATE {second}")
    await writer.run(f"UPDATE {first} SET v = 'first, updated'")
    for read in reads:
        await reader.check(read, why=f"after UPDATE {first}")


async def test_same_table_name_in_two_schemas_written_qualified(env: Env) -> None:
    schema = unique("adv_s")
    table = unique("adv_t")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"CREATE TABLE public.{table} (v text)",
        f"INSERT INTO public.{table} VALUES ('public')",
        f"CREATE TABLE {schema}.{table} (v text)",
        f"INSERT INTO {schema}.{table} VALUES ('other')",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{table}", f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    reader = await env.twin()
    await reader.both(f"SET search_path = {schema}, public")
    read = f"SELECT v FROM {table}"
    await reader.probe(read)
    writer = await env.client()
    await writer.run(f"UPDATE {schema}.{table} SET v = 'other, updated'")
    await reader.check(read, why="after a schema-qualified UPDATE of the table on the reader's path")


async def test_clock_in_a_row_level_security_policy(env: Env) -> None:
    """A policy compares with now(): rows appear when their time comes, with no write."""
    docs = await env.table("adv_clock", "body text, visible_from timestamptz")
    await env.admin(
        f"ALTER TABLE {docs} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {docs} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY later ON {docs} USING (visible_from <= now())",
    )
    role = await env.role()
    reader = await env.twin(env.login(role))
    # The embargo ends after the probe's runs, each compared with the origin: the role and
    # the sessions (slow to make on a loaded machine) are made before it starts, and it lasts
    # 8 s (2 s was crossed once by the probe, with three test runs sharing 2 cores).
    await env.admin(f"INSERT INTO {docs} VALUES ('embargoed', clock_timestamp() + interval '8 seconds')")
    read = f"SELECT body FROM {docs}"
    # The policy reads the clock: never cached.
    rows, hit = await reader.probe(read, require_hit=False)
    assert rows == [] and not hit
    await eventually(lambda: reader.origin(read), lambda r: r == [("embargoed",)], timeout=30.0)
    await reader.check(read, why="after the policy's now() passed the embargo (no write at all)")

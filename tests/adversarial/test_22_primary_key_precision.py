"""Class 22: primary-key precision. A write confined to one key value evicts only the point
lookups of that key (cache/keys.py); every way a write can reach other rows, or a value can
mean another key than it spells, must still leave no stale answer behind."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from psycopg.types.numeric import Int8

from tests.adversarial.harness import Driver, Env, Twin, evil_equals, unique

ROWS = ("(1, 'a')", "(2, 'b')", "(3, 'c')", "(4, 'd')")


async def accounts(env: Env, columns: str = "aid int PRIMARY KEY, v text", rows: Sequence[str] = ROWS) -> str:
    return await env.table("adv_pk", columns, *rows)


async def warmed(env: Env, reads: Sequence[str], driver: Driver = "psycopg") -> Twin:
    """A reader with every read provably served from the cache."""
    reader = await env.twin(driver=driver)
    for sql in reads:
        await reader.probe(sql)
    return reader


async def attack(env: Env, reads: Sequence[str], writes: Sequence[str], driver: Driver = "psycopg") -> None:
    """Cache the reads, write through neonpoly, and compare every read with the origin."""
    reader = await warmed(env, reads, driver)
    writer = await env.client()
    for write in writes:
        await writer.run(write)
        for sql in reads:
            await reader.check(sql, why=f"after {write}")
        for sql in reads:  # cached again, so that the next write meets entries to evict
            await reader.probe(sql, require_hit=False)


def points(table: str, *aids: int) -> list[str]:
    return [f"SELECT v FROM {table} WHERE aid = {aid}" for aid in aids]


async def test_update_that_moves_the_key(env: Env) -> None:
    t = await accounts(env)
    await attack(env, points(t, 1, 2, 7), [f"UPDATE {t} SET aid = 7 WHERE aid = 1"])


async def test_update_of_two_keys_by_or(env: Env) -> None:
    t = await accounts(env)
    await attack(env, points(t, 1, 2, 3), [f"UPDATE {t} SET v = 'or' WHERE aid = 1 OR aid = 2"])


async def test_update_by_key_and_another_condition(env: Env) -> None:
    t = await accounts(env)
    await attack(
        env,
        [*points(t, 1, 2), f"SELECT v FROM {t} WHERE aid = 1 AND v = 'a'"],
        [f"UPDATE {t} SET v = 'and' WHERE aid = 1 AND v = 'a'"],
    )


@pytest.mark.parametrize("spelled", ["'1'", "1.0", "01", "+1", "1::int8", "(1)", "'01'"])
async def test_key_spelled_otherwise_in_the_write(env: Env, spelled: str) -> None:
    t = await accounts(env)
    await attack(env, points(t, 1, 2), [f"UPDATE {t} SET v = 'spelled' WHERE aid = {spelled}"])


@pytest.mark.parametrize("spelled", ["'1'", "1.0", "01", "+1", "'  1 '"])
async def test_key_spelled_otherwise_in_the_read(env: Env, spelled: str) -> None:
    t = await accounts(env)
    reads = [f"SELECT v FROM {t} WHERE aid = {spelled}", f"SELECT v FROM {t} WHERE aid IN (1)", *points(t, 2)]
    await attack(env, reads, [f"UPDATE {t} SET v = 'spelled' WHERE aid = 1"])


async def test_key_in_a_list(env: Env) -> None:
    t = await accounts(env)
    await attack(env, points(t, 1, 2), [f"UPDATE {t} SET v = 'in' WHERE aid IN (1, 2)"])


async def test_texts_that_share_a_classification_keep_their_own_keys(env: Env) -> None:
    """Texts differing only in numbers share one classification: the key a write evicts must
    be read from its own text, not from the text classified first."""
    t = await accounts(env)
    writer = await env.client()
    await writer.run(f"UPDATE {t} SET v = 'first' WHERE aid = 1")  # classified with aid = 1
    reader = await warmed(env, points(t, 1, 2, 3))
    await writer.run(f"UPDATE {t} SET v = 'second' WHERE aid = 2")
    await writer.run(f"DELETE FROM {t} WHERE aid = 3")
    for sql in points(t, 1, 2, 3):
        await reader.check(sql, why="after keyed writes whose texts share a classification")


async def test_text_primary_key(env: Env) -> None:
    t = await accounts(env, "id text PRIMARY KEY, v text", ("('a', 'x')", "('b', 'y')", "('01', 'z')"))
    reads = [
        f"SELECT v FROM {t} WHERE id = 'a'",
        f"SELECT v FROM {t} WHERE id = 'b'",
        f"SELECT v FROM {t} WHERE id = '01'",
    ]
    await attack(env, reads, [f"UPDATE {t} SET v = 'new' WHERE id = 'a'", f"UPDATE {t} SET v = 'one' WHERE id = '01'"])


async def test_nondeterministic_collation_key(env: Env) -> None:
    if not await env.admin_val("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'"):
        pytest.skip("this PostgreSQL has no ICU collations")
    coll = unique("adv_ci")
    await env.admin(f"CREATE COLLATION {coll} (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
    env.on_cleanup(f"DROP COLLATION IF EXISTS {coll} CASCADE")
    t = await accounts(env, f"id text COLLATE {coll} PRIMARY KEY, v text", ("('abc', 'x')", "('def', 'y')"))
    reads = [f"SELECT v FROM {t} WHERE id = 'abc'", f"SELECT v FROM {t} WHERE id = 'ABC'"]
    await attack(env, reads, [f"UPDATE {t} SET v = 'new' WHERE id = 'ABC'"])


async def test_composite_primary_key(env: Env) -> None:
    t = await accounts(env, "a int, b int, v text, PRIMARY KEY (a, b)", ("(1, 1, 'x')", "(1, 2, 'y')", "(2, 1, 'z')"))
    reads = [
        f"SELECT v FROM {t} WHERE a = 1 AND b = 2",
        f"SELECT v FROM {t} WHERE a = 1 ORDER BY b",
        f"SELECT v FROM {t} WHERE b = 1 ORDER BY a",
    ]
    await attack(env, reads, [f"UPDATE {t} SET v = 'new' WHERE a = 1 AND b = 1", f"DELETE FROM {t} WHERE a = 2"])


async def test_unique_non_key_column(env: Env) -> None:
    t = await accounts(env, "aid int PRIMARY KEY, u int UNIQUE, v text", ("(1, 10, 'a')", "(2, 20, 'b')"))
    reads = [*points(t, 1, 2), f"SELECT v FROM {t} WHERE u = 20"]
    await attack(env, reads, [f"UPDATE {t} SET v = 'via u' WHERE u = 20", f"UPDATE {t} SET u = 30 WHERE aid = 1"])


async def test_trigger_that_updates_other_rows(env: Env) -> None:
    t = await accounts(env)
    fn = unique("adv_trg")
    await env.admin(
        f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.aid = 1 THEN UPDATE {t} SET v = 'by trigger' WHERE aid = 2; END IF; RETURN NEW; END $$",
        f"CREATE TRIGGER tr AFTER UPDATE ON {t} FOR EACH ROW WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION {fn}()",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")
    await attack(env, points(t, 1, 2, 3), [f"UPDATE {t} SET v = 'direct' WHERE aid = 1"])


async def test_rule_that_writes_elsewhere(env: Env) -> None:
    t = await accounts(env)
    log = await env.table("adv_pklog", "aid int PRIMARY KEY, n int", "(1, 0)")
    await env.admin(f"CREATE RULE r AS ON UPDATE TO {t} DO ALSO UPDATE {log} SET n = n + 1 WHERE aid = 1")
    reads = [*points(t, 1, 2), f"SELECT n FROM {log} WHERE aid = 1"]
    await attack(env, reads, [f"UPDATE {t} SET v = 'ruled' WHERE aid = 2"])


async def test_rule_instead_on_the_keyed_table(env: Env) -> None:
    t = await accounts(env)
    other = await accounts(env)
    await env.admin(f"CREATE RULE r AS ON DELETE TO {t} DO INSTEAD UPDATE {other} SET v = 'instead' WHERE aid = 3")
    reads = [*points(t, 1, 3), *points(other, 1, 3)]
    await attack(env, reads, [f"DELETE FROM {t} WHERE aid = 1"])


async def test_foreign_key_cascades(env: Env) -> None:
    parent = await accounts(env)
    child = await env.table(
        "adv_pkchild",
        f"cid int PRIMARY KEY, aid int REFERENCES {parent}(aid) ON UPDATE CASCADE ON DELETE CASCADE",
        "(10, 1)",
        "(20, 2)",
    )
    reads = [
        *points(parent, 1, 2),
        f"SELECT aid FROM {child} WHERE cid = 10",
        f"SELECT aid FROM {child} WHERE cid = 20",
        f"SELECT count(*) FROM {child}",
    ]
    await attack(env, reads, [f"UPDATE {parent} SET aid = 5 WHERE aid = 1", f"DELETE FROM {parent} WHERE aid = 2"])


async def test_self_referencing_cascade(env: Env) -> None:
    t = await accounts(
        env, "aid int PRIMARY KEY, up int, v text", ("(1, NULL, 'a')", "(2, 1, 'b')", "(3, 2, 'c')", "(4, NULL, 'd')")
    )
    await env.admin(f"ALTER TABLE {t} ADD FOREIGN KEY (up) REFERENCES {t}(aid) ON DELETE CASCADE")
    await attack(env, points(t, 1, 2, 3, 4), [f"DELETE FROM {t} WHERE aid = 1"])


async def test_cascade_cycle_through_another_table(env: Env) -> None:
    a = await accounts(env, "aid int PRIMARY KEY, b int, v text", ("(1, NULL, 'a')", "(2, NULL, 'b')"))
    b = await env.table("adv_pkb", f"bid int PRIMARY KEY, aid int REFERENCES {a}(aid) ON DELETE CASCADE", "(1, 1)")
    await env.admin(
        f"UPDATE {a} SET b = 1 WHERE aid = 2",
        f"ALTER TABLE {a} ADD FOREIGN KEY (b) REFERENCES {b}(bid) ON DELETE CASCADE",
    )
    await attack(env, [*points(a, 1, 2), f"SELECT aid FROM {b} WHERE bid = 1"], [f"DELETE FROM {a} WHERE aid = 1"])


async def test_partitioned_table(env: Env) -> None:
    p = unique("adv_part")
    await env.admin(
        f"CREATE TABLE {p} (aid int PRIMARY KEY, v text) PARTITION BY RANGE (aid)",
        f"CREATE TABLE {p}_a PARTITION OF {p} FOR VALUES FROM (0) TO (10)",
        f"CREATE TABLE {p}_b PARTITION OF {p} FOR VALUES FROM (10) TO (20)",
        f"INSERT INTO {p} VALUES (1, 'a'), (2, 'b'), (11, 'k')",
        f"GRANT ALL ON {p}, {p}_a, {p}_b TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {p} CASCADE")
    reads = [*points(p, 1, 2, 11, 12), *points(f"{p}_a", 1, 2), *points(f"{p}_b", 11, 12)]
    await attack(
        env,
        reads,
        [
            f"UPDATE {p} SET v = 'parent' WHERE aid = 1",
            f"UPDATE {p}_a SET v = 'part' WHERE aid = 2",
            f"UPDATE {p} SET aid = 12 WHERE aid = 11",
        ],
    )


async def test_inheritance_child(env: Env) -> None:
    parent = await accounts(env)
    child = unique("adv_inh")
    await env.admin(
        f"CREATE TABLE {child} (PRIMARY KEY (aid)) INHERITS ({parent})",
        f"INSERT INTO {child} VALUES (1, 'c1')",
        f"GRANT ALL ON {child} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {child}")
    reads = [
        f"SELECT v FROM {parent} WHERE aid = 1 ORDER BY v",
        *points(child, 1),
        f"SELECT v FROM ONLY {parent} WHERE aid = 1",
    ]
    await attack(
        env, reads, [f"UPDATE {child} SET v = 'child' WHERE aid = 1", f"UPDATE {parent} SET v = 'both' WHERE aid = 1"]
    )


async def test_insert_on_conflict_updates_another_key(env: Env) -> None:
    t = await accounts(
        env, "aid int PRIMARY KEY, email text UNIQUE, v text", ("(1, 'one@x', 'a')", "(2, 'two@x', 'b')")
    )
    await attack(
        env,
        [*points(t, 1, 2, 3)],
        [
            f"INSERT INTO {t} (aid, email, v) VALUES (3, 'two@x', 'c') ON CONFLICT (email) DO UPDATE SET v = 'em'",
            f"INSERT INTO {t} (aid, email, v) VALUES (1, 'new@x', 'c') ON CONFLICT (aid) DO UPDATE SET v = 'by key'",
            f"INSERT INTO {t} (aid, email, v) VALUES (3, 'three@x', 'c') ON CONFLICT DO NOTHING",
        ],
    )


async def test_insert_on_conflict_that_moves_the_key(env: Env) -> None:
    t = await accounts(env)
    await attack(env, points(t, 1, 2, 9), [f"INSERT INTO {t} VALUES (1, 'x') ON CONFLICT (aid) DO UPDATE SET aid = 9"])


async def test_delete_returning(env: Env) -> None:
    t = await accounts(env)
    await attack(env, [*points(t, 1, 2), f"SELECT count(*) FROM {t}"], [f"DELETE FROM {t} WHERE aid = 1 RETURNING *"])


async def test_writable_cte(env: Env) -> None:
    t = await accounts(env)
    await attack(
        env,
        points(t, 1, 2, 3),
        [
            f"WITH d AS (DELETE FROM {t} WHERE aid = 2 RETURNING aid) UPDATE {t} SET v = 'cte' WHERE aid = 1",
            f"WITH u AS (UPDATE {t} SET v = 'inner' WHERE aid = 3 RETURNING aid) SELECT count(*) FROM u",
        ],
    )


async def test_update_from_another_table(env: Env) -> None:
    t = await accounts(env)
    src = await env.table("adv_pksrc", "aid int, nv text", "(2, 'from src')")
    await attack(
        env, points(t, 1, 2), [f"UPDATE {t} SET v = {src}.nv FROM {src} WHERE {t}.aid = {src}.aid AND {src}.aid = 2"]
    )


async def test_same_table_name_in_two_schemas(env: Env) -> None:
    t = await accounts(env)
    schema = unique("adv_sch")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT ALL ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE {schema}.{t} (aid int, v text)",  # same name, aid not unique
        f"INSERT INTO {schema}.{t} VALUES (1, 'x'), (1, 'y'), (2, 'z')",
        f"GRANT ALL ON {schema}.{t} TO PUBLIC",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    reads = [
        f"SELECT v FROM {schema}.{t} WHERE aid = 1 ORDER BY v",
        f"SELECT v FROM {schema}.{t} WHERE aid = 2",
        *points(t, 1, 2),
    ]
    await attack(
        env, reads, [f"UPDATE {schema}.{t} SET aid = 2 WHERE aid = 1", f"UPDATE {t} SET v = 'public' WHERE aid = 1"]
    )


async def test_operator_of_the_users_on_the_search_path(env: Env) -> None:
    """An `=` of the user's for integers, first on the search_path, matches every row."""
    t = await accounts(env)
    evil = await evil_equals(env)
    reader = await warmed(env, points(t, 1, 2))
    writer = await env.client()
    await writer.run(f"SET search_path = {evil}, pg_catalog, public")
    await writer.run(f"UPDATE {t} SET v = 'everyone' WHERE aid = 1")
    assert await writer.rows(f"SELECT count(*) FROM {t} WHERE v = 'everyone'") == [(4,)]
    for sql in points(t, 1, 2):
        await reader.check(sql, why="after an UPDATE whose = is the user's")


async def prepared_attack(env: Env, driver: Driver, write: str, params: tuple[Any, ...]) -> None:
    t = await accounts(env)
    read = f"SELECT v FROM {t} WHERE aid = $1" if driver.startswith("asyncpg") else f"SELECT v FROM {t} WHERE aid = %s"
    reader = await env.twin(driver=driver)
    for aid in (1, 2, 3):
        await reader.probe(read, (aid,))
    writer = await env.twin(driver="psycopg_extended")
    await writer.via.conn.execute(write.format(t=t), params)
    for aid in (1, 2, 3):
        await reader.check(read, (aid,), why=f"after {write} {params!r}")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_prepared", "psycopg_extended"])
@pytest.mark.parametrize(
    ("write", "params"),
    [
        ("UPDATE {t} SET v = 'bin' WHERE aid = %b", (2,)),  # binary int2
        ("UPDATE {t} SET v = 'bin8' WHERE aid = %b", (Int8(2),)),
        ("UPDATE {t} SET v = 'num' WHERE aid = %b", (Decimal("2.0"),)),  # binary numeric
        ("UPDATE {t} SET v = 'text' WHERE aid = %t", (" 02 ",)),  # text, unknown type
        ("UPDATE {t} SET v = 'float' WHERE aid = %b", (2.0,)),  # binary float8
        ("DELETE FROM {t} WHERE aid = %t", ("+2",)),
        ("UPDATE {t} SET v = 'twice' WHERE aid = %b AND %b > 0", (2, 2)),
    ],
)
async def test_bound_key_values(env: Env, driver: Driver, write: str, params: tuple[Any, ...]) -> None:
    await prepared_attack(env, driver, write, params)


async def test_asyncpg_binary_write_and_read(env: Env) -> None:
    t = await accounts(env)
    reader = await env.twin(driver="asyncpg")
    read = f"SELECT v FROM {t} WHERE aid = $1"
    for aid in (1, 2, 3):
        await reader.probe(read, (aid,))
    writer = await env.client(driver="asyncpg")
    assert isinstance(writer.conn, asyncpg.Connection)
    await writer.conn.execute(f"UPDATE {t} SET v = $2 WHERE aid = $1", 2, "asyncpg")
    await writer.conn.execute(f"DELETE FROM {t} WHERE aid = $1::int8", 3)
    for aid in (1, 2, 3):
        await reader.check(read, (aid,), why="after asyncpg writes by key")


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_transaction_writing_two_keys(env: Env, end: str) -> None:
    t = await accounts(env)
    reader = await warmed(env, [*points(t, 1, 2, 3), f"SELECT count(*) FROM {t}"])
    writer = await env.client()
    await writer.run("BEGIN")
    await writer.run(f"UPDATE {t} SET v = 'tx1' WHERE aid = 1")
    await writer.run(f"DELETE FROM {t} WHERE aid = 2")
    for sql in points(t, 1, 2):
        await reader.check(sql, why="while the writing transaction is open")
    await writer.run(end)
    for sql in [*points(t, 1, 2, 3), f"SELECT count(*) FROM {t}"]:
        await reader.check(sql, why=f"after {end} of a transaction writing two keys")


async def test_keyed_and_whole_writes_in_one_transaction(env: Env) -> None:
    t = await accounts(env)
    reader = await warmed(env, points(t, 1, 2, 3))
    writer = await env.client()
    await writer.run(f"BEGIN; UPDATE {t} SET v = 'k' WHERE aid = 1; UPDATE {t} SET v = 'all' WHERE aid > 2; COMMIT")
    await writer.run("BEGIN")
    await writer.run(f"UPDATE {t} SET v = 'k2' WHERE aid = 1")
    await writer.run(f"UPDATE {t} SET v = 'all2' WHERE aid >= 2")
    await writer.run("COMMIT")
    for sql in points(t, 1, 2, 3):
        await reader.check(sql, why="after a transaction writing by key and otherwise")


async def test_primary_key_changed_between_uses(env: Env) -> None:
    t = await accounts(
        env, "aid int PRIMARY KEY, bid int NOT NULL, v text", ("(1, 10, 'a')", "(2, 20, 'b')", "(3, 30, 'c')")
    )
    writer = await env.client()
    reads = [*points(t, 1, 2, 3), f"SELECT v FROM {t} WHERE bid = 20"]
    reader = await warmed(env, reads)
    await writer.run(f"UPDATE {t} SET v = 'one' WHERE aid = 1")  # keyed by aid
    await writer.run(f"ALTER TABLE {t} DROP CONSTRAINT {t}_pkey, ADD PRIMARY KEY (bid)")
    for sql in reads:
        await reader.probe(sql, require_hit=False)
    await writer.run(f"INSERT INTO {t} VALUES (2, 40, 'dup of aid 2')")  # aid is no longer unique
    await writer.run(f"UPDATE {t} SET aid = 1 WHERE bid = 30")  # keyed by bid now; moves aid
    for sql in reads:
        await reader.check(sql, why="after the key moved from aid to bid")
    await writer.run(f"ALTER TABLE {t} DROP CONSTRAINT {t}_pkey")
    for sql in reads:
        await reader.probe(sql, require_hit=False)
    await writer.run(f"UPDATE {t} SET v = 'no key' WHERE bid = 20")
    await writer.run(f"UPDATE {t} SET v = 'aid one' WHERE aid = 1")
    for sql in reads:
        await reader.check(sql, why="after the key was dropped")


async def test_row_level_security_reading_its_own_table(env: Env) -> None:
    """A policy that reads other rows of the same table: a key write changes which rows of
    other keys are visible."""
    role = await env.role()
    t = await accounts(
        env,
        "aid int PRIMARY KEY, owner text, v text",
        (f"(1, '{role}', 'open')", f"(2, '{role}', 'b')", "(3, 'other', 'c')"),
    )
    gate = unique("adv_gate")  # a view owned by the superuser: the policy's read bypasses the policy
    await env.admin(
        f"CREATE VIEW {gate} AS SELECT aid, v FROM {t}",
        f"GRANT SELECT ON {gate} TO PUBLIC",
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON {t} USING (owner = current_user AND EXISTS "
        f"(SELECT 1 FROM {gate} g WHERE g.aid = 1 AND g.v = 'open'))",
        f"CREATE POLICY w ON {t} FOR UPDATE USING (true)",
        f"GRANT ALL ON {t} TO {role}",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS {gate} CASCADE")
    reader = await env.twin(env.login(role))
    for sql in points(t, 2, 3):
        await reader.probe(sql)
    writer = await env.client()
    await writer.run(f"UPDATE {t} SET v = 'closed' WHERE aid = 1")
    for sql in points(t, 2, 3):
        await reader.check(sql, why="after a key write that a policy on the same table reads")

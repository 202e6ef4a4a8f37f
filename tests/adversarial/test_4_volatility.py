"""Class 4: answers that change with the clock or by chance, with no write at all.

A clock-reading query is right only if its answer is not older than the call: each case
takes a timestamp just before the call and asserts the answer is not earlier. A random
query is right only if it does not repeat an earlier answer the origin would never repeat.
Not caching these is the correct fix; a hit is never required.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tests.adversarial.harness import Client, Driver, Env, eventually, unique


def _as_utc(value: Any) -> dt.datetime:
    assert isinstance(value, dt.datetime), value
    if value.tzinfo is None:  # timestamp without time zone: the sessions run in UTC
        return value.replace(tzinfo=dt.UTC)
    return value


async def _fresh_every_time(client: Client, sql: str, params: tuple[Any, ...] = (), runs: int = 4) -> None:
    for n in range(runs):
        before = dt.datetime.now(dt.UTC)
        rows = await client.rows(sql, params)
        got = _as_utc(rows[0][0])
        assert got >= before, (
            f"run {n + 1} of {sql!r} {params!r}: answered {got.isoformat()}, older than the call "
            f"({before.isoformat()}): a cached clock"
        )


CLOCK_QUERIES = [
    ("SELECT 'now'::timestamptz", "control-literal"),
    ("SELECT now()", "control-now"),
    ("SELECT statement_timestamp()", "control-statement_timestamp"),
    ("SELECT ('no' || 'w')::timestamptz", "concatenation"),
    ("SELECT timezone('UTC', 'now')", "timezone-function"),
    ("SELECT E'\\x6eow'::timestamptz", "e-string-hex"),
    ("SELECT E'\\156ow'::timestamptz", "e-string-octal"),
    ("SELECT $$now$$::timestamptz", "dollar-quoted"),
    ("SELECT U&'\\006eow'::timestamptz", "unicode-escape-string"),
    ("SELECT (SELECT 'now')::timestamptz", "scalar-subquery"),
    ("SELECT v::timestamptz FROM (VALUES ('now')) s(v)", "values-list"),
    ("SELECT greatest('2000-01-01'::timestamptz, 'now')", "coerced-by-function"),
    ("SELECT lower('NOW')::timestamptz", "function-result"),
    ("SELECT 'now'::timestamptz(6)", "typmod"),
    ("SELECT transaction_timestamp()", "transaction_timestamp"),
    ("SELECT \"now\"()", "quoted-function-name"),
    ("SELECT pg_catalog.statement_timestamp()", "qualified"),
]


@pytest.mark.parametrize("sql", [q for q, _ in CLOCK_QUERIES], ids=[i for _, i in CLOCK_QUERIES])
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg_unprepared"])
async def test_clock_reaching_the_answer(env: Env, sql: str, driver: Driver) -> None:
    direct = await env.client(via=False, driver=driver)
    await direct.run("SET TimeZone = 'UTC'")
    await _fresh_every_time(direct, sql)  # the origin itself answers fresh: the case is fair
    client = await env.client(driver=driver)
    await client.run("SET TimeZone = 'UTC'")
    await _fresh_every_time(client, sql)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_prepared", "asyncpg"])
async def test_now_as_a_parameter(env: Env, driver: Driver) -> None:
    """'now' sent as a bind parameter value: the text has no clock in it at all (a text
    parameter cast at run time, so even a prepared statement reads the clock each time)."""
    client = await env.client(driver=driver)
    sql = "SELECT $1::text::timestamptz" if driver.startswith("asyncpg") else "SELECT %s::text::timestamptz"
    await _fresh_every_time(client, sql, ("now",))


async def test_now_as_an_untyped_parameter(env: Env) -> None:
    client = await env.client(driver="psycopg")
    await _fresh_every_time(client, "SELECT %s::timestamptz", ("now",))


async def test_now_reaching_a_column_comparison(env: Env) -> None:
    """'now' coerced by a timestamptz column: rows become visible as time passes."""
    table = await env.table("adv_emb", "body text, at timestamptz")
    twin = await env.twin()
    # The row's time comes after the probe's runs, each compared with the origin: a slow
    # connect on a loaded machine must not be inside that window (nor the proxy's answer
    # and the origin's fall on either side of it), so the sessions are opened first.
    await env.admin(f"INSERT INTO {table} VALUES ('later', clock_timestamp() + interval '2 seconds')")
    read = f"SELECT body FROM {table} WHERE at <= 'now'"
    rows, _ = await twin.probe(read, require_hit=False)
    assert rows == []
    await eventually(lambda: twin.origin(read), lambda r: r == [("later",)])
    await twin.check(read, why="'now' compared with a column after the row's time came")


async def test_clock_in_a_view_definition(env: Env) -> None:
    view = unique("adv_clockv")
    await env.admin(f"CREATE VIEW {view} AS SELECT now() AS at", f"GRANT SELECT ON {view} TO PUBLIC")
    env.on_cleanup(f"DROP VIEW IF EXISTS {view}")
    client = await env.client()
    await _fresh_every_time(client, f"SELECT at FROM {view}")


async def test_clock_in_a_set_returning_function_in_from(env: Env) -> None:
    client = await env.client()
    await _fresh_every_time(client, "SELECT t FROM generate_series(now(), now(), interval '1 day') t")


RANDOM_QUERIES = [
    ("SELECT random()", "control-random"),
    ("SELECT (SELECT random())", "random-in-subquery"),
    ("SELECT gen_random_uuid()::text", "uuid"),
    ("SELECT array_agg(id ORDER BY id)::text FROM {t} TABLESAMPLE BERNOULLI (50)", "tablesample-bernoulli"),
    ("SELECT array_agg(id)::text FROM (SELECT id FROM {t} ORDER BY random() LIMIT 20) s", "order-by-random"),
    ("SELECT md5(random()::text)", "random-inside-safe-function"),
]


@pytest.mark.parametrize("sql", [q for q, _ in RANDOM_QUERIES], ids=[i for _, i in RANDOM_QUERIES])
async def test_random_answers_do_not_repeat(env: Env, sql: str) -> None:
    table = await env.table("adv_rnd", "id int")
    await env.admin(f"INSERT INTO {table} SELECT generate_series(1, 2000)")
    client = await env.client()
    seen: list[Any] = []
    for _ in range(4):
        rows = await client.rows(sql.format(t=table))
        assert rows[0] not in seen, f"{sql!r} repeated an earlier answer: served from cache"
        seen.append(rows[0])

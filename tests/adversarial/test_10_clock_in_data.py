"""Class 10: 'now' that reaches a date/time input function from somewhere other than a literal
or a bound parameter: a column's value, a subquery's computed column, JSON.

The classifier lets a cast of a column reference through (`v::timestamptz`), but a column's
value is text like any other: 'now', 'today' and friends read the clock when converted.
Controls: literals that do not read the clock ('epoch', 'infinity') stay cacheable, and
clock words inside array and range literals are seen.
"""

from __future__ import annotations

import pytest

from tests.adversarial.harness import Env, hits
from tests.adversarial.harness2 import fresh_every_time

# {t} has a text column v = 'now' and a jsonb column j = {"ts": "now"}.
CLOCK_FROM_DATA = [
    ("SELECT v::timestamptz FROM {t}", "text-column-cast"),
    ("SELECT CAST(v AS timestamp) FROM {t}", "text-column-cast-timestamp"),
    ("SELECT x::timestamptz FROM (SELECT 'n' || 'ow' AS x) s", "computed-column-of-a-subquery"),
    ("WITH c(x) AS (SELECT 'n' || 'ow') SELECT x::timestamptz FROM c", "computed-column-of-a-cte"),
    ("SELECT r.ts FROM {t}, jsonb_to_record(j) AS r(ts timestamptz)", "jsonb-to-record"),
    ("SELECT (jsonb_populate_record(NULL::{rec}, j)).ts FROM {t}", "jsonb-populate-record"),
    ("SELECT max(x::timestamptz) FROM {t}, unnest(ARRAY[v]) x", "unnested-array-element"),
]


@pytest.mark.parametrize("sql", [q for q, _ in CLOCK_FROM_DATA], ids=[i for _, i in CLOCK_FROM_DATA])
async def test_clock_word_in_data_reaches_a_timestamp(env: Env, sql: str) -> None:
    table = await env.table("adv_clk", "v text, j jsonb", """('now', '{"ts": "now"}')""")
    rec = await env.table("adv_rec", "ts timestamptz")
    client = await env.client(driver="asyncpg_unprepared" if "jsonb" in sql else "psycopg")
    await fresh_every_time(client, sql.replace("{t}", table).replace("{rec}", rec))


CLOCK_LITERALS = [
    "SELECT ('{now}'::timestamptz[])[1]",
    "SELECT lower('[now,)'::tstzrange)",
    "SELECT ('{\"ts\": \"now\"}'::jsonb->>'ts')::timestamptz",
    "SELECT (ROW('now')::{rec}).ts",
    "SELECT current_date + interval '1 day' + (clock_timestamp() - clock_timestamp())",
    "SELECT 'today'::timestamptz + (statement_timestamp() - date_trunc('day', statement_timestamp()))",
]


@pytest.mark.parametrize("sql", CLOCK_LITERALS)
async def test_clock_words_in_composite_literals(env: Env, sql: str) -> None:
    rec = await env.table("adv_rec", "ts timestamptz")
    client = await env.client()
    await fresh_every_time(client, sql.replace("{rec}", rec))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'epoch'::timestamptz",
        "SELECT 'infinity'::timestamptz::text, '-infinity'::date::text",
        "SELECT '{epoch,infinity}'::timestamptz[]::text",
        "SELECT '2024-01-01'::date + interval '1 day'",
        "SELECT v FROM {t} WHERE v = 'now'",
    ],
)
async def test_words_that_do_not_read_the_clock_stay_cacheable(env: Env, sql: str) -> None:
    """The text 'now' compared as text, or 'epoch'/'infinity' as timestamps: no clock."""
    table = await env.table("adv_clk", "v text", "('now')")
    twin = await env.twin()
    query = sql.replace("{t}", table)
    if "'now'" in query:
        # Not a clock read, but the classifier may refuse 'now' in any literal: only compare.
        for _ in range(3):
            await twin.check(query, why="text 'now' compared as text")
        return
    _, hit = await twin.probe(query)
    assert hit
    assert hits(env.proxy) > 0

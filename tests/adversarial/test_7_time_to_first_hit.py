"""Class 7: adaptive TTL must not defeat Time To First Hit right after a table is created
and filled through neonpoly: three runs a few seconds apart give miss, miss, hit."""

from __future__ import annotations

import asyncio

import pytest

from tests.adversarial.harness import Env, unique


@pytest.mark.parametrize(
    "setup",
    [
        ("CREATE TABLE {t} (id int PRIMARY KEY, v text)", "INSERT INTO {t} VALUES (1, 'a')"),
        (
            "CREATE TABLE {t} (id int PRIMARY KEY, v text)",
            "CREATE INDEX ON {t} (v)",
            "INSERT INTO {t} VALUES (1, 'a')",
            "INSERT INTO {t} VALUES (2, 'b')",
        ),
    ],
    ids=["create-insert", "migration-and-seed"],
)
async def test_miss_miss_hit_a_few_seconds_apart(env: Env, setup: tuple[str, ...]) -> None:
    """The fixture runs what `neonpoly serve` runs: rules and adaptive TTL in auto mode."""
    table = unique("adv_ttfh")
    env.on_cleanup(f"DROP TABLE IF EXISTS {table}")
    client = await env.client()
    for sql in setup:
        await client.run(sql.format(t=table))
    read = f"SELECT v FROM {table} ORDER BY id"
    statuses = []
    for n in range(3):
        if n:
            await asyncio.sleep(2.0)  # the case is about time itself
        before = env.proxy.totals()
        await client.rows(read)
        after = env.proxy.totals()
        statuses.append(next(k for k in after if after[k] != before.get(k, 0)))
    assert statuses == ["miss", "miss", "hit"], statuses


async def test_control_without_adaptive_ttl(env: Env) -> None:
    """Control: the same steps with the plain fixed TTL give miss, miss, hit."""
    env.proxy.service.rules.set_mode("fixed", "default")
    table = unique("adv_ttfh")
    env.on_cleanup(f"DROP TABLE IF EXISTS {table}")
    client = await env.client()
    await client.run(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await client.run(f"INSERT INTO {table} VALUES (1, 'a')")
    statuses = []
    for _ in range(3):
        before = env.proxy.totals()
        await client.rows(f"SELECT v FROM {table} ORDER BY id")
        after = env.proxy.totals()
        statuses.append(next(k for k in after if after[k] != before.get(k, 0)))
    assert statuses == ["miss", "miss", "hit"], statuses

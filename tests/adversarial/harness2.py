"""Helpers shared by the second round of adversarial cases (test_8_… onwards)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from tests.adversarial.harness import Client, Env, Twin, unique


async def counter(env: Env) -> tuple[str, str]:
    """A one-row counter table and a VOLATILE SQL function `fn()` that bumps it and returns n."""
    table = await env.table("adv_cnt", "n int", "(0)")
    fn = unique("adv_bump")
    await env.admin(
        f"CREATE FUNCTION public.{fn}() RETURNS int VOLATILE LANGUAGE sql AS "
        f"$$ UPDATE public.{table} SET n = n + 1 RETURNING n $$",
        f"GRANT EXECUTE ON FUNCTION public.{fn}() TO PUBLIC",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{fn}() CASCADE")
    return table, fn


async def warm_counter(env: Env, table: str) -> tuple[Twin, str]:
    """A reader twin that has the counter's read provably cached (n = 0)."""
    reader = await env.twin()
    read = f"SELECT n FROM {table}"
    rows, _ = await reader.probe(read)
    assert rows == [(0,)]
    return reader, read


async def lying_upper(env: Env, mood: str, bump: str) -> None:
    """An `upper()` of the user's over their type `mood`, declared IMMUTABLE (a lie: it bumps
    the counter through `bump`): PostgreSQL picks it for a column of that type."""
    await env.admin(
        f"CREATE FUNCTION public.upper(public.{mood}) RETURNS text IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN pg_catalog.upper($1::text); END $$",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.upper(public.{mood}) CASCADE")


async def ran_code_then_check(env: Env, reader: Twin, count: str, sql: str, what: str) -> None:
    """Send `sql` through neonpoly on a new session: it runs `what` (code of the user's that
    bumps the counter); the counter's cached read must follow it. A counter still at 0 means
    the code never ran, and the case proves nothing."""
    client = await env.client()
    await client.rows(sql)
    assert await reader.origin(count) != [(0,)], f"{sql!r} never ran {what}: proves nothing"
    await reader.check(count, why=f"after {sql!r}, which ran {what}")


async def make_known(env: Env, *tables: str) -> None:
    """Have neonpoly look the tables up (a plain read through it, answered by the origin), so
    that later writes to them are judged by what the catalog said about them."""
    client = await env.client()
    for table in tables:
        await client.rows(f"SELECT count(*) FROM {table}")


def as_utc(value: Any) -> dt.datetime:
    assert isinstance(value, dt.datetime), value
    if value.tzinfo is None:  # timestamp without time zone: the sessions run in UTC
        return value.replace(tzinfo=dt.UTC)
    return value


async def fresh_every_time(client: Client, sql: str, params: tuple[Any, ...] = (), runs: int = 4) -> None:
    """A clock-reading query must never answer a time older than the call."""
    for n in range(runs):
        before = dt.datetime.now(dt.UTC)
        rows = await client.rows(sql, params)
        got = as_utc(rows[0][0])
        assert got >= before, (
            f"run {n + 1} of {sql!r} {params!r}: answered {got.isoformat()}, older than the call "
            f"({before.isoformat()}): a cached clock"
        )


async def commented_by_hand_then_check(env: Env, target: str, oid: int, why: str) -> None:
    """A superuser's UPDATE of pg_description's row for `oid` through `target` (the catalog,
    or a view over it) is a COMMENT by hand: obj_description()'s cached answer must follow."""
    writer = await env.client()
    change = f"UPDATE {target} SET description = '{{}}' WHERE objoid = {oid}"
    await writer.run(change.format("first"))  # not looked up yet: evicts everything
    reader = await env.twin()
    read = f"SELECT pg_catalog.obj_description({oid}::oid, 'pg_class')"
    rows, _ = await reader.probe(read)
    assert rows == [("first",)]
    await writer.run(change.format("new"))
    await reader.check(read, why=why)

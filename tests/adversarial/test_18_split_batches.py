"""Batches without Sync split across TCP writes: neonpoly forwards what it has at the end of
each read. Whatever the split, the answers must equal a direct connection's."""

from __future__ import annotations

import asyncio

from neonpoly import pgwire
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, qident, unique


async def _run(port: int, user: str, parts: list[list[bytes]]) -> list[rawpg.Message]:
    """Send each part as its own write (drained), then read up to the final ReadyForQuery."""
    raw = await rawpg.Raw.connect(port, user=user)
    try:
        for i, part in enumerate(parts):
            raw.send(*part)
            await raw.writer.drain()
            if i + 1 < len(parts):
                await asyncio.sleep(0)  # let the proxy read this part on its own
        out = await raw.until_ready()
        return out
    finally:
        await raw.close()


def _shape(msgs: list[rawpg.Message]) -> list[tuple[bytes, object]]:
    out: list[tuple[bytes, object]] = []
    for kind, body in msgs:
        if kind == b"D":
            out.append((kind, tuple(rawpg.rows([(kind, body)])[0])))
        elif kind == b"E":
            fields = dict((f[:1], f[1:]) for f in body.split(b"\x00") if f)
            out.append((kind, fields.get(b"C")))
        elif kind in (b"C", b"Z"):
            out.append((kind, body))
        else:
            out.append((kind, None))
    return out


async def _both(env: Env, parts: list[list[bytes]]) -> None:
    via = await _run(env.proxy.port, "trust_user", parts)
    direct = await _run(env.pg.port, "trust_user", parts)
    assert _shape(via) == _shape(direct), f"proxy {_shape(via)!r} != direct {_shape(direct)!r}"


async def test_error_mid_unsynced_batch_split_then_sync(env: Env) -> None:
    table = await env.table("adv_split", "id int PRIMARY KEY", "(1)")
    await env.admin(f"GRANT INSERT, SELECT ON {table} TO PUBLIC")
    first = [rawpg.parse("", f"SELECT count(*) FROM {table}"), rawpg.bind("", ""), rawpg.execute()]
    bad = [rawpg.parse("", f"INSERT INTO {table} VALUES (1)"), rawpg.bind("", ""), rawpg.execute()]
    after = [rawpg.parse("", f"SELECT count(*) + 10 FROM {table}"), rawpg.bind("", ""), rawpg.execute()]
    for _ in range(3):  # warm: a cached answer must not skip the error's consequences
        await _both(env, [first, bad, after, [rawpg.SYNC]])
    await _both(env, [first + bad[:1], bad[1:] + after[:2], after[2:], [rawpg.SYNC, rawpg.query("SELECT 7")]])


async def test_flush_in_middle_of_split_batch(env: Env) -> None:
    table = await env.table("adv_splitf", "id int", "(1)", "(2)")
    q = [rawpg.parse("s1", f"SELECT id FROM {table} ORDER BY id"), rawpg.bind("", "s1")]
    flush = pgwire.frame(b"H")
    for _ in range(3):
        await _both(env, [q, [rawpg.execute(), flush], [rawpg.execute(), rawpg.SYNC]])
    await _both(env, [q[:1], [flush], q[1:], [rawpg.execute("", 1), flush], [rawpg.execute(), rawpg.SYNC]])


async def test_copy_extended_split_across_writes(env: Env) -> None:
    table = await env.table("adv_splitc", "id int", "(1)")
    await env.admin(f"GRANT INSERT, SELECT ON {table} TO PUBLIC")
    copy = [rawpg.parse("", f"COPY {table} TO STDOUT"), rawpg.bind("", ""), rawpg.execute()]
    for _ in range(3):
        await _both(env, [copy[:2], copy[2:], [rawpg.SYNC]])
    await _both(env, [copy[:1], copy[1:2], copy[2:], [rawpg.SYNC], [rawpg.query(f"SELECT count(*) FROM {table}")]])


async def test_unsynced_set_then_cached_read_in_split_batch(env: Env) -> None:
    schema = unique("adv_splits")
    await env.admin(f"CREATE SCHEMA {schema}", f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC")
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    name = unique("adv_splitt")
    await env.admin(
        f"CREATE TABLE public.{name} (v text)",
        f"INSERT INTO public.{name} VALUES ('public')",
        f"CREATE TABLE {schema}.{name} (v text)",
        f"INSERT INTO {schema}.{name} VALUES ('schema')",
        f"GRANT SELECT ON public.{name}, {schema}.{name} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{name}")
    read = [rawpg.parse("", f"SELECT v FROM {name}"), rawpg.bind("", ""), rawpg.execute(), rawpg.SYNC]
    for _ in range(4):
        await _both(env, [read])
    setp = [rawpg.parse("", f"SET search_path TO {qident(schema)}"), rawpg.bind("", ""), rawpg.execute()]
    await _both(env, [setp, read[:2], read[2:]])

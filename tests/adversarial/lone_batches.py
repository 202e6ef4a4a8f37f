"""What test_39 (the hostile review of the lone-batch fast paths) builds on: a proxy whose
cache bypasses a template after a few misses, with a spy on `_pass_lone`; a passed batch
held by a lock; raw pairs (through neonpoly and straight to the origin) compared answer by
answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from neonpoly.proxy.batches import BatchHandling
from tests.adversarial import rawpg
from tests.adversarial.batch_memo import Msgs, lone, normal, parse
from tests.adversarial.harness import Env, hits
from tests.adversarial.rawpg import SYNC, Raw, execute, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table
from tests.proxy.test_lookup_bypass import Spied

IN_PROCESS = os.environ.get("NEONPOLY_TEST_WORKERS", "1") in ("", "1")
in_process = pytest.mark.skipif(not IN_PROCESS, reason="spies on the in-process session and its cache")
INT4 = 23


def tx(sql: str) -> bytes:
    """One statement as an unnamed extended batch (Parse, Bind, Execute, Sync)."""
    return rawpg.parse("", sql) + rawpg.bind("", "") + execute("") + SYNC


@contextlib.asynccontextmanager
async def bypass_world(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, probe_every: int = 1000
) -> AsyncIterator[tuple[CachingProxy, Spied, list[bytes], str, str, Raw, Raw]]:
    """A proxy whose cache bypasses a template after 4 misses; a table of 40 rows and its
    twin; a raw client through the proxy and one straight to the origin, both with
    statements s (`SELECT name ... WHERE id = $1`, bypassed: its lone batches passed) and h
    (`SELECT id, name ...`, whose key 39 is a hit). `passed` lists the batches `_pass_lone`
    relayed."""
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        spied = Spied(proxy, monkeypatch, window=4, probe_every=probe_every)
        table = await make_table(pg, rows=40)
        twin = table + "_direct"
        async with pg.superuser_conn() as conn:
            await conn.execute(f"CREATE TABLE {twin} (LIKE {table} INCLUDING ALL)")
            await conn.execute(f"INSERT INTO {twin} SELECT * FROM {table}")
            await conn.execute(f"GRANT ALL ON {twin} TO trust_user")
        passed: list[bytes] = []
        full = BatchHandling._pass_lone

        def spied_pass(self: BatchHandling, *args: Any) -> bool:
            done = full(self, *args)
            if done:
                passed.append(args[-1])
            return done

        monkeypatch.setattr(BatchHandling, "_pass_lone", spied_pass)
        via = await Raw.connect(proxy.port)
        direct = await Raw.connect(pg.port)
        try:
            for raw, t in ((via, table), (direct, twin)):
                raw.send(parse("s", f"SELECT name FROM {t} WHERE id = $1", (INT4,)),
                         parse("h", f"SELECT id, name FROM {t} WHERE id = $1", (INT4,)), SYNC)  # fmt: skip
                await raw.until_ready()
            for key in range(1, 7):  # 4 misses bypass s; then its lone batches are passed
                via.send(lone("s", str(key).encode()))
                assert rows(await via.until_ready()) == [[f"name {key}".encode()]]
            assert passed, "s was never passed"
            for _ in range(3):  # h(39): stored, then a hit from its shape's memo
                via.send(lone("h", b"39"))
                assert rows(await via.until_ready()) == [[b"39", b"name 39"]]
            yield proxy, spied, passed, table, twin, via, direct
        finally:
            with contextlib.suppress(Exception):
                await via.close()
            await direct.close()


async def held_pass(
    pg: PgServer, table: str, via: Raw, passed: list[bytes], key: bytes, statement: str = "s"
) -> asyncpg.Connection:
    """Send lone s(key) while a lock holds the table: passed, its answer outstanding. The
    returned connection holds the lock in an open transaction (roll it back to release)."""
    locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
    await locker.execute("BEGIN")
    await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    before = len(passed)
    via.send(lone(statement, key))
    for _ in range(200):
        if len(passed) > before:
            return locker
        await asyncio.sleep(0.01)
    await locker.close()
    raise AssertionError("the lone batch was not passed")


def norm(msgs: Msgs) -> Msgs:
    """`normal`, and a RowDescription by its column names (the twin table's OID differs)."""
    out: Msgs = []
    for kind, body in normal(msgs):
        if kind == b"T":
            count, pos, names = int.from_bytes(body[:2], "big"), 2, []
            for _ in range(count):
                end = body.index(b"\x00", pos)
                names.append(body[pos:end])
                pos = end + 1 + 18
            body = b",".join(names)
        out.append((kind, body))
    return out


async def answers_of(raw: Raw, count: int) -> list[Msgs]:
    return [norm(await raw.until_ready()) for _ in range(count)]


async def raw_pair(env: Env, *parses: bytes) -> tuple[Raw, Raw]:
    via = await Raw.connect(env.proxy.port)
    direct = await Raw.connect(env.pg.port)
    env.stack.push_async_callback(via.close)
    env.stack.push_async_callback(direct.close)
    for raw in (via, direct):
        raw.send(*parses, SYNC)
        await raw.until_ready()
    return via, direct


async def same(env: Env, via: Raw, direct: Raw, frames: bytes, why: str) -> tuple[Msgs, bool]:
    before = hits(env.proxy)
    via.send(frames)
    got = normal(await via.until_ready())
    hit = hits(env.proxy) > before
    direct.send(frames)
    want = normal(await direct.until_ready())
    assert got == want, f"{why}: proxy {got!r} ({'hit' if hit else 'origin'}) != direct {want!r}"
    return got, hit


async def first_hit(env: Env, via: Raw, direct: Raw, frames: bytes) -> None:
    """Store `frames` (two misses) and serve it once: its session's first hit of these bytes
    (from the shape's memo, as the statement's other keys made one)."""
    for n in range(4):
        _, hit = await same(env, via, direct, frames, "warming")
        if hit:
            return
        assert n < 3, "never a hit"


def admin_console(env: Env, sql: str) -> list[tuple[Any, ...]]:
    """One admin console statement (on a connection of its own: never prepared)."""
    import psycopg

    with psycopg.connect(env.proxy.url(database="neonpoly"), autocommit=True, prepare_threshold=None) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []

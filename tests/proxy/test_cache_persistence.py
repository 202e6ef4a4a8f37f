"""Entries survive a restart within their TTL; a broken cache dir degrades to pass-through."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.pgharness import PgServer
from tests.proxy.caching import caching_proxy, psql, unique


async def make_table(pg: PgServer) -> str:
    table = unique("persist")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int, v text)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
    return table


async def test_restart_serves_fresh_entries_from_disk(pg: PgServer, tmp_path: Path) -> None:
    table = await make_table(pg)
    long_lived = f"SELECT v FROM {table} WHERE id = 1"
    short_lived = f"SELECT v, id FROM {table} WHERE id = 1"
    cache_dir = tmp_path / "cache"
    async with caching_proxy(pg, cache_dir, admit_after=1, ttl=60) as proxy:
        for _ in range(2):
            assert await psql(proxy.url(), long_lived) == ["kept"]
    async with caching_proxy(pg, cache_dir, admit_after=1, ttl=0.5) as proxy:
        assert await psql(proxy.url(), short_lived) == ["kept|1"]
    before_long = await pg.calls(f"SELECT v FROM {table} WHERE id =")
    before_short = await pg.calls(f"SELECT v, id FROM {table} WHERE id =")
    await asyncio.sleep(0.6)  # the short entry's TTL runs out while neonpoly is down
    async with caching_proxy(pg, cache_dir, admit_after=1, ttl=60) as proxy:
        for _ in range(3):
            assert await psql(proxy.url(), long_lived) == ["kept"]
        assert await psql(proxy.url(), short_lived) == ["kept|1"]
        totals = proxy.totals()
    assert await pg.calls(f"SELECT v FROM {table} WHERE id =") == before_long  # all from disk
    assert await pg.calls(f"SELECT v, id FROM {table} WHERE id =") == before_short + 1  # expired
    assert totals.get("hit") == 3 and totals.get("miss") == 1


async def test_write_before_restart_is_not_forgotten(pg: PgServer, tmp_path: Path) -> None:
    table = await make_table(pg)
    sql = f"SELECT v FROM {table} WHERE id = 1"
    cache_dir = tmp_path / "cache"
    async with caching_proxy(pg, cache_dir, admit_after=1) as proxy:
        await psql(proxy.url(), sql)
        await psql(proxy.url(), f"UPDATE {table} SET v = 'changed'")
    async with caching_proxy(pg, cache_dir, admit_after=1) as proxy:
        assert await psql(proxy.url(), sql) == ["changed"]


@pytest.mark.parametrize("damage", ["garbage-db", "file-not-dir"])
async def test_broken_cache_dir_falls_back_to_pass_through(
    pg: PgServer, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = await make_table(pg)
    cache_dir = tmp_path / "cache"
    if damage == "garbage-db":
        cache_dir.mkdir()
        (cache_dir / "default").mkdir()
        (cache_dir / "default" / "cache.db").write_bytes(b"this is not sqlite" * 100)
    else:
        cache_dir.write_text("a file where the cache directory should be")
    caplog.set_level(logging.WARNING)
    async with caching_proxy(pg, cache_dir, admit_after=1) as proxy:
        for _ in range(3):
            assert await psql(proxy.url(), f"SELECT v FROM {table}") == ["kept"]
        totals = proxy.totals()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cache" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "hit" not in totals

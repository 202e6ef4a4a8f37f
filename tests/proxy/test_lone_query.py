"""A simple Query alone in its read (the common read, and the shortcut `Relay._lone_query`
takes for it) is decided exactly as the same Query among other frames (the frame loop):
sighted, stored, answered from the cache and remembered alike, evicted by a write alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.adversarial.rawpg import Raw, kinds, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table
from tests.proxy.test_hit_memo import memos


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


async def test_a_query_alone_in_its_read_is_decided_as_among_other_frames(pg: PgServer, proxy: CachingProxy) -> None:
    table = await make_table(pg)
    alone, among = (f"SELECT name FROM {table} WHERE id = {i}" for i in (1, 2))
    fragment = f"SELECT name FROM {table} WHERE id ="
    raw = await Raw.connect(proxy.port)
    try:
        for _ in range(2):  # two sightings each: the second is stored (admission)
            raw.send(query(alone))
            assert rows(await raw.until_ready()) == [[b"name 1"]]
            raw.send(query(among), query("SELECT 1"))
            assert rows(await raw.until_ready()) == [[b"name 2"]]
            assert rows(await raw.until_ready()) == [[b"1"]]
        calls = await pg.calls(fragment)
        assert calls == 4
        # Each answered from the cache, the other way round: stored by one path, served by the other.
        raw.send(query(among))
        assert rows(await raw.until_ready()) == [[b"name 2"]]
        raw.send(query(alone), query("SELECT 1"))
        assert rows(await raw.until_ready()) == [[b"name 1"]]
        assert rows(await raw.until_ready()) == [[b"1"]]
        assert await pg.calls(fragment) == calls
        assert memos(proxy) >= 1  # a hit alone in its read is remembered by its bytes
        # A write alone in its read evicts before it is sent, as anywhere.
        raw.send(query(f"UPDATE {table} SET name = 'new' WHERE id = 1"))
        assert kinds(await raw.until_ready()) == b"CZ"
        raw.send(query(alone))
        assert rows(await raw.until_ready()) == [[b"new"]]
        # Longer than a small message: not the shortcut's (the loop checks its length).
        long = f"SELECT name FROM {table} WHERE id = 2 /* {'x' * 12_000} */"
        raw.send(query(long))
        assert rows(await raw.until_ready()) == [[b"name 2"]]
    finally:
        await raw.close()

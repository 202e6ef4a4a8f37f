"""Bypassed simple reads of one slot (the text around its one number) are passed from the
session's memo (proxy/passes.py): not decided again by the full path, still counted as misses
with their reason, still probed 1 in `probe_every`, answered in order behind and ahead of
other requests, and never once a ground of the decision moved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from neonpoly.proxy.decisions import CacheDecisions
from tests.adversarial.rawpg import Raw, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table
from tests.proxy.test_lookup_bypass import Spied, _read, _template


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


def _decided(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The simple Queries the full path decides (`CacheDecisions._query`), by their text."""
    texts: list[str] = []
    full = CacheDecisions._query

    def counted(self: CacheDecisions, body: bytes, raw: bytes, out: list[bytes]) -> None:
        texts.append(body[:-1].decode())
        full(self, body, raw, out)

    monkeypatch.setattr(CacheDecisions, "_query", counted)
    return texts


async def test_bypassed_reads_of_one_slot_skip_the_full_path_and_are_counted_and_probed(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Spied(proxy, monkeypatch, window=8, probe_every=4)
    table = await make_table(pg, rows=40)
    fragment = f"SELECT name FROM {table} WHERE id ="
    decided = _decided(monkeypatch)
    raw = await Raw.connect(proxy.port)
    try:
        for key in range(1, 9):  # a window of first sightings: the template is bypassed
            assert await _read(raw, table, key) == [[f"name {key}".encode()]]
        del decided[:]
        for key in range(9, 21):
            assert await _read(raw, table, key) == [[f"name {key}".encode()]]
        # The first bypassed read made the memo; then only the probes (every 4th read since
        # the bypass began) took the full path, which looked them up (8 + 3 store lookups).
        assert [text.rsplit(" ", 1)[1] for text in decided] == ["9", "12", "16", "20"]
        assert spied.counts() == (11, 11)
        assert spied.cache.bypass.passed == 9
        assert spied.statuses(fragment) == {"miss": 20}
        reason = "not looked up: 0.0% of its last 8 lookups hit; 1 in 4 still looked up"
        assert spied.cache.lookup_refusal(_template(spied.cache, fragment)) == reason
        # Another spelling around the number (its trailer) is another slot: the full path.
        raw.send(query(f"SELECT name FROM {table} WHERE id = 21;"))
        assert rows(await raw.until_ready()) == [[b"name 21"]]
        assert decided[-1].endswith("= 21;")
    finally:
        await raw.close()


async def test_a_memo_passed_read_is_fresh_after_writes_and_moved_grounds_take_the_full_path(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Spied(proxy, monkeypatch, window=8, probe_every=1000)
    table = await make_table(pg, rows=40)
    decided = _decided(monkeypatch)
    raw = await Raw.connect(proxy.port)
    try:
        for key in range(1, 11):  # bypassed at the 9th read, which makes the memo
            await _read(raw, table, key)
        assert spied.cache.bypass.passed == 2 and len(decided) == 9
        raw.send(query(f"UPDATE {table} SET name = 'written' WHERE id = 30"))
        await raw.until_ready()
        assert await _read(raw, table, 30) == [[b"written"]]  # from the memo: the origin's rows
        assert len(decided) == 10 and spied.cache.bypass.passed == 3
        # A session change (a new identity object) is a moved ground: the full path decides.
        raw.send(query("SET application_name = 'moved'"))
        await raw.until_ready()
        assert await _read(raw, table, 31) == [[b"name 31"]]
        assert decided[-1].endswith("= 31")
        # Once the session knows who it is again, the full path's pass makes a new memo.
        for key in (32, 33, 34):
            assert await _read(raw, table, key) == [[f"name {key}".encode()]]
        assert len(decided) == 12  # 31 (and the UPDATE and SET): the rest from the new memo
        assert spied.statuses(f"SELECT name FROM {table} WHERE id =") == {"miss": 15}
    finally:
        await raw.close()


async def test_a_request_sent_behind_a_memo_passed_read_is_answered_after_it(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo's read has no queue entry while alone; what the client sends next (here a
    hit, which the cache could answer at once) must still come after its answer."""
    spied = Spied(proxy, monkeypatch, window=8, probe_every=1000)
    table = await make_table(pg, rows=40)
    other = await make_table(pg, rows=3)
    raw = await Raw.connect(proxy.port)
    locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
    try:
        for _ in range(3):  # stored, then a hit
            assert await _read(raw, other, 1) == [[b"name 1"]]
        for key in range(1, 11):
            await _read(raw, table, key)
        passed = spied.cache.bypass.passed
        tx = locker.transaction()
        await tx.start()
        await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        raw.send(query(f"SELECT name FROM {table} WHERE id = 20"))  # waits for the lock
        for _ in range(100):
            await asyncio.sleep(0.02)
            if spied.cache.bypass.passed > passed:
                break
        assert spied.cache.bypass.passed == passed + 1  # passed from the memo, outstanding
        raw.send(query(f"SELECT name FROM {other} WHERE id = 1"))
        await asyncio.sleep(0.1)
        await tx.rollback()
        assert rows(await raw.until_ready()) == [[b"name 20"]]
        assert rows(await raw.until_ready()) == [[b"name 1"]]
        assert await _read(raw, table, 21) == [[b"name 21"]]
    finally:
        await locker.close()
        await raw.close()

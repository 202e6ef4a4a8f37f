"""A template whose lookups never hit stops being looked up (cache/bypass.py): its reads go to
the origin as pass-through sends them, with no lookup and no admission count, counted as
misses with the reason; 1 in `probe_every` is still looked up, and a template that turns
hot is served from the cache again. Small windows (set on the route's cache) keep these fast;
the last test runs the defaults, a pgbench -S in miniature."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from neonpoly.cache.bypass import WINDOW, Bypass
from neonpoly.cache.query_cache import QueryCache
from tests.adversarial.rawpg import SYNC, Raw, bind, describe_portal, execute, kinds, parse, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Spied:
    """The route's cache, with a small bypass window and its store lookups and admissions counted."""

    def __init__(self, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch, **bypass: Any) -> None:
        (self.cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
        self.clock = Clock()
        if bypass:
            self.cache.bypass = Bypass(self.clock, **bypass)
        self.gets = self.admits = 0
        get, admit = self.cache.store.get, self.cache.admit

        def counted_get(key: bytes) -> object:
            self.gets += 1
            return get(key)

        def counted_admit(key: bytes, template_id: str = "") -> bool:
            self.admits += 1
            return admit(key, template_id)

        monkeypatch.setattr(self.cache.store, "get", counted_get)
        monkeypatch.setattr(self.cache, "admit", counted_admit)

    def counts(self) -> tuple[int, int]:
        return self.gets, self.admits

    def statuses(self, fragment: str) -> dict[str, int]:
        (tpl,) = [t for t in self.cache.stats.snapshot().templates if fragment in t.template]
        return dict(tpl.by_status)


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


async def _read(raw: Raw, table: str, key: int) -> list[list[bytes | None]]:
    raw.send(query(f"SELECT name FROM {table} WHERE id = {key}"))
    return rows(await raw.until_ready())


def _template(cache: QueryCache, fragment: str) -> str:
    (tpl,) = [t for t in cache.stats.snapshot().templates if fragment in t.template]
    return tpl.template_id


async def test_a_template_whose_lookups_never_hit_is_passed_through_unlooked_up(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Spied(proxy, monkeypatch, window=8, probe_every=4)
    table = await make_table(pg, rows=30)
    fragment = f"SELECT name FROM {table} WHERE id ="
    raw = await Raw.connect(proxy.port)
    admin = await asyncpg.connect(**proxy.dsn("postgres", "neonpoly"))
    try:
        for key in range(1, 9):  # first sightings, every one: a window of misses, no hit
            assert await _read(raw, table, key) == [[f"name {key}".encode()]]
        assert spied.counts() == (8, 8)
        calls = await pg.calls(fragment)
        for key in range(9, 12):  # bypassed: to the origin, neither looked up nor admitted
            assert await _read(raw, table, key) == [[f"name {key}".encode()]]
        assert spied.counts() == (8, 8)
        assert await pg.calls(fragment) == calls + 3
        assert await _read(raw, table, 12) == [[b"name 12"]]  # the 4th: a probe, looked up in full
        assert spied.counts() == (9, 9)
        assert await _read(raw, table, 13) == [[b"name 13"]]
        assert spied.counts() == (9, 9)
        # Counted as misses (cacheable reads the origin answered), 4 of them not looked up.
        assert spied.statuses(fragment) == {"miss": 13} and spied.cache.bypass.passed == 4
        # Why, where reasons show: the template's last status and reason (SHOW QUERIES, the console).
        reason = "not looked up: 0.0% of its last 8 lookups hit; 1 in 4 still looked up"
        assert spied.cache.lookup_refusal(_template(spied.cache, fragment)) == reason
        (row,) = [r for r in await admin.fetch("SHOW QUERIES") if fragment in r["template"]]
        assert (row["last_status"], row["last_reason"]) == ("miss", reason)
    finally:
        await admin.close()
        await raw.close()


async def test_a_bypassed_prepared_statement_is_passed_through_and_probed(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Spied(proxy, monkeypatch, window=8, probe_every=4)
    table = await make_table(pg, rows=30)
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(parse("s", f"SELECT name FROM {table} WHERE id = $1"), SYNC)
        await raw.until_ready()
        seen = []
        for key in range(1, 21):  # one lone batch per execution, as drivers send them
            raw.send(bind("", "s", (str(key),)), describe_portal(), execute(), SYNC)
            seen.append(rows(await raw.until_ready()))
            if key == 8:
                assert spied.counts() == (8, 8)  # the window: every one looked up and counted
        assert seen == [[[f"name {key}".encode()]] for key in range(1, 21)]
        assert spied.counts() == (11, 11)  # then only the probes: reads 12, 16 and 20
        assert spied.statuses(f"FROM {table} WHERE id =") == {"miss": 20} and spied.cache.bypass.passed == 9
    finally:
        await raw.close()


async def test_probes_bring_a_template_that_turns_hot_back_to_the_cache(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Spied(proxy, monkeypatch, window=8, probe_every=4)
    table = await make_table(pg, rows=30)
    fragment = f"SELECT name FROM {table} WHERE id ="
    raw = await Raw.connect(proxy.port)
    try:
        for key in range(11, 19):  # cold: bypassed
            await _read(raw, table, key)
        template = _template(spied.cache, fragment)
        assert spied.cache.lookup_refusal(template) is not None
        # Hot from now on: one key. The probes (every 4th read) see it, store it, then hit it;
        # the read after that hit is looked up in full again, and answered from the cache.
        for _ in range(16):
            assert await _read(raw, table, 1) == [[b"name 1"]]
        assert spied.cache.lookup_refusal(template) is None
        calls = await pg.calls(fragment)
        for _ in range(10):
            assert await _read(raw, table, 1) == [[b"name 1"]]
        assert await pg.calls(fragment) == calls  # served from the cache
        assert spied.cache.lookup_refusal(template) is None
    finally:
        await raw.close()


async def test_a_bypassed_read_after_a_write_is_fresh_and_the_write_still_evicts(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Spied(proxy, monkeypatch, window=8, probe_every=4)
    table = await make_table(pg, rows=40)
    fragment = f"SELECT name FROM {table} WHERE id ="
    raw = await Raw.connect(proxy.port)
    direct = await asyncpg.connect(**pg.dsn("postgres", "app"))
    try:
        for _ in range(3):  # stored, then served: key 1's entry
            await _read(raw, table, 1)
        for key in range(10, 40):  # then cold: bypassed within two windows
            await _read(raw, table, key)
            if spied.cache.lookup_refusal(_template(spied.cache, fragment)) is not None:
                break
        template = _template(spied.cache, fragment)
        assert spied.cache.lookup_refusal(template) is not None
        raw.send(query(f"UPDATE {table} SET name = 'written' WHERE id = 1"))
        await raw.until_ready()
        before = spied.cache.bypass.passed
        # Another session (this one remembers its hit of key 1: hits.py, not a bypassed path).
        other = await Raw.connect(proxy.port)
        got = await _read(other, table, 1)
        assert spied.cache.bypass.passed == before + 1  # bypassed: the origin answered
        expected = await direct.fetchval(f"SELECT name FROM {table} WHERE id = 1")
        assert got == [[expected.encode()]] == [[b"written"]]
        # The write evicted the entry stored before the bypass as any write does: once the
        # template is looked up again (the bypass expired), key 1 is not answered stale.
        spied.clock.now += 3600
        for _ in range(3):  # up to the next probe, which sees the time is up
            assert await _read(other, table, 1) == [[b"written"]]
        assert spied.cache.lookup_refusal(template) is None
        assert spied.cache.bypass.passed == before + 3
        assert await _read(other, table, 1) == [[b"written"]]
        await other.close()
    finally:
        await direct.close()
        await raw.close()


async def test_a_hot_template_served_from_hit_memos_is_never_bypassed(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its hits come from the session's hit memos (the full path only sees its cold keys):
    they count as lookups that hit, so the cold keys' misses never make a window."""
    spied = Spied(proxy, monkeypatch, window=16, probe_every=4)
    table = await make_table(pg, rows=60)
    fragment = f"SELECT name FROM {table} WHERE id ="
    raw = await Raw.connect(proxy.port)
    try:
        for cold in range(10, 50):
            for hot in (1, 2, 3):
                assert await _read(raw, table, hot) == [[f"name {hot}".encode()]]
            assert await _read(raw, table, cold) == [[f"name {cold}".encode()]]
        statuses = spied.statuses(fragment)
        assert spied.cache.bypass.passed == 0 and statuses["hit"] > 100
        assert spied.cache.lookup_refusal(_template(spied.cache, fragment)) is None
    finally:
        await raw.close()


async def test_pgbench_select_only_in_miniature_is_bypassed_with_the_defaults(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults, end to end: a prepared point read of a new key every time is looked up
    for one window (WINDOW misses), then passed through but for 1 in 16."""
    spied = Spied(proxy, monkeypatch)
    extra = 64
    table = await make_table(pg, rows=WINDOW + extra)
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(parse("s", f"SELECT name FROM {table} WHERE id = $1"), SYNC)
        await raw.until_ready()
        for key in range(1, WINDOW + extra + 1):
            raw.send(bind("", "s", (str(key),)), describe_portal(), execute(), SYNC)
            assert rows(await raw.until_ready()) == [[f"name {key}".encode()]]
        assert spied.counts() == (WINDOW + extra // 16, WINDOW + extra // 16)
        assert spied.statuses(f"FROM {table} WHERE id =") == {"miss": WINDOW + extra}
        assert spied.cache.bypass.passed == extra - 4
    finally:
        await raw.close()


async def test_a_bypassed_lone_batch_outstanding_is_answered_in_order_and_errors_pass(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bypassed lone batch decided from its memo is relayed as pass-through relays it (no
    queue entry while it is alone, proxy/batches.py `_pass_lone`): what the client sends
    behind it (here a hit the cache could answer at once) still comes after its answer, and
    an error it meets reaches the client like any answer."""
    spied = Spied(proxy, monkeypatch, window=8, probe_every=1000)
    table = await make_table(pg, rows=40)
    other = await make_table(pg, rows=3)
    raw = await Raw.connect(proxy.port)
    locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
    try:
        (session,) = list(proxy.service.server.sessions)
        raw.send(parse("s", f"SELECT name FROM {table} WHERE id = $1"), SYNC)
        await raw.until_ready()
        for _ in range(3):  # stored, then a hit
            assert await _read(raw, other, 1) == [[b"name 1"]]
        for key in range(1, 11):  # a window of misses, then bypassed (the memo made on the way)
            raw.send(bind("", "s", (str(key),)), describe_portal(), execute(), SYNC)
            assert rows(await raw.until_ready()) == [[f"name {key}".encode()]]
        passed = spied.cache.bypass.passed
        tx = locker.transaction()
        await tx.start()
        await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        raw.send(bind("", "s", ("20",)), describe_portal(), execute(), SYNC)  # waits for the lock
        for _ in range(100):
            await asyncio.sleep(0.02)
            if spied.cache.bypass.passed > passed:
                break
        assert spied.cache.bypass.passed == passed + 1
        assert (session.inflight, len(session.pending)) == (1, 0)  # relayed with no queue entry
        raw.send(query(f"SELECT name FROM {other} WHERE id = 1"))
        await asyncio.sleep(0.1)
        await tx.rollback()
        assert rows(await raw.until_ready()) == [[b"name 20"]]
        assert rows(await raw.until_ready()) == [[b"name 1"]]
        raw.send(bind("", "s", ("x",)), describe_portal(), execute(), SYNC)  # refused by the origin
        assert kinds(await raw.until_ready()) == b"EZ"
        assert spied.cache.bypass.passed == passed + 2
        raw.send(bind("", "s", ("21",)), describe_portal(), execute(), SYNC)
        assert rows(await raw.until_ready()) == [[b"name 21"]]
        assert (session.inflight, len(session.pending)) == (0, 0)
        assert spied.statuses(f"SELECT name FROM {table} WHERE id =") == {"miss": 13}
    finally:
        await locker.close()
        await raw.close()

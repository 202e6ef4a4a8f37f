"""Repeats of a hit are answered from the memo of their raw bytes (proxy/hits.py), and that
memo never outlives what the hit rested on: a write, a SET, a new prepared statement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from neonpoly.cache.bypass import LookupScore
from neonpoly.cache.query_cache import QueryCache
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


def memos(proxy: CachingProxy) -> int:
    return sum(len(s.hit_memos) for s in proxy.service.server.sessions if hasattr(s, "hit_memos"))


def counted_lookups(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The keys the store is asked for from now on (QueryCache.lookup_entry, still called)."""
    lookups: list[bytes] = []
    full = QueryCache.lookup_entry

    def counted(self: QueryCache, key: bytes, score: LookupScore | None = None) -> object:
        lookups.append(key)
        return full(self, key, score)

    monkeypatch.setattr(QueryCache, "lookup_entry", counted)
    return lookups


async def test_prepared_repeat_is_served_from_the_memo_until_a_write(pg: PgServer, proxy: CachingProxy) -> None:
    table = await make_table(pg)
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    try:
        stmt = await conn.prepare(f"SELECT name FROM {table} WHERE id = $1")
        for _ in range(3):
            assert await stmt.fetchval(2) == "name 2"
        assert memos(proxy) >= 1
        hits = proxy.totals().get("hit", 0)
        for _ in range(3):
            assert await stmt.fetchval(2) == "name 2"
        assert proxy.totals().get("hit", 0) == hits + 3  # counted like any hit
        calls = await pg.calls(f"SELECT name FROM {table} WHERE id =")
        await conn.execute(f"UPDATE {table} SET name = 'changed' WHERE id = 2")
        assert await stmt.fetchval(2) == "changed"
        assert await pg.calls(f"SELECT name FROM {table} WHERE id =") == calls + 1
    finally:
        await conn.close()


async def test_simple_repeat_respects_set_and_transactions(pg: PgServer, proxy: CachingProxy) -> None:
    table = await make_table(pg)
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    sql = f"SELECT count(*) FROM {table}"
    try:
        for _ in range(4):
            await conn.execute(sql)  # no arguments: the simple protocol
        assert memos(proxy) >= 1
        calls = await pg.calls(f"SELECT count(*) FROM {table}")
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (100, 'x')")
            await conn.execute(sql)  # inside a transaction: the origin answers
            assert await pg.calls(f"SELECT count(*) FROM {table}") == calls + 1
        await conn.execute("SET search_path TO public")  # the session learns who it is again
        assert await conn.fetchval(sql) == 6
    finally:
        await conn.close()


async def test_every_event_a_memo_rests_on_sends_the_next_repeat_to_the_origin(
    pg: PgServer, proxy: CachingProxy
) -> None:
    """A memo serves a repeat from the entry it served last (QueryCache.serves) and asks the
    TTL rules again only when they move: a purge, a purge of its template (no generation
    moves), the invalidation plane's gate closing, a rule saying never, the cache's mode
    turned off and DDL elsewhere each make the very next repeat of the same bytes go to the
    origin."""
    table = await make_table(pg)
    (cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
    fragment = f"SELECT name FROM {table} WHERE id ="
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    other = await asyncpg.connect(**proxy.dsn("postgres"))
    try:
        stmt = await conn.prepare(f"SELECT name FROM {table} WHERE id = $1")

        async def served_without_origin() -> None:
            for _ in range(6):
                before = await pg.calls(fragment)
                assert await stmt.fetchval(2) == "name 2"
                if memos(proxy) and await pg.calls(fragment) == before:
                    return
            raise AssertionError("the repeat never stopped reaching the origin")

        def template_purge() -> None:
            (memo,) = [m for s in proxy.service.server.sessions for m in getattr(s, "hit_memos", {}).values()]
            assert cache.store.purge_template(memo.template_id) == 1

        def gate_closed() -> None:
            cache.serve_gate = lambda: False

        async def ddl() -> None:
            await other.execute(f"CREATE TABLE {table}_ddl (i int)")

        def purge() -> None:
            proxy.service.purge()

        def never_rule() -> None:  # a memo asks ttl_for again only when the rules move
            (memo,) = [m for s in proxy.service.server.sessions for m in getattr(s, "hit_memos", {}).values()]
            rule = proxy.service.rules.add("query", memo.template_id, None)
            cleanup.append(lambda: proxy.service.rules.drop(rule.id))

        def mode_off() -> None:
            proxy.service.rules.set_mode("off")
            cleanup.append(lambda: proxy.service.rules.set_mode("auto"))

        cleanup: list[Callable[[], object]] = []
        events: list[tuple[str, Callable[[], None] | None]] = [
            ("purge", purge), ("template purge", template_purge), ("gate closed", gate_closed),
            ("never rule", never_rule), ("mode off", mode_off), ("ddl elsewhere", None),
        ]  # fmt: skip
        for name, event in events:
            await served_without_origin()
            before = await pg.calls(fragment)
            if event is None:
                await ddl()
            else:
                event()
            assert await stmt.fetchval(2) == "name 2"
            assert await pg.calls(fragment) == before + 1, name
            cache.serve_gate = None
            while cleanup:
                cleanup.pop()()
    finally:
        await other.close()
        await conn.close()


async def test_a_simple_read_whose_entry_a_write_made_stale_is_captured_from_its_memo(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repeat of a remembered simple Query after a write goes to the origin and is stored
    again without being decided again (CacheDecisions._memo_miss), and the write is seen."""
    from neonpoly.proxy.decisions import CacheDecisions

    table = await make_table(pg)
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    sql = f"SELECT name FROM {table} WHERE id = 2"
    fragment = f"SELECT name FROM {table} WHERE id ="
    try:
        for _ in range(4):
            await conn.execute(sql)  # no arguments: the simple protocol
        assert memos(proxy) >= 1
        await conn.execute(f"UPDATE {table} SET name = 'changed' WHERE id = 2")
        decided: list[object] = []
        full = CacheDecisions._cache_decision

        def counted(self: CacheDecisions, *args: object, **kwargs: object) -> object:
            decided.append(args)
            return full(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(CacheDecisions, "_cache_decision", counted)
        before = await pg.calls(fragment)
        await conn.execute(sql)  # stale: to the origin, captured from the memo
        assert await pg.calls(fragment) == before + 1
        assert decided == []
        await conn.execute(sql)  # stored again: a hit
        assert await pg.calls(fragment) == before + 1
        (memo,) = [m for s in proxy.service.server.sessions for m in getattr(s, "hit_memos", {}).values()]
        stored = memo.cache.lookup(memo.key)
        assert stored is not None and b"changed" in stored  # what was stored is the new row
    finally:
        await conn.close()


async def test_a_memo_that_sent_a_miss_serves_the_entry_it_stored_without_a_lookup(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capture a memo sent (CacheDecisions._memo_miss) becomes the memo's entry: its next
    repeat is served without asking the store for the key, and only while that entry holds
    (a write in between sends the repeat to the origin again). The key its captures are
    stamped with is worked out once per memo."""
    from neonpoly.proxy.decisions import CacheDecisions
    from tests.adversarial.rawpg import Raw, query, rows

    table = await make_table(pg)
    sql = f"SELECT name FROM {table} WHERE id = 3"
    raw = await Raw.connect(proxy.port)
    try:
        for _ in range(3):
            raw.send(query(sql))
            assert rows(await raw.until_ready()) == [[b"name 3"]]
        lookups = counted_lookups(monkeypatch)
        points: list[object] = []
        point = CacheDecisions._point

        def pointed(self: CacheDecisions, *args: object) -> object:
            points.append(args)
            return point(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(CacheDecisions, "_point", pointed)
        for name in (b"one", b"two"):
            raw.send(query(f"UPDATE {table} SET name = '{name.decode()}' WHERE id = 3"))
            await raw.until_ready()
            raw.send(query(sql))  # the memo's entry is stale: a miss, captured
            assert rows(await raw.until_ready()) == [[name]]
            assert len(lookups) == 1  # the memo asked once, and found nothing
            raw.send(query(sql))  # served from the memo's new entry
            assert rows(await raw.until_ready()) == [[name]]
            assert len(lookups) == 1
            lookups.clear()
        assert len(points) == 1  # the first miss from the memo; the second reused its names
    finally:
        await raw.close()


async def test_a_lone_batch_hit_is_remembered_with_the_entry_it_was_served(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prepared statement's lone batch answered from its shape's memo (BatchHandling.
    `_lone_hit`) is remembered by its bytes with the entry it was served: its first repeat
    is served without asking the store again, and each answer counts as a hit."""
    from tests.adversarial.rawpg import SYNC, Raw, bind, describe_portal, execute, parse, rows

    table = await make_table(pg)
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(parse("s", f"SELECT name FROM {table} WHERE id = $1"), SYNC)
        await raw.until_ready()
        for key in ("1", "1", "2", "2"):  # stored, the shape's memo made on the way
            raw.send(bind("", "s", (key,)), describe_portal(), execute(), SYNC)
            await raw.until_ready()
        (session,) = list(proxy.service.server.sessions)
        session.hit_memos.clear()  # the next reads are this session's first of their bytes
        lookups = counted_lookups(monkeypatch)
        hits = proxy.totals().get("hit", 0)
        for key, looked in (("1", 1), ("1", 1), ("2", 2), ("2", 2)):
            raw.send(bind("", "s", (key,)), describe_portal(), execute(), SYNC)
            assert rows(await raw.until_ready()) == [[f"name {key}".encode()]]
            assert len(lookups) == looked  # looked up once: its repeat is served from the memo
        assert proxy.totals().get("hit", 0) == hits + 4
        assert len(session.hit_memos) == 2
    finally:
        await raw.close()


async def test_a_memo_asks_the_relation_book_again_only_after_it_moves(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeats of a remembered read are not resolved again while the relation book stands
    still (its version); once it moves (it learns, is refused or forgets: here it forgets, as
    the invalidation plane makes it), the next repeat is decided on the full path again."""
    from neonpoly.cache.relations import RelationBook
    from neonpoly.proxy.decisions import CacheDecisions

    table = await make_table(pg)
    (cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    sql = f"SELECT name FROM {table} WHERE id = 2"
    try:
        for _ in range(4):
            await conn.execute(sql)  # no arguments: the simple protocol
        assert memos(proxy) >= 1
        resolved: list[object] = []
        decided: list[object] = []
        resolve, decide = RelationBook.resolve, CacheDecisions._cache_decision

        def counted_resolve(self: RelationBook, *args: object, **kwargs: object) -> object:
            resolved.append(args)
            return resolve(self, *args, **kwargs)  # type: ignore[arg-type]

        def counted_decision(self: CacheDecisions, *args: object, **kwargs: object) -> object:
            decided.append(args)
            return decide(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(RelationBook, "resolve", counted_resolve)
        monkeypatch.setattr(CacheDecisions, "_cache_decision", counted_decision)
        hits = proxy.totals().get("hit", 0)
        for _ in range(3):
            await conn.execute(sql)
        assert proxy.totals().get("hit", 0) == hits + 3
        assert resolved == [] and decided == []  # served from the memo, the book not asked
        cache.relations.forget()
        await conn.execute(sql)
        assert decided != []  # the book moved: decided again in full
    finally:
        await conn.close()

"""A prepared statement's lone batch decided from its shape's memo (`BatchHandling._lone_batch`)
asks the relation book and the TTL rules again only once they moved (their versions), as a
hit memo does: while they stand it asks neither; once the book learns, is refused or forgets,
or a rule says never, the very next batch of the shape is decided on the full path again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.relations import RelationBook
from neonpoly.proxy.batches import BatchHandling
from tests.adversarial.rawpg import SYNC, Raw, bind, describe_portal, execute, parse, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


class Counted:
    """Calls of the relation book's resolve, the rules' question and the full path's `_sync`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.resolved = self.asked = self.synced = 0
        resolve, caches, sync = RelationBook.resolve, QueryCache.caches, BatchHandling._sync

        def counted_resolve(book: RelationBook, *args: object, **kwargs: object) -> object:
            self.resolved += 1
            return resolve(book, *args, **kwargs)  # type: ignore[arg-type]

        def counted_caches(cache: QueryCache, *args: object, **kwargs: object) -> object:
            self.asked += 1
            return caches(cache, *args, **kwargs)  # type: ignore[arg-type]

        def counted_sync(session: BatchHandling, *args: object, **kwargs: object) -> object:
            self.synced += 1
            return sync(session, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(RelationBook, "resolve", counted_resolve)
        monkeypatch.setattr(QueryCache, "caches", counted_caches)
        monkeypatch.setattr(BatchHandling, "_sync", counted_sync)


async def _read(raw: Raw, key: int) -> list[list[bytes | None]]:
    raw.send(bind("", "s", (str(key),)), describe_portal(), execute(), SYNC)
    return rows(await raw.until_ready())


async def test_a_batch_memo_asks_the_relation_book_and_the_rules_again_only_after_they_move(
    pg: PgServer, proxy: CachingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = await make_table(pg, rows=40)
    (cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
    raw = await Raw.connect(proxy.port)
    try:
        raw.send(parse("s", f"SELECT name FROM {table} WHERE id = $1"), SYNC)
        await raw.until_ready()
        for key in (1, 2, 3):  # the full path, which remembers the shape; then its memo
            assert await _read(raw, key) == [[f"name {key}".encode()]]
        (session,) = list(proxy.service.server.sessions)
        assert len(session.batch_memos) == 1
        counted = Counted(monkeypatch)
        for key in (4, 5, 9):  # first sightings of other keys: misses decided from the memo
            assert await _read(raw, key) == [[f"name {key}".encode()]]
        assert (counted.resolved, counted.asked, counted.synced) == (0, 0, 0)

        cache.relations.forget()  # as DDL or the invalidation plane makes it forget
        assert await _read(raw, 6) == [[b"name 6"]]
        assert counted.synced == 1  # the book moved: decided on the full path again
        for key in (7, 10):  # (the book learns the table again meanwhile: moved once more)
            assert await _read(raw, key) == [[f"name {key}".encode()]]
        synced = counted.synced
        assert await _read(raw, 11) == [[b"name 11"]]
        assert counted.synced == synced  # remembered anew: the memo again

        (memo,) = session.batch_memos.values()
        rule = proxy.service.rules.add("query", memo.template_id, None)  # never cached
        try:
            hits = proxy.totals().get("hit", 0)
            for _ in range(4):  # stored on its 2nd sighting, a hit from its 3rd, were it cached
                assert await _read(raw, 8) == [[b"name 8"]]
            assert proxy.totals().get("hit", 0) == hits
            assert counted.synced == synced + 4  # every one decided on the full path: never cached
        finally:
            proxy.service.rules.drop(rule.id)
    finally:
        await raw.close()

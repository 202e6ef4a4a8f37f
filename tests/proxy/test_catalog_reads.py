"""A read of the system catalogs (psql's `\\d`, a console's own introspection) is never
cacheable: it counts as pass-through with its reason from its very first run, not as a miss
(a cacheable read the origin answered) while the catalog lookup that tells is under way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.adversarial.rawpg import SYNC, Raw, bind, describe_portal, execute, parse, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy

REASON = "reads the system catalog {}, which changes without writes neonpoly sees"


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


def _template(proxy: CachingProxy, fragment: str) -> tuple[dict[str, int], str | None]:
    (cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
    (tpl,) = [t for t in cache.stats.snapshot().templates if fragment in t.template]
    return dict(tpl.by_status), tpl.last_reason


async def test_a_catalog_read_is_pass_through_from_its_first_run(proxy: CachingProxy) -> None:
    raw = await Raw.connect(proxy.port)
    try:
        for _ in range(3):  # simple protocol, as psql's \d sends it
            raw.send(query("SELECT amname FROM pg_catalog.pg_am WHERE amname = 'btree'"))
            assert rows(await raw.until_ready()) == [[b"btree"]]
        for _ in range(3):  # extended protocol, as drivers send it
            raw.send(
                parse("", "SELECT count(*) > 0 FROM pg_catalog.pg_opclass WHERE opcname = $1"),
                bind("", "", ("int4_ops",)), describe_portal(), execute(), SYNC,
            )  # fmt: skip
            assert rows(await raw.until_ready()) == [[b"t"]]
    finally:
        await raw.close()
    assert _template(proxy, "FROM pg_catalog.pg_am") == ({"volatile": 3}, REASON.format("pg_am"))
    assert _template(proxy, "FROM pg_catalog.pg_opclass") == ({"volatile": 3}, REASON.format("pg_opclass"))
    assert "miss" not in proxy.totals()

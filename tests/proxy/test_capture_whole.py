"""A miss being captured whose answer comes in one read, whole and clean, is taken in one
pass (`OriginAnswers._origin_fast`): stored as the frame loop stores it. What the frame loop leaves
out of a capture (notices, settings) or refuses (errors) still reaches the client, and is
never replayed from the cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from neonpoly import pgwire
from tests.adversarial.rawpg import Raw, kinds, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table

NOTICE = pgwire.frame(b"N", b"SNOTICE\x00C00000\x00Mfrom the origin\x00\x00")


@pytest.fixture
async def proxy(pg: PgServer, tmp_path: Path) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache") as p:
        yield p


def _slip_before_ready(proxy: CachingProxy, raw: Raw) -> list[bytes]:
    """From now on, the origin's next read that ends an answer gets the frames put in the
    returned list slipped in before its ReadyForQuery (once; the list is emptied)."""
    port = raw.writer.get_extra_info("sockname")[1]
    (session,) = [s for s in proxy.service.server.sessions if s.peer.endswith(f":{port}")]
    transport = session.origin_transport
    assert transport is not None
    protocol: Any = transport.get_protocol()
    deliver = protocol.data_received
    extra: list[bytes] = []

    def received(data: bytes) -> None:
        if extra and data[-6:-5] == b"Z":
            data = data[:-6] + b"".join(extra) + data[-6:]
            extra.clear()
        deliver(data)

    protocol.data_received = received
    transport.set_protocol(protocol)  # uvloop reads data_received again only here
    return extra


async def test_an_answer_captured_whole_is_stored_without_what_a_capture_leaves_out(
    pg: PgServer, proxy: CachingProxy
) -> None:
    table = await make_table(pg)
    raw = await Raw.connect(proxy.port)
    try:
        extra = _slip_before_ready(proxy, raw)
        for i, slipped in ((1, b""), (2, NOTICE), (3, pgwire.frame(b"S", b"application_name\x00slipped\x00"))):
            sql = f"SELECT name FROM {table} WHERE id = {i}"
            raw.send(query(sql))  # first sighting: not stored
            plain = await raw.until_ready()
            if slipped:
                extra.append(slipped)
            raw.send(query(sql))  # second: captured, the slipped frame in the same read
            captured = await raw.until_ready()
            assert rows(captured) == [[f"name {i}".encode()]]
            assert kinds(captured) == b"TDC" + slipped[:1] + b"Z"  # the client got it
            calls = await pg.calls(f"SELECT name FROM {table} WHERE id =")
            raw.send(query(sql))  # answered from the cache, as the origin answered it
            assert await raw.until_ready() == plain
            assert await pg.calls(f"SELECT name FROM {table} WHERE id =") == calls
        # An error in a captured read: forwarded, nothing stored.
        sql = f"SELECT name FROM {table} WHERE id = 4"
        raw.send(query(sql))
        await raw.until_ready()
        extra.append(pgwire.frame(b"E", b"SERROR\x00C22012\x00Mslipped\x00\x00"))
        raw.send(query(sql))
        assert kinds(await raw.until_ready()) == b"TDCEZ"
        calls = await pg.calls(f"SELECT name FROM {table} WHERE id =")
        raw.send(query(sql))
        assert rows(await raw.until_ready()) == [[b"name 4"]]
        assert await pg.calls(f"SELECT name FROM {table} WHERE id =") == calls + 1
    finally:
        await raw.close()

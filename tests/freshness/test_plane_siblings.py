"""Two workers of one `serve --workers N` on the plane: they share their table generations in
memory (cache/siblings.py), so a write through one returns without waiting for the other's
acknowledgement, and the other answers nothing the write made stale even when Redis has told
it nothing (here its plane is made deaf: it reads the stream, applies and acknowledges none of
it, and its gate stays open)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from neonpoly.cache.siblings import SiblingBoard
from neonpoly.freshness.redis_origin import FollowedOrigin
from neonpoly.freshness.redis_plane import RedisPlane
from tests.freshness.conftest import FeedProxy, plane_node, until
from tests.freshness.redisharness import RedisServer
from tests.pgharness import PgServer


@asynccontextmanager
async def _workers(pg: PgServer, root: Path, url: str, plane: dict[str, Any]) -> AsyncIterator[list[FeedProxy]]:
    """Two nodes, each on its row of one region (the parent's memfd, a descriptor each)."""
    parent = SiblingBoard.create(2, slots=1024)
    rows = [SiblingBoard.attach(os.dup(parent.fileno()), i) for i in range(2)]
    try:
        async with (
            plane_node(pg, root / "w0", url, plane=plane, siblings=rows[0]) as a,
            plane_node(pg, root / "w1", url, plane=plane, siblings=rows[1]) as b,
        ):
            yield [a, b]
    finally:
        for board in (*rows, parent):
            board.close()


def _deaf(plane: RedisPlane) -> None:
    """The node keeps reading its streams (its gate stays proven) but applies and acknowledges
    nothing it reads: whatever it knows of the other node's writes, memory told it."""

    def take(origin: FollowedOrigin, entries: Any) -> None:
        assert origin.cursor is not None
        for entry_id, fields in entries:
            origin.cursor.take(int(fields["n"]), entry_id)

    plane._apply = take  # type: ignore[method-assign]


@pytest.mark.parametrize("siblings_only", [False, True], ids=["published", "board-only"])
async def test_a_write_through_one_worker_returns_only_once_the_other_cannot_serve_it_stale(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path, siblings_only: bool
) -> None:
    table = f"siblings_{uuid.uuid4().hex[:8]}"
    direct = await psycopg.AsyncConnection.connect(pg_logical.url("postgres", "app"), autocommit=True)
    await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
    # No rejoin grace, as on the workers' private redis-server (it cannot outlive them).
    plane = {"siblings_only": siblings_only, "grace": 0.0}
    async with _workers(pg_logical, tmp_path, redis_server.url, plane) as (a, b):
        plane_a, plane_b = a.service.plane, b.service.plane
        assert plane_a is not None and plane_b is not None

        def up() -> bool:
            status = [a.service.report().plane, b.service.report().plane]
            return all(s is not None and len(s.nodes) == 2 and s.siblings and s.origins[0].caught_up for s in status)

        await until(up, "both workers on the plane, each seeing the other as its sibling")
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        read = f"SELECT v FROM {table} WHERE id = 1"
        # A write to a table A has not looked up yet evicts everything (a global bump, which
        # every node applies and acknowledges): let A learn it first.
        generations = a.service.routes.by_id["default"].cache.store.generations  # type: ignore[union-attr]
        await writer.fetchval(read)
        for _ in range(100):
            before = generations.to_state()
            await writer.execute(f"UPDATE {table} SET v = 0 WHERE id = 1")
            after = generations.to_state()
            if after["global"] == before["global"] and after["tables"] != before["tables"]:
                break
        else:
            raise AssertionError("A's writes to the table never became table bumps")
        _deaf(plane_b)
        published = plane_a.status().published
        try:
            for i in range(1, 11):
                await reader.fetchval(read)  # stored (admit_after=1)...
                hits = b.hits()
                await reader.fetchval(read)
                assert b.hits() == hits + 1, "B did not answer from its cache: this proves nothing"
                await writer.execute(f"UPDATE {table} SET v = $1 WHERE id = 1", i)
                # The write returned: B must not answer the entry it made stale.
                truth = (await (await direct.execute(read)).fetchone() or [None])[0]
                assert await reader.fetchval(read) == truth == i
        finally:
            await writer.close()
            await reader.close()
            await direct.close()
        status = plane_a.status()
        # B acknowledged nothing: had A waited for it, every write's hold would have timed out.
        assert status.hold_timeouts == 0
        if siblings_only:  # the workers' private Redis: table bumps never went through it
            assert status.published == published and status.board_only > 0
        else:  # published for other hosts, not waited for by this one
            assert status.published > published and status.spared > 0

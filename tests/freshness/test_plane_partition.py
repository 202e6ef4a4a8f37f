"""A node cut off from Redis while the others still reach it (rules 4 and 5 of plane.py).

Its writes cannot be published, so the others would serve rows they made stale. It holds each
write's reply until its registration has expired and every other node has moved it to the
origin's `lost` set, which pauses their hits of that origin; on its return it publishes a
purge and leaves the set. A node that never comes back (crashed) keeps the others passing
through until it does, under its stable name, or until `neonpoly plane forget` says it will
not. The cut is a loopback relay in front of a real redis-server (`CuttableLink`)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import psycopg
from redis.asyncio import Redis

from neonpoly.freshness.plane import OriginPlaneStatus, PlaneStatus
from tests.freshness.conftest import FAST, FeedProxy, plane_node, until
from tests.freshness.redisharness import CuttableLink, RedisServer
from tests.pgharness import PgServer


async def _table(pg: PgServer) -> tuple[str, str]:
    table = f"fence_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(pg.url("postgres", "app"), autocommit=True) as direct:
        await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
    return table, f"SELECT v FROM {table} WHERE id = 1"


def _origin(node: FeedProxy) -> tuple[PlaneStatus, OriginPlaneStatus]:
    plane = node.service.report().plane
    assert plane is not None
    origin = plane.origin(node.origin_key)
    assert origin is not None
    return plane, origin


def _serving(node: FeedProxy) -> bool:
    plane, origin = _origin(node)
    return plane.state == "up" and origin.caught_up and not origin.lost


async def _until_hit(reader: asyncpg.Connection, node: FeedProxy, sql: str, value: int) -> None:
    """Read until `node` answers from its cache; every answer must be `value`."""
    before = node.hits()
    deadline = time.monotonic() + 30
    while node.hits() == before:
        assert await reader.fetchval(sql) == value
        assert time.monotonic() < deadline, "the node never answered from its cache"


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neonpoly.cli", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_a_writer_cut_off_from_redis_is_never_read_stale_through_a_node_that_still_reaches_it(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table, sql = await _table(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    async with (
        plane_node(pg_logical, tmp_path / "a", link.url, plane={**FAST, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url, plane={**FAST, "node": "node-b"}) as b,
    ):
        await until(lambda: _serving(a) and _serving(b) and len(_origin(b)[0].nodes) == 2, "both nodes up")
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            await _until_hit(reader, b, sql, 0)  # B holds the row in its cache
            await link.cut()
            await until(lambda: _origin(a)[0].state == "down", "A sees Redis gone")
            assert _origin(b)[0].state == "up"
            started = time.monotonic()
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
            held = time.monotonic() - started
            # The write returned: B must not answer the row it cached before it.
            assert await reader.fetchval(sql) == 1
            await until(lambda: _origin(b)[1].lost == ("node-a",), "B sees A lost")
            plane_b = _origin(b)[0]
            assert "paused: node node-a lost without a goodbye (passing through)" in plane_b.summary(b.origin_key)
            hits = b.hits()
            for value in range(2, 12):  # A's later writes go at once: B knows it lost
                await writer.execute(f"UPDATE {table} SET v = $1 WHERE id = 1", value)
                assert await reader.fetchval(sql) == value
                assert await reader.fetchval(sql) == value
            assert b.hits() == hits, "B answered from its cache while a lost node may write unpublished"
            await link.start()  # A comes back: it publishes a purge and leaves `lost`
            await until(lambda: _serving(a) and _serving(b), "A rejoined and B serves hits again")
            await writer.execute(f"UPDATE {table} SET v = 100 WHERE id = 1")
            await _until_hit(reader, b, sql, 100)
            assert _origin(a)[0].gaps >= 1
            print(f"\n[fence] the first write after the cut was held {held:.2f} s", file=sys.stderr)
        finally:
            await writer.close()
            await reader.close()
            await link.cut()


async def test_a_node_that_never_joined_holds_its_writes_until_it_does(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table, sql = await _table(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    await link.cut()  # A starts cut off: the other nodes have never heard of it
    async with (
        plane_node(pg_logical, tmp_path / "b", redis_server.url, plane={**FAST, "node": "node-b"}) as b,
        plane_node(pg_logical, tmp_path / "a", link.url, plane={**FAST, "node": "node-a"}) as a,
    ):
        await until(lambda: _serving(b), "B up")
        reader = await asyncpg.connect(**b.dsn())
        writer = await asyncpg.connect(**a.dsn())
        try:
            await _until_hit(reader, b, sql, 0)
            write = asyncio.ensure_future(writer.execute(f"UPDATE {table} SET v = 7 WHERE id = 1"))
            await until(lambda: _origin(a)[0].fenced == 1, "A holds the write's reply")
            assert not write.done()
            await link.start()
            await write  # released once A joined and B acknowledged its purge
            assert await reader.fetchval(sql) == 7
            await _until_hit(reader, b, sql, 7)
        finally:
            await writer.close()
            await reader.close()
            await link.cut()


async def test_a_node_gone_without_its_goodbye_pauses_hits_until_it_returns_or_is_forgotten(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    _, sql = await _table(pg_logical)
    redis = Redis.from_url(redis_server.url, protocol=2, decode_responses=True)

    async def crashed(name: str, origin: str) -> None:
        """What a node that registered and then died leaves in Redis: a heartbeat expiring."""
        seconds, micros = await redis.time()
        await redis.zadd(f"neonpoly:o:{origin}:nodes", {name: int(seconds) * 1000 + int(micros) // 1000 + 100})

    async with plane_node(pg_logical, tmp_path / "b", redis_server.url, plane={**FAST, "node": "node-b"}) as b:
        reader = await asyncpg.connect(**b.dsn())
        try:
            await until(lambda: _serving(b), "B up")
            await _until_hit(reader, b, sql, 0)
            await crashed("ghost", b.origin_key)
            await until(lambda: _origin(b)[1].lost == ("ghost",), "B sees the ghost lost")
            hits = b.hits()
            for _ in range(3):
                assert await reader.fetchval(sql) == 0
            assert b.hits() == hits
            # Neither changes anything: run side by side (each CLI process starts in about a second).
            (code, out), (nobody_code, nobody_out) = await asyncio.gather(
                _cli("plane", "--redis", redis_server.url),
                _cli("plane", "forget", "nobody", "--redis", redis_server.url),
            )
            assert code == 0 and "ghost" in out and "paused" in out, out
            assert nobody_code == 2, nobody_out
            assert nobody_out.startswith("neonpoly: plane forget: no origin knows a node 'nobody'"), nobody_out
            code, out = await _cli("plane", "forget", "ghost", "--redis", redis_server.url)
            assert code == 0 and out.startswith("forgot ghost; purged everywhere: "), out
            await until(lambda: _serving(b), "B serves hits again")
            await _until_hit(reader, b, sql, 0)
            # Lost again, and this time it comes back under its name: its first round purges
            # the origin everywhere and leaves `lost`.
            await crashed("ghost", b.origin_key)
            await until(lambda: _origin(b)[1].lost == ("ghost",), "B sees the ghost lost again")
            async with plane_node(pg_logical, tmp_path / "g", redis_server.url, plane={**FAST, "node": "ghost"}):
                await until(lambda: _serving(b), "B serves hits once the ghost is back")
                await _until_hit(reader, b, sql, 0)
        finally:
            await reader.close()
            await redis.aclose()


async def test_removing_an_integration_says_goodbye_so_nobody_takes_the_node_for_lost(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table, _ = await _table(pg_logical)
    redis = Redis.from_url(redis_server.url, protocol=2, decode_responses=True)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url, plane={**FAST, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url, plane={**FAST, "node": "node-b"}) as b,
    ):
        try:
            await until(lambda: _serving(a) and _serving(b) and len(_origin(b)[0].nodes) == 2, "both nodes up")
            origin = a.origin_key
            nodes = f"neonpoly:o:{origin}:nodes"
            assert await redis.zscore(nodes, "node-a") is not None
            writer = await asyncpg.connect(**a.dsn())
            await writer.execute(f"UPDATE {table} SET v = 5 WHERE id = 1")  # something to publish
            await writer.close()
            a.service.remove_cache("default")
            deadline = time.monotonic() + 30
            while await redis.zscore(nodes, "node-a") is not None:
                assert time.monotonic() < deadline, "node A never left the origin's nodes"
                await asyncio.sleep(0.01)
            # Gone from the nodes with its goodbye: no round can move it to `lost`.
            assert await redis.zscore(f"neonpoly:o:{origin}:lost", "node-a") is None
            assert _serving(b)
        finally:
            await redis.aclose()

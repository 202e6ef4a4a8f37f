"""The shared invalidation plane on Redis: two `serve` nodes in front of one origin, a real
redis-server started (and killed) by the test. A write through node A is never followed by a
stale read through node B once it returned; Redis going away makes both pass through, and its
return is a gap; one node runs the change feed, the other takes over when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import psycopg
from redis.asyncio import Redis

from neonpoly.admin.metrics import MetricsServer
from neonpoly.freshness.changefeed import FeedSettings
from tests.freshness.conftest import FAST, FeedProxy, plane_node, until
from tests.freshness.redisharness import RedisServer
from tests.pgharness import PgServer


def _table(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _hits(node: FeedProxy) -> int:
    return node.hits()


async def _plane_up(*nodes: FeedProxy) -> None:
    """Every node joined, sees the others, and is caught up (its gate is open)."""

    def ready() -> bool:
        for node in nodes:
            status = node.service.report().plane
            if status is None or status.state != "up" or len(status.nodes) < len(nodes):
                return False
            if not all(o.caught_up for o in status.origins):
                return False
        return True

    await until(ready, "the plane up on every node")


class _Race:
    """A writer through one node and a reader through another, run concurrently: the reader
    knows which writes had returned before each read was sent, and counts reads older than
    that (stale) and reads the reader's node answered from its cache (hits)."""

    def __init__(self, writer: asyncpg.Connection, reader: asyncpg.Connection, reader_node: FeedProxy, table: str):
        self.writer, self.reader, self.reader_node, self.table = writer, reader, reader_node, table
        self.returned = 0  # the last write whose reply reached the writer
        self.stale: list[tuple[int, int]] = []
        self.read_count = 0
        self.done = False
        self.latencies: list[float] = []
        self.read_since_write = asyncio.Event()

    async def write(self, i: int) -> None:
        started = time.perf_counter()
        if i % 3 == 0:  # in a transaction: the COMMIT's reply is the one held
            async with self.writer.transaction():
                await self.writer.execute(f"UPDATE {self.table} SET v = $1 WHERE id = 1", i)
        else:
            await self.writer.execute(f"UPDATE {self.table} SET v = $1 WHERE id = 1", i)
        self.latencies.append(time.perf_counter() - started)
        self.returned = i

    async def writes(self, count: int, before: Callable[[int], Awaitable[None]] | None = None) -> None:
        try:
            for i in range(1, count + 1):
                if before is not None:
                    await before(i)
                await self.write(i)
                # Let the reader read a few times after each write (so repeats are hits),
                # without waiting for it by the clock.
                for _ in range(3):
                    self.read_since_write.clear()
                    await self.read_since_write.wait()
        finally:
            self.done = True

    async def reads(self) -> None:
        sql = f"SELECT v FROM {self.table} WHERE id = 1"
        while not self.done:
            floor = self.returned  # writes that returned before this read is sent
            value = await self.reader.fetchval(sql)
            self.read_count += 1
            if value < floor:
                self.stale.append((floor, value))
            self.read_since_write.set()


async def _race(writer_node: FeedProxy, reader_node: FeedProxy, table: str, writes: int) -> _Race:
    writer = await asyncpg.connect(**writer_node.dsn())
    reader = await asyncpg.connect(**reader_node.dsn())
    try:
        race = _Race(writer, reader, reader_node, table)
        await asyncio.gather(race.writes(writes), race.reads())
        return race
    finally:
        await writer.close()
        await reader.close()


async def _make_table(pg: PgServer, table: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg.url("postgres", "app"), autocommit=True) as direct:
        await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")


def _percentiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


async def test_a_write_through_one_node_is_never_read_stale_through_another(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table = _table("plane")
    await _make_table(pg_logical, table)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url) as b,
    ):
        await _plane_up(a, b)
        hits_before = _hits(b)
        race = await _race(a, b, table, writes=300)
        assert race.stale == [], f"{len(race.stale)} stale reads through B, e.g. {race.stale[:5]}"
        assert _hits(b) > hits_before, "node B never answered from its cache: the race proved nothing"
        plane_b = b.service.report().plane
        assert plane_b is not None and plane_b.applied > 0
        plane_a = a.service.report().plane
        assert plane_a is not None and plane_a.published > 0
        p50, p99 = _percentiles(race.latencies)
        print(f"\n[plane] 300 writes through A with B reading: write p50 {p50:.2f} ms p99 {p99:.2f} ms; "
              f"hold p50/p99 {plane_a.hold_ms} ms, {plane_a.hold_timeouts} of {plane_a.holds} timed out; "
              f"B hits {_hits(b) - hits_before} of {race.read_count} reads", file=sys.stderr)


async def test_redis_killed_mid_run_both_nodes_pass_through_and_nothing_is_stale_after_it_returns(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table = _table("plane_down")
    await _make_table(pg_logical, table)
    # FAST: the writes held while Redis is down, and the wait after it returns empty (rule 5),
    # each last the fence: 2.7 s instead of 4.75 s.
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url, plane=FAST) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url, plane=FAST) as b,
    ):
        await _plane_up(a, b)
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        seen: dict[str, int] = {}

        async def phases(i: int) -> None:
            if i == 61:  # 60 writes with Redis up, then it dies
                seen["hits_up"] = _hits(b)
                redis_server.kill()
                await until(lambda: all(n.service.report().plane.state == "down" for n in (a, b)),  # type: ignore[union-attr]
                            "both nodes see Redis down")
            elif i == 161:  # 100 writes with Redis down, then it comes back empty on the same port
                report = b.service.report()
                assert report.plane is not None and report.plane.state == "down" and report.plane.reason
                assert "passing through" in report.caches[0].plane
                seen["refused"] = report.plane.origins[0].refused_hits
                row = await _show_caches(b)
                assert row["plane"].startswith("down: ") and row["plane"].endswith("(passing through)"), row["plane"]
                assert "neonpoly_plane_up 0.0" in MetricsServer(b.service).render().decode()
                redis_server.start()
                await _plane_up(a, b)
                seen["hits_back"] = _hits(b)

        try:
            race = _Race(writer, reader, b, table)
            await asyncio.gather(race.writes(300, phases), race.reads())
        finally:
            await writer.close()
            await reader.close()
        assert seen["hits_up"] > 0
        assert seen["refused"] > 0, "B was never asked for a hit while Redis was down"
        hits_back = seen["hits_back"]
        assert race.stale == [], f"{len(race.stale)} stale reads through B, e.g. {race.stale[:5]}"
        assert _hits(b) > hits_back, "B served no hit after Redis came back: the end of the race proved nothing"
        for node in (a, b):
            plane = node.service.report().plane
            assert plane is not None
            assert plane.downs >= 1 and plane.gaps >= 1, plane
            row = await _show_caches(node)
            assert row["plane"].startswith("up, 2 nodes") and row["plane_gaps"] >= 1 and row["plane_nodes"] == 2
        print(f"\n[plane] Redis killed after write 60, back after write 160; B refused {seen['refused']} hits "
              f"while down, served {_hits(b) - hits_back} after", file=sys.stderr)


async def test_one_node_runs_the_change_feed_and_the_other_takes_over_when_it_stops(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table = _table("plane_feed")
    await _make_table(pg_logical, table)
    sql = f"SELECT v FROM {table} WHERE id = 1"
    feed = FeedSettings(mode="on")
    stacks = {"a": contextlib.AsyncExitStack(), "b": contextlib.AsyncExitStack()}
    try:
        nodes = {
            name: await stack.enter_async_context(plane_node(pg_logical, tmp_path / name, redis_server.url, feed))
            for name, stack in stacks.items()
        }
        await _plane_up(*nodes.values())

        def running() -> list[str]:
            return [name for name, n in nodes.items()
                    if (f := n.service.feeds.feed(n.origin_key, "app")) is not None and f.state == "live"]

        await until(lambda: len(running()) == 1, "one node's feed live")
        [holder] = running()
        other = "b" if holder == "a" else "a"
        assert nodes[other].service.report().caches[0].change_feed.startswith("standby")
        plane = nodes[holder].service.report().plane
        assert plane is not None and plane.origins[0].feed_lease == "me"
        clients = {name: await asyncpg.connect(**n.dsn()) for name, n in nodes.items()}
        direct = await psycopg.AsyncConnection.connect(pg_logical.url("postgres", "app"), autocommit=True)
        try:
            for value in (1, 2):
                for client in clients.values():
                    await client.fetchval(sql)  # stored (admit_after=1), then served
                    await client.fetchval(sql)
                await direct.execute(f"UPDATE {table} SET v = %s WHERE id = 1", (value,))
                for name, client in clients.items():
                    await _eventually(client, sql, value, f"the direct write {value} through {name}")
            hits = {name: n.hits() for name, n in nodes.items()}
            assert all(h > 0 for h in hits.values()), hits
            assert len(running()) == 1
            # The holder stops: the other takes the lease, and its feed catches direct writes.
            await clients.pop(holder).close()
            await stacks[holder].aclose()
            del nodes[holder]
            await until(lambda: running() == [other], f"node {other}'s feed live after the takeover", timeout=60)
            client = clients[other]
            await client.fetchval(sql)
            await client.fetchval(sql)
            await direct.execute(f"UPDATE {table} SET v = 3 WHERE id = 1")
            await _eventually(client, sql, 3, "a direct write after the takeover")
            plane = nodes[other].service.report().plane
            assert plane is not None and plane.origins[0].feed_lease == "me"
        finally:
            for client in clients.values():
                await client.close()
            await direct.close()
    finally:
        for stack in stacks.values():
            await stack.aclose()


async def _show_caches(node: FeedProxy) -> asyncpg.Record:
    admin = await asyncpg.connect(**node.dsn("neonpoly"))
    try:
        [row] = await admin.fetch("SHOW CACHES")
        return row
    finally:
        await admin.close()


async def _eventually(client: asyncpg.Connection, sql: str, value: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while (got := await client.fetchval(sql)) != value:
        assert got < value, f"{what}: read {got}, newer than written"
        assert time.monotonic() < deadline, f"{what}: still {got}"
        await asyncio.sleep(0.01)


async def test_a_redis_that_lost_its_data_under_live_connections_is_a_gap(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table = _table("plane_flush")
    await _make_table(pg_logical, table)
    sql = f"SELECT v FROM {table} WHERE id = 1"
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url) as b,
    ):
        await _plane_up(a, b)
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        redis = Redis.from_url(redis_server.url, protocol=2)
        try:
            for value in range(1, 6):
                await writer.execute(f"UPDATE {table} SET v = $1 WHERE id = 1", value)
                before = _hits(b)
                while _hits(b) == before:  # until B answers it from its cache
                    assert await reader.fetchval(sql) == value
            gaps = [n.service.report().plane.gaps for n in (a, b)]  # type: ignore[union-attr]
            await redis.flushall()
            await until(lambda: all(n.service.report().plane.gaps > g for n, g in zip((a, b), gaps, strict=True)),  # type: ignore[union-attr]
                        "both nodes saw the flush as a gap")
            await _plane_up(a, b)
            for value in range(6, 11):
                await writer.execute(f"UPDATE {table} SET v = $1 WHERE id = 1", value)
                assert await reader.fetchval(sql) == value
                assert await reader.fetchval(sql) == value
        finally:
            await redis.aclose()
            await writer.close()
            await reader.close()

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
from pathlib import Path

import asyncpg
import psycopg

from neonpoly.freshness.changefeed import FeedSettings
from tests.freshness.conftest import FeedProxy, plane_node, until
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

    async def writes(self, count: int) -> None:
        try:
            for i in range(1, count + 1):
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
        p50, p99 = _percentiles(race.latencies)
        print(f"\n[plane] 300 writes through A with B reading: write p50 {p50:.2f} ms p99 {p99:.2f} ms; "
              f"B hits {_hits(b) - hits_before} of {race.read_count} reads; "
              f"plane of A {a.service.report().plane}",  # type: ignore[union-attr]
              file=sys.stderr)


async def test_redis_killed_mid_run_both_nodes_pass_through_and_nothing_is_stale_after_it_returns(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    table = _table("plane_down")
    await _make_table(pg_logical, table)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url) as b,
    ):
        await _plane_up(a, b)
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            race = _Race(writer, reader, b, table)
            reads = asyncio.ensure_future(race.reads())
            writes = asyncio.ensure_future(race.writes(300))
            await until(lambda: race.returned >= 60, "60 writes with Redis up")
            hits_up = _hits(b)
            assert hits_up > 0
            redis_server.kill()
            await until(lambda: all(n.service.report().plane.state == "down" for n in (a, b)),  # type: ignore[union-attr]
                        "both nodes see Redis down")
            down_from = race.returned
            await until(lambda: race.returned >= down_from + 60, "60 writes with Redis down")
            report = b.service.report()
            assert report.plane is not None and report.plane.state == "down" and report.plane.reason
            assert "passing through" in report.caches[0].plane
            refused = report.plane.origins[0].refused_hits
            assert refused > 0, "B was never asked for a hit while Redis was down"
            redis_server.start()  # the same port, empty: a restart that lost everything
            await _plane_up(a, b)
            back_at = race.returned
            hits_back = _hits(b)
            await writes
            race.done = True
            await reads
            assert race.returned > back_at
        finally:
            await writer.close()
            await reader.close()
        assert race.stale == [], f"{len(race.stale)} stale reads through B, e.g. {race.stale[:5]}"
        assert _hits(b) > hits_back, "B served no hit after Redis came back: the end of the race proved nothing"
        for node in (a, b):
            plane = node.service.report().plane
            assert plane is not None
            assert plane.downs >= 1 and plane.gaps >= 1, plane
        print(f"\n[plane] Redis killed after write {down_from}, back after write {back_at}; "
              f"B refused {refused} hits while down", file=sys.stderr)


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


async def _eventually(client: asyncpg.Connection, sql: str, value: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while (got := await client.fetchval(sql)) != value:
        assert got < value, f"{what}: read {got}, newer than written"
        assert time.monotonic() < deadline, f"{what}: still {got}"
        await asyncio.sleep(0.01)

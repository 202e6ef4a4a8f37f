"""What the invalidation plane costs, measured (not a test: `python -m tests.freshness.bench_plane`).

1. Write latency through node A with a second node B on the plane, against the same writes
   through a node without the plane: the hold (A waits for B to apply the bump) is the difference.
2. The hit path's added check: `QueryCache.lookup` of a stored entry with no gate, and with the
   plane's gate (open).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import asyncpg
import psycopg

from neonpoly.cache.capture import Capture
from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.store import MemoryStore
from neonpoly.freshness.changefeed import FeedSettings
from neonpoly.freshness.plane import Gate
from neonpoly.stats import StatsRecorder
from tests.freshness.conftest import FeedProxy, feed_proxy, plane_node
from tests.freshness.redisharness import RedisServer, redis_server_binary
from tests.pgharness import PgServer, start_pg_server

WRITES = 500


def _p(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100)
    return f"p50 {cuts[49] * 1000:.2f} ms, p99 {cuts[98] * 1000:.2f} ms"


async def _writes(node: FeedProxy, table: str) -> list[float]:
    conn = await asyncpg.connect(**node.dsn())
    try:
        for _ in range(20):  # warm up: statement cache, catalog lookups
            await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
        took = []
        for _ in range(WRITES):
            started = time.perf_counter()
            await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = 1")
            took.append(time.perf_counter() - started)
        return took
    finally:
        await conn.close()


async def write_latency(pg: PgServer, redis: RedisServer, root: Path) -> None:
    with psycopg.connect(pg.url("postgres", "app"), autocommit=True) as direct:
        direct.execute("CREATE TABLE bench_w (id int PRIMARY KEY, v int)")
        direct.execute("INSERT INTO bench_w VALUES (1, 0)")
    (root / "solo").mkdir()
    async with feed_proxy(pg, root / "solo", FeedSettings(mode="off")) as solo:
        alone = await _writes(solo, "bench_w")
    async with plane_node(pg, root / "a", redis.url) as a, plane_node(pg, root / "b", redis.url) as b:
        while not all((p := n.service.report().plane) is not None and len(p.nodes) == 2 for n in (a, b)):
            await asyncio.sleep(0.01)
        held = await _writes(a, "bench_w")
        plane = a.service.report().plane
    assert plane is not None
    print(f"writes through one node, no plane:        {_p(alone)}")
    print(f"writes through A, B on the plane (held):  {_p(held)}")
    print(f"  the hold itself (first bump to release): p50/p99 {plane.hold_ms} ms; "
          f"{plane.hold_timeouts} of {plane.holds} batches timed out")


def hit_path() -> None:
    cache = QueryCache("bench", MemoryStore(1 << 24), StatsRecorder(), admit_after=1)
    key = cache.key(b"ctx", b"Qselect 1")
    capture = Capture(key, "app", frozenset({"t"}), "tpl", cache.stamp("app", ["t"]))
    capture.frames.append(b"D" * 64)
    cache.store_capture(capture)
    assert cache.lookup(key) is not None
    n = 300_000
    off = min(timeit.repeat(lambda: cache.lookup(key), number=n, repeat=5)) / n
    gate = Gate(limit=3600.0)
    gate.prove(time.monotonic())
    cache.serve_gate = gate
    on = min(timeit.repeat(lambda: cache.lookup(key), number=n, repeat=5)) / n
    alone = min(timeit.repeat(gate, number=n, repeat=5)) / n
    print(f"QueryCache.lookup hit, plane off: {off * 1e9:.0f} ns; plane on (gate open): {on * 1e9:.0f} ns "
          f"(+{(on - off) * 1e9:.0f} ns); the gate alone: {alone * 1e9:.0f} ns")


async def main() -> None:
    hit_path()
    binary = redis_server_binary()
    if binary is None:
        sys.exit("redis-server is not installed")
    pg = start_pg_server(small=True)
    redis = RedisServer(binary)
    redis.start()
    root = Path(tempfile.mkdtemp(prefix="neonpoly-bench-"))
    try:
        await write_latency(pg, redis, root)
    finally:
        redis.destroy()
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

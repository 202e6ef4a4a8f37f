"""`neonpoly serve --workers 2` as a user runs it: real subprocesses, a real redis-server,
the test origin. Connections spread over both workers, the admin console and /metrics add
every worker's figures, cancels reach the worker holding the session, PURGE reaches all,
and the parent stops every child (SIGTERM), takes them down when it dies (SIGKILL) and exits
non-zero, stopping the rest, when a worker dies."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import psycopg
import pytest

from neonpoly.integrations.pgbin import free_port, process_alive
from tests.pgharness import PgServer
from tests.proxy.workers import WorkersProxy, workers_proxy

pytestmark = pytest.mark.timeout(300)


def _children(proxy: WorkersProxy) -> list[int]:
    """The workers and the private redis-server, by the PIDs the parent logged."""
    found = re.search(r"private redis-server \(pid (\d+)\)", proxy.log.read_text())
    assert found is not None, proxy.log.read_text()
    return [*proxy.pids, int(found.group(1))]


def _gone(pids: list[int], timeout: float = 60) -> list[int]:
    """The PIDs still alive after waiting up to `timeout` for all of them to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if process_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if process_alive(p)]


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


async def _table(pg: PgServer) -> str:
    """A table of its own for the test, with one row (made directly on the origin)."""
    name = f"workers_{uuid.uuid4().hex[:8]}"
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        await conn.execute(f"INSERT INTO {name} VALUES (1, 'one')")
    return name


async def test_connections_spread_and_the_admin_console_adds_every_worker(pg: PgServer, tmp_path: Path) -> None:
    table = await _table(pg)
    port = free_port()
    with workers_proxy(pg, tmp_path / "cache", "--metrics-listen", f"127.0.0.1:{port}") as proxy:
        conns = [await asyncpg.connect(**proxy.dsn()) for _ in range(20)]
        try:
            for conn in conns:
                for _ in range(3):  # stored on the 2nd run, served from the 3rd: each worker hits
                    assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = 1") == "one"
            workers = proxy.workers()
            assert [w[0] for w in workers] == [0, 1], workers
            assert all(w[2] == "up" for w in workers), workers
            assert sorted(w[1] for w in workers) == sorted(proxy.pids), workers
            # 20 connections held open at once: both workers got some (all on one: 2^-19).
            assert all(w[3] >= 1 for w in workers), workers
            assert all(w[4] >= 1 for w in workers), workers  # and each served hits of its own
            assert all(w[7] > 0 and w[8] > 0 for w in workers), workers  # each one's own CPU time and memory
            stats = proxy.admin("SHOW STATS")
            every = next(r for r in stats if r[0] == "(all)")
            assert every[2] == sum(w[4] for w in workers)  # hits: the console adds both workers
            assert every[3] == sum(w[5] for w in workers)
            assert every[1] == 60  # calls
            assert every[10] >= 20  # connections (the admin session's own may count)
            queries = proxy.admin("SHOW QUERIES")
            assert [q[4] for q in queries if table in q[2]] == [60]
            caches = proxy.admin("SHOW CACHES")
            assert caches[0][5] >= 2  # entries in each worker's own cache, added up
            # /metrics (served by worker 0) adds both workers' counters too.
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            )
            hit_series = r'neonpoly_queries_total\{cache="default",cache_name="default",status="hit"\} (\S+)'
            found = re.search(hit_series, body)
            assert found is not None, body
            assert float(found.group(1)) == every[2]
            connections = proxy.admin("SHOW CONNECTIONS")
            assert len([c for c in connections if c[0] != "admin"]) == 20
            purged = proxy.admin("PURGE ALL")
            assert purged[0][0] == caches[0][5]  # each worker removed its own entry
            assert proxy.admin("SHOW CACHES")[0][5] == 0
        finally:
            for conn in conns:
                await conn.close()


async def test_a_cancel_reaches_the_worker_holding_the_session(pg: PgServer, tmp_path: Path) -> None:
    """A CancelRequest arrives on its own connection, which the kernel may give to the other
    worker: that one must hand it over. Eight tries: each lands on either worker."""
    sleep = f"SELECT pg_sleep(30) -- {uuid.uuid4().hex[:8]}"
    with workers_proxy(pg, tmp_path / "cache") as proxy:
        for _ in range(8):
            async with await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True) as conn:

                async def cancel_soon(conn: psycopg.AsyncConnection[object] = conn) -> None:
                    # Once the origin runs the query (not after a fixed sleep): then cancel it.
                    async with pg.superuser_conn() as watch:
                        deadline = time.monotonic() + 30
                        while not await watch.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1", sleep
                        ):
                            assert time.monotonic() < deadline, "the origin never ran the query"
                            await asyncio.sleep(0.01)
                    await conn.cancel_safe()

                task = asyncio.create_task(cancel_soon())
                with pytest.raises(psycopg.errors.QueryCanceled):
                    await conn.execute(sleep)
                await task


def test_sigterm_stops_every_child(pg: PgServer, tmp_path: Path) -> None:
    with workers_proxy(pg, tmp_path / "cache") as proxy:
        children = _children(proxy)
        proxy.proc.send_signal(signal.SIGTERM)
        assert _wait_exit(proxy.proc) == 0
        assert _gone(children) == []


def test_killing_the_parent_stops_every_child(pg: PgServer, tmp_path: Path) -> None:
    with workers_proxy(pg, tmp_path / "cache") as proxy:
        children = _children(proxy)
        proxy.proc.kill()  # SIGKILL: the parent forwards nothing; Linux tells the children
        proxy.proc.wait(30)
        assert _gone(children) == []


def test_a_dead_worker_stops_the_set_loudly(pg: PgServer, tmp_path: Path) -> None:
    with workers_proxy(pg, tmp_path / "cache") as proxy:
        children = _children(proxy)
        os.kill(proxy.pids[1], signal.SIGKILL)
        assert _wait_exit(proxy.proc) == 1
        assert _gone(children) == []
        assert re.search(r"ERROR neonpoly.workers worker 1 \(pid \d+\) exited unexpectedly", proxy.log.read_text())


def test_without_redis_server_workers_fail_in_one_line(pg: PgServer, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = subprocess.run(
        [
            sys.executable, "-m", "neonpoly.cli", "serve", "--workers", "2", "--listen", "127.0.0.1:0",
            "--upstream", pg.url(), "--state-dir", str(tmp_path / "state"),
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "PATH": str(empty)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("neonpoly:")]
    assert len(lines) == 1 and "redis-server" in lines[0], done.stderr

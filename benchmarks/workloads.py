"""What a run measures and how: the pgbench workloads (the scripts beside this file, the
protocol mode, whether the caches are warmed first), running pgbench and reading its output,
the origin's pg_stat_statements as the witness of what it really executed, and the latency of
a ~5 ms aggregate (calibrated on this machine) over sequential asyncpg calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.results import PgbenchResult

HERE = Path(__file__).resolve().parent
HOT_SCRIPT = HERE / "hot_select.sql"
UPDATE_SCRIPT = HERE / "mix_update.sql"
HOT_QUERY_PREFIX = "SELECT abalance FROM pgbench_accounts WHERE aid ="
# sum(bid), not max(bid): pgpool-II refuses to cache any query that calls max() or min()
AGG_PREFIX = "SELECT count(*), sum(abalance), sum(bid) FROM pgbench_accounts"
AGG_SQL = AGG_PREFIX + " WHERE aid BETWEEN 1 AND $1"


@dataclass(frozen=True)
class Workload:
    label: str
    mode: str  # pgbench -M
    script: tuple[str, ...]
    warm: bool = False  # fill the caches with the hot set before measuring


WORKLOADS = {
    "hot-simple": Workload("hot set aid 1..1000, simple", "simple", ("-f", str(HOT_SCRIPT)), warm=True),
    "hot-prepared": Workload("hot set, prepared", "prepared", ("-f", str(HOT_SCRIPT)), warm=True),
    "S-simple": Workload("-S over all rows (nearly all misses)", "simple", ("-S",)),
    "S-prepared": Workload("-S over all rows, prepared", "prepared", ("-S",)),
    "mix": Workload(
        "90% hot reads + 10% UPDATEs of the same keys",
        "simple",
        ("-f", f"{HOT_SCRIPT}@9", "-f", f"{UPDATE_SCRIPT}@1"),
    ),
}
DEFAULT_WORKLOADS = ("hot-simple", "hot-prepared", "S-simple", "mix")
LATENCY_METHODS = {"fetchrow": "asyncpg fetchrow", "fetch": "asyncpg fetch"}


# --------------------------------------------------------------------------- pgbench
def run_pgbench(
    port: int, password: str, args: list[str], *, timeout: float, problems: list[str], label: str,
    dbname: str = "postgres",
) -> PgbenchResult:  # fmt: skip
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable", PGAPPNAME="neonpoly-bench")
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", *args, dbname]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        problems.append(f"pgbench {label}: hung, killed after {timeout:.0f}s; stderr: {err.strip()[-500:]}")
        return PgbenchResult(0.0, 0.0, 0, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tps = _search_float(r"tps = ([\d.]+) \(without initial connection time\)", out)
    lat = _search_float(r"latency average = ([\d.]+) ms", out)
    done = int(_search_float(r"number of transactions actually processed: (\d+)", out) or 0)
    failed = int(_search_float(r"number of failed transactions: (\d+)", out) or 0)
    per_script = [int(m.group(1)) for m in re.finditer(r"\n - (\d+) transactions \(", out)]
    if proc.returncode != 0 or tps is None:
        problems.append(f"pgbench {label}: exit {proc.returncode}; stderr: {err.strip()[-800:]}")
    elif err.strip():
        # pgbench prints per-client errors (e.g. "client 3 aborted in command 1") on stderr
        problems.append(f"pgbench {label}: stderr: {err.strip()[-800:]}")
    return PgbenchResult(tps or 0.0, lat or 0.0, done, failed, reads=per_script[0] if per_script else done)


def _search_float(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


# --------------------------------------------------------------------------- origin witness
class Origin:
    """A direct asyncpg connection to the origin, for pg_stat_statements and calibration."""

    def __init__(self, port: int, password: str) -> None:
        self.port = port
        self.password = password
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user="postgres",
                password=password,
                database="postgres",
                ssl=False,
            )
        )

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def stats(self, like: str) -> tuple[int, int]:
        """(calls, rows) of the statements like this. A portal that was bound but never executed
        (pgpool-II's prepared cache hits) counts as a call with 0 rows."""
        row = self.run(
            self.conn.fetchrow(
                "SELECT coalesce(sum(calls), 0), coalesce(sum(rows), 0) FROM pg_stat_statements WHERE query LIKE $1",
                like,
            )
        )
        return int(row[0]), int(row[1])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.conn.close())
        self.loop.close()


# --------------------------------------------------------------------------- latency
async def timed_calls(
    port: int, password: str, dbname: str, method: str, arg: int, calls: int, warm: int
) -> list[float]:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=password,
        database=dbname,
        ssl=False,
        statement_cache_size=100,
    )
    call = conn.fetchrow if method == "fetchrow" else conn.fetch
    try:
        for _ in range(warm):
            await call(AGG_SQL, arg)
        await asyncio.sleep(0.2)  # let a write-behind store land
        samples: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call(AGG_SQL, arg)
            samples.append((time.perf_counter() - t0) * 1000)
        return samples
    finally:
        await conn.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def calibrate(origin: Origin, target_ms: float = 5.0) -> tuple[int, float]:
    """Pick N so that AGG_SQL(N) costs the origin about target_ms; return (N, measured p50)."""

    async def p50(n: int) -> float:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            await origin.conn.fetchrow(AGG_SQL, n)
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times[2:])

    n = 20_000
    for _ in range(4):
        ms = origin.run(p50(n))
        if abs(ms - target_ms) / target_ms < 0.1:
            break
        n = max(1000, min(1_000_000, int(n * target_ms / max(ms, 0.05))))
    return n, origin.run(p50(n))

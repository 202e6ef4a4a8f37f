#!/usr/bin/env python3
"""neonpoly benchmark: direct PostgreSQL vs PgBouncer vs pgpool-II vs neonpoly, side by side.

Run as a user would, from the repository root:

    .venv/bin/python benchmarks/run.py            # ~5 minutes on 2 cores (2 rounds x 6 s)
    .venv/bin/python benchmarks/run.py --quick    # ~1.5 minutes (1 round x 3 s)

In one run it starts a throwaway PostgreSQL (fsync off, pgbench scale 10, pg_stat_statements
as the witness of what the origin really executed) and, bound to 127.0.0.1 on free ports with
their configuration in the run's temporary directory:

* PgBouncer (Debian package `pgbouncer`), transaction pooling; session pooling for the
  prepared workload, which PgBouncer 1.18's transaction mode rejects;
* pgpool-II (Debian package `pgpool2`) in raw mode with its in-memory query cache
  (`memory_cache_enabled = on`, `memqcache_method = 'shmem'`);
* neonpoly --no-cache (the relay alone) and neonpoly with its cache (`--ttl 600`).

A peer that is not installed gets "not installed" in its column; the run goes on without it.
Every client authenticates with SCRAM-SHA-256 as the origin's superuser, against each target
(PgBouncer and pgpool-II hold the password and authenticate to the origin themselves).

Workloads (pgbench, 8 clients / 2 threads by default), each run on every target in turn, the
order reversed on every other round so that drift hits all targets alike:

* hot set, simple protocol: aid drawn from 1..1000 (`hot_select.sql`); caches warmed first;
* hot set, prepared (`-M prepared`): what asyncpg, psycopg and ORMs send;
* `-S` over all rows (1M at scale 10): nearly every query is new, the miss path;
* 90% hot-set reads + 10% UPDATEs of the same keys (`hot_select.sql@9 mix_update.sql@1`);
* p50/p99 latency of an aggregate that costs the origin about 5 ms (calibrated on this
  machine), sequential asyncpg calls, both as `fetchrow` (a row-limited Execute, what
  `fetchrow`/`fetchval` send) and as `fetch`.

Prints a markdown table of ratios to direct, the proxies' CPU and memory, and what the origin
really executed; writes everything as JSON to benchmarks/last-run.json (or --json PATH).
Every process it starts is stopped by its PID on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from neonpoly.integrations.embedded import LocalPostgres, free_port  # noqa: E402
from neonpoly.integrations.pgbin import RunAs, run_as  # noqa: E402

HOT_SCRIPT = HERE / "hot_select.sql"
UPDATE_SCRIPT = HERE / "mix_update.sql"
HOT_QUERY_PREFIX = "SELECT abalance FROM pgbench_accounts WHERE aid ="
# sum(bid), not max(bid): pgpool-II refuses to cache any query that calls max() or min()
AGG_PREFIX = "SELECT count(*), sum(abalance), sum(bid) FROM pgbench_accounts"
AGG_SQL = AGG_PREFIX + " WHERE aid BETWEEN 1 AND $1"
TARGETS = ("direct", "pgbouncer", "pgpool", "no-cache", "cache")
COLUMNS = {
    "pgbouncer": "PgBouncer tx",
    "pgpool": "pgpool-II cache",
    "no-cache": "neonpoly --no-cache",
    "cache": "neonpoly cache",
}
CACHING = ("pgpool", "cache")
SESSION_DB = "postgres_session"  # PgBouncer's alias of the origin's database in session pooling
PG_SETTINGS: dict[str, str | int | bool] = {
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "autovacuum": False,
    "jit": False,
    "max_parallel_workers_per_gather": 0,
    "shared_buffers": "256MB",
    "max_connections": 100,
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.max": 1000,
}


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


class Interrupted(Exception):
    """SIGTERM arrived: unwind through every finally so nothing is left running."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


# --------------------------------------------------------------------------- results
@dataclass
class PgbenchResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    reads: int = 0  # transactions of the first script (the SELECT), when several were mixed
    rounds_tps: list[float] = field(default_factory=list)
    origin_calls: int | None = None  # executions of the hot/-S query the origin counted
    origin_rows: int | None = None  # rows it returned: a portal opened but never executed has 0
    proxy_cpu_s: float | None = None  # CPU seconds the proxy (all its processes) used
    proxy_mem_mb: float | None = None  # RSS of one process, or the sum of PSS over several
    proxy_procs: int | None = None
    pool_mode: str | None = None  # PgBouncer: "transaction" or "session"
    peer_cache: dict[str, int] | None = None  # pgpool-II: SHOW pool_cache deltas


@dataclass
class LatencyResult:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    calls: int
    origin_rows: int | None = None
    note: str | None = None


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    peers: dict[str, str] = field(default_factory=dict)  # target -> version, or why it is absent
    pgbench: dict[str, dict[str, PgbenchResult]] = field(default_factory=dict)
    latency: dict[str, dict[str, LatencyResult]] = field(default_factory=dict)
    agg_rows: int = 0
    agg_direct_ms: float = 0.0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------- process trees
def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu_seconds(pid: int) -> float | None:
    """utime+stime of every live process under pid, plus what their reaped children used."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if p == pid:
                return None
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def tree_memory_mb(pid: int) -> tuple[float | None, int]:
    """RSS of a lone process, or the sum of PSS over a tree (shared memory counted once)."""
    pids = _tree(pid)
    key = "VmRSS:" if len(pids) == 1 else "Pss:"
    total = 0
    for p in pids:
        path = f"/proc/{p}/status" if len(pids) == 1 else f"/proc/{p}/smaps_rollup"
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
                    break
    return (total / 1024 if total else None), len(pids)


# --------------------------------------------------------------------------- processes
class Service:
    """A server subprocess we started, its output in a log file; stopped by its PID."""

    label = "service"
    stop_signal = signal.SIGTERM

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, cwd: Path, env: dict[str, str] | None = None,
                 user: RunAs | None = None) -> None:  # fmt: skip
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        ids: dict[str, Any] = {}
        if user is not None:
            ids = {"user": user.uid, "group": user.gid, "extra_groups": []}
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, we stop it in order
                **ids,
            )
        except BaseException:
            self._log.close()
            raise

    def wait_ready(self, password: str, dbname: str = "postgres", timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "Traceback" in self.log_tail(400):
                raise RuntimeError(f"{self.label} logged a traceback:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                asyncio.run(_query_once(self.port, password, "SELECT 1", dbname))
                return
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    port: int = 0

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid)

    def memory(self) -> tuple[float | None, int]:
        return tree_memory_mb(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def problems(self) -> list[str]:
        """Log lines that report something wrong."""
        out: list[str] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if re.search(r"\b(WARNING|ERROR|FATAL|CRITICAL|Traceback|Exception)\b", line):
                    out.append(f"[{self.name}] {line}")
        return out

    def stop(self) -> None:
        """Signal the process we started, wait, then SIGKILL its process group if anything is left."""
        pid = self.proc.pid
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(self.stop_signal)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    self.proc.wait(5)
            # children it forked (pgpool-II) share its process group, which is its PID
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, 0)
                time.sleep(0.5)
                os.killpg(pid, signal.SIGKILL)
        finally:
            self._log.close()


class Proxy(Service):
    """One `neonpoly serve` subprocess."""

    def __init__(
        self, name: str, upstream: str, workdir: Path, extra: list[str], python_flags: list[str], source: Path
    ) -> None:
        self.label = f"neonpoly {name}"
        self.port = free_port()
        cache_dir = workdir / f"cache-{name}"
        cmd = [
            sys.executable, *python_flags, "-m", "neonpoly.cli", "serve",
            "--upstream", upstream,
            "--listen", f"127.0.0.1:{self.port}",
            "--cache-dir", str(cache_dir),
            "--state-dir", str(workdir / f"state-{name}"),
            "--grace", "1",
            *extra,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]))
        super().__init__(name, cmd, workdir / f"neonpoly-{name}.log", cwd=source, env=env)


def _peer_dir(workdir: Path, name: str, user: RunAs | None) -> Path:
    d = workdir / name
    d.mkdir(mode=0o700)
    if user is not None:
        os.chown(d, user.uid, user.gid)
    return d


def _write(path: Path, text: str, user: RunAs | None, mode: int = 0o600) -> None:
    path.write_text(text)
    os.chmod(path, mode)
    if user is not None:
        os.chown(path, user.uid, user.gid)


def _version(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        out = (done.stdout + done.stderr).strip()  # pgpool prints its version on stderr
        return out.splitlines()[0].strip() if out else "?"
    return "?"


class PgBouncer(Service):
    """PgBouncer: database `postgres` pooled per transaction, alias SESSION_DB per session."""

    label = "PgBouncer"
    stop_signal = signal.SIGINT  # "safe shutdown" would wait for clients

    def __init__(self, binary: str, workdir: Path, origin_port: int, password: str, clients: int) -> None:
        user = run_as()  # PgBouncer refuses to run as root
        d = _peer_dir(workdir, "pgbouncer", user)
        self.port = free_port()
        origin = f"host=127.0.0.1 port={origin_port} dbname=postgres"
        _write(d / "userlist.txt", f'"postgres" "{password}"\n', user)
        _write(
            d / "pgbouncer.ini",
            f"""[databases]
postgres = {origin}
{SESSION_DB} = {origin} pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pidfile = {d / "pgbouncer.pid"}
auth_type = scram-sha-256
auth_file = {d / "userlist.txt"}
pool_mode = transaction
max_client_conn = 200
default_pool_size = {clients + 2}
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
""",
            user,
        )
        super().__init__("pgbouncer", [binary, str(d / "pgbouncer.ini")], workdir / "pgbouncer.log", cwd=d, user=user)


class PgPool(Service):
    """pgpool-II in raw mode with its in-memory query cache in shared memory, in the foreground."""

    label = "pgpool-II"
    stop_signal = signal.SIGINT  # fast shutdown: children too, and the shared memory removed

    def __init__(self, binary: str, workdir: Path, origin_port: int, password: str, clients: int) -> None:
        user = run_as()
        d = _peer_dir(workdir, "pgpool", user)
        (d / "oiddir").mkdir()
        if user is not None:
            os.chown(d / "oiddir", user.uid, user.gid)
        self.port = free_port()
        conf = {
            "backend_clustering_mode": "'raw'",
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "socket_dir": f"'{d}'",
            "pcp_listen_addresses": "''",  # PCP on its Unix socket only
            "pcp_port": free_port(),
            "pcp_socket_dir": f"'{d}'",
            "wd_ipc_socket_dir": f"'{d}'",
            "pid_file_name": f"'{d / 'pgpool.pid'}'",
            "logdir": f"'{d}'",
            "log_destination": "'stderr'",
            "backend_hostname0": "'127.0.0.1'",
            "backend_port0": origin_port,
            "backend_weight0": 1,
            "backend_flag0": "'DISALLOW_TO_FAILOVER'",
            # SCRAM from the client to pgpool, and from pgpool to the origin with pool_passwd
            "enable_pool_hba": "on",
            "pool_passwd": "'pool_passwd'",
            "num_init_children": clients + 4,  # one process per client connection
            "max_pool": 1,
            "child_life_time": 0,
            "load_balance_mode": "off",
            "health_check_period": 0,
            "sr_check_period": 0,
            "failover_on_backend_error": "off",
            "use_watchdog": "off",
            "memory_cache_enabled": "on",
            "memqcache_method": "'shmem'",
            "memqcache_total_size": "'64MB'",
            "memqcache_max_num_cache": 1000000,
            "memqcache_expire": 0,
            "memqcache_auto_cache_invalidation": "on",
            "memqcache_oiddir": f"'{d / 'oiddir'}'",
        }
        _write(d / "pgpool.conf", "".join(f"{k} = {v}\n" for k, v in conf.items()), user)
        _write(d / "pool_hba.conf", "host all all 127.0.0.1/32 scram-sha-256\n", user)
        _write(d / "pool_passwd", f"postgres:TEXT{password}\n", user)
        _write(d / "pcp.conf", "", user)
        cmd = [binary, "-n", "-D", "-f", str(d / "pgpool.conf"), "-F", str(d / "pcp.conf"),
               "-a", str(d / "pool_hba.conf")]  # fmt: skip
        super().__init__("pgpool", cmd, workdir / "pgpool.log", cwd=d, user=user)

    def problems(self) -> list[str]:
        # pgpool logs every cache block it recycles at LOG level with an ERROR-free text; keep the rest
        return [p for p in super().problems() if "pool_reuse_block" not in p]

    def pool_cache(self, password: str) -> dict[str, int] | None:
        """SHOW pool_cache (only pgpool's simple-protocol path answers it): the counters we need."""
        psql = shutil.which("psql")
        if psql is None:
            return None
        env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable")
        cmd = [psql, "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
               "-A", "-F", "\t", "-c", "SHOW pool_cache"]  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10).stdout.splitlines()
            if len(out) >= 2:
                row = dict(zip(out[0].split("\t"), out[1].split("\t"), strict=False))
                return {k: int(row[k]) for k in ("num_cache_hits", "num_selects", "num_cache_entries") if k in row}
        return None


async def _query_once(port: int, password: str, sql: str, dbname: str = "postgres") -> Any:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=password,
        database=dbname,
        ssl=False,
        timeout=5,
    )
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


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
async def _timed_calls(
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


def _percentile(samples: list[float], q: float) -> float:
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


# --------------------------------------------------------------------------- table
def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 and value > 0 else "-"


def _absent(report: Report, target: str) -> str | None:
    status = report.peers.get(target, "")
    return status.split(" (")[0] if status.startswith(("not installed", "did not start", "not run")) else None


def render(report: Report) -> str:
    s = report.settings
    m = report.machine
    flags = " ".join(s.get("proxy_python_flags") or [])
    lines = [
        f"neonpoly benchmark: {m['cores']} cores ({m['cpu']}), {m['python']}, {m['postgres']}, {m['uvloop']}",
        f"pgbench scale {s['scale']}, {s['clients']} clients / {s['threads']} threads,"
        f" {s['rounds']} round(s) x {s['duration_s']} s per target and workload (order reversed every other"
        f" round), caches warmed with {s['warmup_transactions']} hot-set transactions per mode;"
        f" total {report.elapsed_s:.0f} s",
        f"neonpoly {s['source_commit']} from {s['source']}, run as: python {flags} -m neonpoly.cli serve".replace(
            "python  -m", "python -m"
        ),
        "peers: " + "; ".join(f"{COLUMNS[t]}: {v}" for t, v in report.peers.items()),
        "",
        "| workload | direct | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for key, row in report.pgbench.items():
        d = row.get("direct")
        base = d.tps if d else 0.0
        cells = [f"{base:,.0f} tps" if d else "-"]
        for t in COLUMNS:
            r = row.get(t)
            if r is None:
                cells.append(_absent(report, t) or "-")
                continue
            cell = _ratio(r.tps, base)
            if r.pool_mode == "session":
                cell = f"n/a (session {cell})"
            cells.append(cell)
        lines.append(f"| {WORKLOADS[key].label} | " + " | ".join(cells) + " |")
    for method, lrow in report.latency.items():
        for q in ("p50", "p99"):
            ld = lrow.get("direct")
            base = getattr(ld, f"{q}_ms") if ld else 0.0
            cells = [f"{base:.3f} ms" if ld else "-"]
            for t in COLUMNS:
                lr = lrow.get(t)
                if lr is None:
                    cells.append(_absent(report, t) or "-")
                    continue
                v = getattr(lr, f"{q}_ms")
                cells.append(f"{v:.3f} ms ({_ratio(v, base)})")
            lines.append(f"| ~5 ms aggregate, {q}, {LATENCY_METHODS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "tps ratios are vs direct (higher is better); latencies in ms (lower is better, ratio vs direct).",
        "PgBouncer 1.18 in transaction mode rejects `pgbench -M prepared`: that row is its session mode;",
        "asyncpg's named prepared statements need session mode too, so PgBouncer's latency rows are session mode.",
        "asyncpg fetchrow/fetchval send a row-limited Execute, which pgpool-II never caches; fetch does not.",
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end', '?')}"
        " (other work on this machine skews every column)",
    ]
    # the proxies' CPU and memory
    lines += ["", "proxy CPU (% of one core over the run, us per transaction) and memory at the end of the run:", ""]
    lines += ["| workload | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for key, row in report.pgbench.items():
        cells = []
        for t in COLUMNS:
            r = row.get(t)
            if r is None or r.proxy_cpu_s is None or not r.transactions:
                cells.append("-")
                continue
            secs = s["duration_s"] * max(1, len(r.rounds_tps))
            mem = "-" if r.proxy_mem_mb is None else f"{r.proxy_mem_mb:.0f} MB"
            if (r.proxy_procs or 1) > 1:
                mem += f" PSS/{r.proxy_procs} procs"
            else:
                mem += " RSS"
            cells.append(f"{r.proxy_cpu_s / secs * 100:.0f}%, {r.proxy_cpu_s * 1e6 / r.transactions:.0f} us, {mem}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    # what the origin really executed
    notes = []
    for key, row in report.pgbench.items():
        for t in CACHING:
            r = row.get(t)
            if r and r.origin_rows is not None and r.reads:
                note = (
                    f"{key}/{t}: origin executed {r.origin_rows} of {r.reads} reads"
                    f" ({100 * (1 - r.origin_rows / r.reads):.1f}% served from cache)"
                )
                if r.origin_calls is not None and r.origin_calls > r.origin_rows:
                    note += f"; {r.origin_calls} portals bound at the origin"
                if r.peer_cache:
                    note += (
                        f"; SHOW pool_cache: {r.peer_cache.get('num_cache_hits', 0)} hits,"
                        f" {r.peer_cache.get('num_selects', 0)} selects sent on"
                    )
                notes.append(note)
    for method, lrow in report.latency.items():
        for t in CACHING:
            lat = lrow.get(t)
            if lat and lat.origin_rows is not None:
                notes.append(f"~5 ms aggregate, {method}/{t}: origin executed {lat.origin_rows} of {lat.calls}"
                             " timed calls (+5 warm-up)")  # fmt: skip
    if notes:
        lines += ["", "cache witness (pg_stat_statements on the origin, rows returned):"] + [f"  {n}" for n in notes]
    if report.agg_rows:
        lines.append(f"~5 ms aggregate: aid <= {report.agg_rows}, {report.agg_direct_ms:.2f} ms on the origin")
    if report.problems:
        lines += ["", f"PROBLEMS ({len(report.problems)}):"] + [f"  {p}" for p in report.problems]
    else:
        lines += ["", "no errors from pgbench, asyncpg or any proxy"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def _commit(source: Path) -> str:
    """The commit the proxies run: git's HEAD (with +dirty), or a git-archive header."""
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "--", "neonpoly"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        top = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if Path(top).resolve() != source.resolve():
            raise subprocess.CalledProcessError(1, "git")  # not a checkout of its own
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        marker = source / "COMMIT"
        return marker.read_text().strip() if marker.is_file() else "unknown"


def _machine(pg_version: str) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio (no uvloop)"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": f"Python {platform.python_version()}",
        "postgres": pg_version,
        "uvloop": loop,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _combine(runs: list[PgbenchResult]) -> PgbenchResult:
    """The rounds of one workload on one target as one result (equal durations: mean tps)."""

    def total(values: list[Any]) -> Any:
        return None if any(v is None for v in values) else sum(values)

    caches = [r.peer_cache for r in runs]
    peer_cache = None
    if all(c is not None for c in caches):
        peer_cache = {k: sum(c.get(k, 0) for c in caches if c) for k in ("num_cache_hits", "num_selects")}
    return PgbenchResult(
        tps=statistics.fmean(r.tps for r in runs),
        latency_ms=statistics.fmean(r.latency_ms for r in runs),
        transactions=sum(r.transactions for r in runs),
        failed=sum(r.failed for r in runs),
        reads=sum(r.reads for r in runs),
        rounds_tps=[round(r.tps, 1) for r in runs],
        origin_calls=total([r.origin_calls for r in runs]),
        origin_rows=total([r.origin_rows for r in runs]),
        proxy_cpu_s=total([r.proxy_cpu_s for r in runs]),
        proxy_mem_mb=runs[-1].proxy_mem_mb,
        proxy_procs=runs[-1].proxy_procs,
        pool_mode=runs[0].pool_mode,
        peer_cache=peer_cache,
    )


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def bench(args: argparse.Namespace, workdir: Path, report_box: list[Report]) -> Report:
    t_start = time.monotonic()
    duration = args.duration or (3 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 2)
    warm_tx = 1000 if args.quick else 2500  # per client; 8 clients -> each of 1000 keys ~8-20 times
    lat_calls = 200 if args.quick else 500
    targets = [t for t in TARGETS if t == "direct" or t in args.targets]
    workloads = list(args.workloads)
    problems: list[str] = []

    def step(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    step("starting PostgreSQL")
    pg = LocalPostgres(workdir / "pg", settings=PG_SETTINGS, remove_on_stop=True, die_with_parent=True)
    services: dict[str, Service] = {}
    origin: Origin | None = None
    try:
        pg.start()
        env = dict(os.environ, PGPASSWORD=pg.password, PGSSLMODE="disable")
        step(f"pgbench -i -s {args.scale} (port {pg.port})")
        subprocess.run(
            ["pgbench", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
             "-i", "-q", "-s", str(args.scale), "-I", "dtGvp", "postgres"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        origin = Origin(pg.port, pg.password)
        origin.run(origin.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        pg_version = str(origin.run(origin.conn.fetchval("SELECT version()"))).split(" on ")[0]

        report = Report(
            machine=_machine(pg_version),
            settings={
                "scale": args.scale,
                "clients": args.clients,
                "threads": args.threads,
                "duration_s": duration,
                "rounds": rounds,
                "workloads": workloads,
                "targets": targets,
                "warmup_transactions": warm_tx * args.clients,
                "latency_calls": lat_calls,
                "proxy_python_flags": args.proxy_python_flag or [],
                "source": str(args.source.resolve()),
                "source_commit": _commit(args.source),
                "quick": args.quick,
                "postgres_settings": {k: str(v) for k, v in PG_SETTINGS.items()},
                "auth": "SCRAM-SHA-256 from every client to every target",
            },
            problems=problems,
        )
        report_box.append(report)
        for t in COLUMNS:
            if t not in targets:
                report.peers[t] = "not run (--targets)"

        # ---- the proxies
        upstream = pg.url(sslmode="disable")
        flags = args.proxy_python_flag or []
        src = args.source.resolve()
        starting: list[tuple[str, str]] = []  # (target, database to probe)
        for t, extra in (("no-cache", ["--no-cache"]), ("cache", ["--ttl", "600"])):
            if t in targets:
                step(f"starting neonpoly {' '.join(extra)}")
                services[t] = Proxy(t, upstream, workdir, extra, flags, src)
                starting.append((t, "postgres"))
        peers: dict[str, tuple[str, type[PgBouncer] | type[PgPool], str]] = {
            "pgbouncer": ("pgbouncer", PgBouncer, SESSION_DB),
            "pgpool": ("pgpool", PgPool, "postgres"),
        }
        for t, (binary_name, cls, probe_db) in peers.items():
            if t not in targets:
                continue
            binary = _which(binary_name)
            if binary is None:
                pkg = "pgbouncer" if t == "pgbouncer" else "pgpool2"
                report.peers[t] = f"not installed (apt-get install {pkg})"
                continue
            step(f"starting {cls.label} ({binary})")
            report.peers[t] = _version(binary)
            try:
                services[t] = cls(binary, workdir, pg.port, pg.password, args.clients)
            except OSError as exc:
                report.peers[t] = "did not start"
                problems.append(f"{cls.label} did not start: {exc}")
                continue
            starting.append((t, probe_db))
        for t, db in starting:
            try:
                services[t].wait_ready(pg.password, db)
            except RuntimeError as exc:
                if t not in COLUMNS or t in ("no-cache", "cache"):
                    raise
                report.peers[t] = "did not start"
                problems.append(str(exc))
                services.pop(t).stop()
        targets = [t for t in targets if t == "direct" or t in services]

        def endpoint(target: str, mode: str) -> tuple[int, str, str | None]:
            if target == "direct":
                return pg.port, "postgres", None
            if target == "pgbouncer":
                session = mode != "simple"  # prepared statements need session pooling in 1.18
                return (
                    services[target].port,
                    SESSION_DB if session else "postgres",
                    ("session" if session else "transaction"),
                )
            return services[target].port, "postgres", None

        common = ["-c", str(args.clients), "-j", str(args.threads)]
        timeout = duration + 60
        like = HOT_QUERY_PREFIX + "%"

        def measure(key: str, target: str, rnd: int) -> PgbenchResult:
            wl = WORKLOADS[key]
            svc = services.get(target)
            port, db, pool_mode = endpoint(target, wl.mode)
            cpu0 = svc.cpu_seconds() if svc else None
            pc0 = svc.pool_cache(pg.password) if isinstance(svc, PgPool) else None
            calls0, rows0 = origin.stats(like) if origin else (0, 0)
            step(f"{key:<13} {target:<10} round {rnd + 1}/{rounds}, {duration}s")
            r = run_pgbench(
                port,
                pg.password,
                [*common, "-M", wl.mode, "-T", str(duration), *wl.script],
                timeout=timeout,
                problems=problems,
                label=f"{key}/{target}",
                dbname=db,
            )
            r.pool_mode = pool_mode
            if origin:
                calls1, rows1 = origin.stats(like)
                r.origin_calls, r.origin_rows = calls1 - calls0, rows1 - rows0
            if svc:
                cpu1 = svc.cpu_seconds()
                r.proxy_cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                r.proxy_mem_mb, r.proxy_procs = svc.memory()
                if isinstance(svc, PgPool) and pc0 is not None:
                    pc1 = svc.pool_cache(pg.password)
                    if pc1 is not None:
                        r.peer_cache = {k: pc1[k] - pc0.get(k, 0) for k in ("num_cache_hits", "num_selects")}
                if svc.proc.poll() is not None:
                    problems.append(f"{svc.label} died (exit {svc.proc.returncode}) during {key}:\n" + svc.log_tail())
            if r.failed:
                problems.append(f"pgbench {key}/{target}: {r.failed} failed transactions")
            return r

        # ---- pgbench: every workload on every target in turn, the order reversed every other round
        for i, key in enumerate(workloads if args.only in (None, "pgbench") else ()):
            wl = WORKLOADS[key]
            if wl.warm:
                for t in (t for t in CACHING if t in services):
                    port, db, _ = endpoint(t, wl.mode)
                    step(f"warming {t}: {warm_tx * args.clients} hot-set transactions, {wl.mode}")
                    run_pgbench(
                        port,
                        pg.password,
                        [*common, "-M", wl.mode, "-t", str(warm_tx), *wl.script],
                        timeout=180,
                        problems=problems,
                        label=f"warm-up {key}/{t}",
                        dbname=db,
                    )
                time.sleep(0.3)  # write-behind
            runs: dict[str, list[PgbenchResult]] = {t: [] for t in targets}
            for rnd in range(rounds):
                order = targets if (i + rnd) % 2 == 0 else targets[::-1]
                for t in order:
                    runs[t].append(measure(key, t, rnd))
            report.pgbench[key] = {t: _combine(rs) for t, rs in runs.items()}

        # ---- latency of a ~5 ms aggregate, sequential asyncpg calls
        if args.only in (None, "latency"):
            step("calibrating the ~5 ms aggregate on the origin")
            n, ms = calibrate(origin)
            report.agg_rows, report.agg_direct_ms = n, ms
            step(f"aggregate over aid <= {n}: {ms:.2f} ms direct; {lat_calls} sequential asyncpg calls per target")
            agg_like = AGG_PREFIX + "%"
            for j, method in enumerate(LATENCY_METHODS):
                arg = n - j  # its own key per method: a fetch must not warm fetchrow's entry
                row: dict[str, LatencyResult] = {}
                for t in targets if j % 2 == 0 else targets[::-1]:
                    port, db, pool_mode = endpoint(t, "prepared")  # asyncpg prepares named statements
                    _, r0 = origin.stats(agg_like)
                    step(f"latency {method:<9} {target_label(t)}")
                    try:
                        samples = asyncio.run(_timed_calls(port, pg.password, db, method, arg, lat_calls, warm=5))
                    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                        problems.append(f"latency {method}/{t}: {type(exc).__name__}: {exc}")
                        continue
                    _, r1 = origin.stats(agg_like)
                    row[t] = LatencyResult(
                        p50_ms=_percentile(samples, 0.5),
                        p99_ms=_percentile(samples, 0.99),
                        mean_ms=statistics.fmean(samples),
                        calls=len(samples),
                        origin_rows=r1 - r0 if t != "direct" else None,
                        note=f"{pool_mode} pooling" if pool_mode else None,
                    )
                report.latency[method] = row
        for svc in services.values():
            problems.extend(svc.problems())
        report.elapsed_s = time.monotonic() - t_start
        report.machine["loadavg_end"] = _loadavg()
        return report
    finally:
        if origin is not None:
            origin.close()
        for svc in services.values():
            try:
                svc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {svc.label}: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            pg.stop()


def target_label(target: str) -> str:
    return "direct" if target == "direct" else COLUMNS[target]


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 s runs, one round (about 1.5 minutes in total)")
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (default 6, --quick 3)")
    parser.add_argument("--rounds", type=int, help="runs per target and workload (default 2, --quick 1)")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--targets",
        type=_csv(TARGETS[1:]),
        default=TARGETS[1:],
        metavar="LIST",
        help=f"comma-separated targets besides direct (default: {','.join(TARGETS[1:])})",
    )
    parser.add_argument(
        "--workloads",
        type=_csv(tuple(WORKLOADS)),
        default=DEFAULT_WORKLOADS,
        metavar="LIST",
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: {','.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument("--json", type=Path, default=HERE / "last-run.json", help="where to write the results")
    parser.add_argument(
        "--proxy-python-flag",
        action="append",
        metavar="FLAG",
        help="extra interpreter flag for the neonpoly processes (e.g. -O), repeatable",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="neonpoly source tree the proxies run from (e.g. a `git archive` of a commit)",
    )
    parser.add_argument("--only", choices=("pgbench", "latency"), help="run one half")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the proxies' logs here")
    args = parser.parse_args(argv)
    if shutil.which("pgbench") is None:
        print("benchmarks/run.py: pgbench not found on PATH", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    workdir = Path(tempfile.mkdtemp(prefix="neonpoly-bench-"))
    os.chmod(workdir, 0o711)  # the servers may run as an unprivileged user when we are root
    box: list[Report] = []
    try:
        report = bench(args, workdir, box)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted; every process stopped", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        if "isinstance(transport, asyncio.Transport)" in str(exc):
            print(
                "diagnosis: under uvloop (neonpoly serve uses uvloop.run) the client transport is"
                " uvloop.loop.TCPTransport, which is not an asyncio.Transport subclass, so the"
                " assert in neonpoly/proxy/session.py ClientSide.connection_made fails for every"
                " connection. Workaround: --proxy-python-flag=-O (asserts off).",
                file=sys.stderr,
            )
        return 1
    finally:
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy(log, args.keep_logs / log.name)
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(report))
    args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

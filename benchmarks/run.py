#!/usr/bin/env python3
"""neonpoly benchmark: direct PostgreSQL vs neonpoly --no-cache vs neonpoly with cache hits.

Run as a user would, from the repository root:

    .venv/bin/python benchmarks/run.py            # ~2.5 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --quick    # under a minute

In one run it starts a throwaway PostgreSQL (fsync off, pgbench scale 10, pg_stat_statements
as the witness of what the origin really executed), two neonpoly proxies (pass-through and
caching), and measures side by side:

* pgbench over a hot set (aid drawn from 1..1000, `hot_select.sql`), simple and prepared;
  the caching proxy is warmed first so every key is stored;
* the built-in select-only script (`-S`, aid over all 1M rows): the relay's cost;
* p50/p99 latency of an aggregate that costs the origin about 5 ms (calibrated on this
  machine), direct vs through each proxy (asyncpg, sequential calls).

Prints one table and writes it as JSON to benchmarks/last-run.json (or --json PATH).
Every process it starts is stopped on exit, on Ctrl-C and on SIGTERM.
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

HOT_SCRIPT = HERE / "hot_select.sql"
HOT_QUERY_PREFIX = "SELECT abalance FROM pgbench_accounts WHERE aid ="
AGG_PREFIX = "SELECT count(*), sum(abalance), max(bid) FROM pgbench_accounts"
AGG_SQL = AGG_PREFIX + " WHERE aid BETWEEN 1 AND $1"
TARGETS = ("direct", "no-cache", "cache")
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
    origin_calls: int | None = None  # executions of the query the origin really ran
    proxy_cpu_s: float | None = None  # CPU seconds the proxy process used during the run
    proxy_rss_mb: float | None = None


@dataclass
class LatencyResult:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    calls: int
    origin_calls: int | None = None


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    pgbench: dict[str, dict[str, PgbenchResult]] = field(default_factory=dict)
    latency: dict[str, LatencyResult] = field(default_factory=dict)
    agg_rows: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------- processes
class Proxy:
    """One `neonpoly serve` subprocess with its stderr captured to a file."""

    def __init__(
        self, name: str, upstream: str, workdir: Path, extra: list[str], python_flags: list[str], source: Path
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"neonpoly-{name}.log"
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
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=source,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, we stop it in order
        )

    def wait_ready(self, password: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"neonpoly {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "Traceback" in self.log_tail(400):
                raise RuntimeError(f"neonpoly {self.name} logged a traceback:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                asyncio.run(_query_once(self.port, password, "SELECT 1"))
                return
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"neonpoly {self.name} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def problems(self) -> list[str]:
        """Log lines that are not the normal per-connection INFO line."""
        out: list[str] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback|Exception)\b", line):
                    out.append(f"[{self.name}] {line}")
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


async def _query_once(port: int, password: str, sql: str) -> Any:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=password,
        database="postgres",
        ssl=False,
        timeout=5,
    )
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def run_pgbench(
    port: int, password: str, args: list[str], *, timeout: float, problems: list[str], label: str
) -> PgbenchResult:
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable", PGAPPNAME="neonpoly-bench")
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", *args, "postgres"]
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
    if proc.returncode != 0 or tps is None:
        problems.append(f"pgbench {label}: exit {proc.returncode}; stderr: {err.strip()[-800:]}")
    elif err.strip():
        # pgbench prints per-client errors (e.g. "client 3 aborted in command 1") on stderr
        problems.append(f"pgbench {label}: stderr: {err.strip()[-800:]}")
    return PgbenchResult(tps or 0.0, lat or 0.0, done, failed)


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

    def calls(self, like: str) -> int:
        return int(
            self.run(
                self.conn.fetchval(
                    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE $1",
                    like,
                )
            )
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.conn.close())
        self.loop.close()


# --------------------------------------------------------------------------- latency
async def _timed_calls(port: int, password: str, arg: int, calls: int, warm: int) -> list[float]:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=password,
        database="postgres",
        ssl=False,
        statement_cache_size=100,
    )
    try:
        for _ in range(warm):
            await conn.fetchrow(AGG_SQL, arg)
        await asyncio.sleep(0.2)  # let a write-behind store land
        samples: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await conn.fetchrow(AGG_SQL, arg)
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
def _fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 and value > 0 else "-"


def render(report: Report) -> str:
    s = report.settings
    m = report.machine
    lines = [
        f"neonpoly benchmark: {m['cores']} cores ({m['cpu']}), {m['python']}, {m['postgres']}, {m['uvloop']}",
        f"pgbench scale {s['scale']}, {s['clients']} clients / {s['threads']} threads,"
        f" {s['duration_s']} s per run, cache warmed with {s['warmup_transactions']}"
        f" transactions per mode; total {report.elapsed_s:.0f} s",
        "",
    ]
    head = f"{'scenario':<34}{'direct':>10}{'no-cache':>18}{'cache':>18}"
    flags = " ".join(s.get("proxy_python_flags") or [])
    lines.append(f"neonpoly {s['source_commit']} from {s['source']}, run as: python {flags} -m neonpoly.cli serve")
    lines += [head, "-" * len(head)]
    names = {
        "hot-simple": "hot 1..1000, simple      tps",
        "hot-prepared": "hot 1..1000, prepared    tps",
        "S-simple": "-S 1..1M, simple         tps",
        "S-prepared": "-S 1..1M, prepared       tps",
    }
    for key, label in names.items():
        row = report.pgbench.get(key, {})
        d = row.get("direct")
        base = d.tps if d else 0.0
        cells = [f"{base:>10.0f}" if d else f"{'-':>10}"]
        for t in ("no-cache", "cache"):
            r = row.get(t)
            cells.append(f"{r.tps:>10.0f} ({_fmt_ratio(r.tps, base):>5})" if r else f"{'-':>18}")
        lines.append(f"{label:<34}" + "".join(cells))
    if report.latency:
        d = report.latency.get("direct")
        for q, attr in (("p50", "p50_ms"), ("p99", "p99_ms")):
            base = getattr(d, attr) if d else 0.0
            cells = [f"{base:>10.3f}"]
            for t in ("no-cache", "cache"):
                r = report.latency.get(t)
                v = getattr(r, attr) if r else 0.0
                cells.append(f"{v:>10.3f} ({_fmt_ratio(v, base):>5})" if r else f"{'-':>18}")
            lines.append(f"{'~5 ms aggregate ' + q + '           ms':<34}" + "".join(cells))
    lines += [
        "",
        "ratios are vs direct (tps: higher is better; latency: lower is better)",
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end', '?')}"
        f" (other work on this machine skews every column)",
    ]
    # what the origin really executed during the cache runs, and the proxies' CPU use
    notes = []
    for key in names:
        r = report.pgbench.get(key, {}).get("cache")
        if r and r.origin_calls is not None and r.transactions:
            notes.append(
                f"{key}: origin ran {r.origin_calls} of {r.transactions} queries"
                f" ({100 * (1 - r.origin_calls / r.transactions):.1f}% hits)"
            )
    lat = report.latency.get("cache")
    if lat and lat.origin_calls is not None:
        notes.append(
            f"~5 ms aggregate (aid <= {report.agg_rows}): origin ran {lat.origin_calls}"
            f" of {lat.calls} timed calls (+5 warm-up)"
        )
    if notes:
        lines += ["cache witness (pg_stat_statements on the origin):"] + [f"  {n}" for n in notes]
    cpu = []
    for key in names:
        for t in ("no-cache", "cache"):
            r = report.pgbench.get(key, {}).get(t)
            if r and r.proxy_cpu_s is not None and r.transactions:
                cpu.append(
                    f"{key}/{t}: {r.proxy_cpu_s / s['duration_s'] * 100:.0f}% of a core,"
                    f" {r.proxy_cpu_s * 1e6 / r.transactions:.0f} us/query,"
                    f" RSS {r.proxy_rss_mb:.0f} MB"
                )
    if cpu:
        lines += ["proxy process CPU during each run:"] + [f"  {c}" for c in cpu]
    if report.problems:
        lines += ["", f"PROBLEMS ({len(report.problems)}):"] + [f"  {p}" for p in report.problems]
    else:
        lines += ["", "no errors from pgbench, asyncpg or either neonpoly process"]
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

        loop = f"uvloop {uvloop.__version__}"
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


def bench(args: argparse.Namespace, workdir: Path, report_box: list[Report]) -> Report:
    t_start = time.monotonic()
    duration = args.duration or (3 if args.quick else 10)
    warm_tx = 1500 if args.quick else 2500  # per client; 8 clients -> each of 1000 keys ~12-20 times
    lat_calls = 200 if args.quick else 500
    problems: list[str] = []

    def step(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    step("starting PostgreSQL")
    pg = LocalPostgres(workdir / "pg", settings=PG_SETTINGS, remove_on_stop=True, die_with_parent=True)
    cleanup: list[Any] = [pg.stop]
    proxies: dict[str, Proxy] = {}
    origin: Origin | None = None
    try:
        pg.start()
        env = dict(os.environ, PGPASSWORD=pg.password, PGSSLMODE="disable")
        step(f"pgbench -i -s {args.scale} (port {pg.port})")
        subprocess.run(
            [
                "pgbench",
                "-h",
                "127.0.0.1",
                "-p",
                str(pg.port),
                "-U",
                "postgres",
                "-i",
                "-q",
                "-s",
                str(args.scale),
                "-I",
                "dtGvp",
                "postgres",
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
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
                "warmup_transactions": warm_tx * args.clients,
                "latency_calls": lat_calls,
                "proxy_python_flags": args.proxy_python_flag or [],
                "source": str(args.source.resolve()),
                "source_commit": _commit(args.source),
                "quick": args.quick,
                "postgres_settings": {k: str(v) for k, v in PG_SETTINGS.items()},
            },
            problems=problems,
        )
        report_box.append(report)

        upstream = pg.url(sslmode="disable")
        step("starting neonpoly --no-cache and neonpoly --ttl 600")
        flags = args.proxy_python_flag or []
        src = args.source.resolve()
        proxies["no-cache"] = Proxy("no-cache", upstream, workdir, ["--no-cache"], flags, src)
        proxies["cache"] = Proxy("cache", upstream, workdir, ["--ttl", "600"], flags, src)
        for p in proxies.values():
            p.wait_ready(pg.password)
        ports = {
            "direct": pg.port,
            "no-cache": proxies["no-cache"].port,
            "cache": proxies["cache"].port,
        }
        common = ["-c", str(args.clients), "-j", str(args.threads)]
        timeout = duration + 60

        def measure(key: str, target: str, script: list[str], mode: str) -> None:
            proxy = proxies.get(target)
            cpu0 = proxy.cpu_seconds() if proxy else None
            like = HOT_QUERY_PREFIX + "%"
            calls0 = origin.calls(like) if origin else 0
            step(f"{key:<13} {target:<9} {duration}s")
            r = run_pgbench(
                ports[target],
                pg.password,
                [*common, "-M", mode, "-T", str(duration), *script],
                timeout=timeout,
                problems=problems,
                label=f"{key}/{target}",
            )
            if origin:
                r.origin_calls = origin.calls(like) - calls0
            if proxy:
                cpu1 = proxy.cpu_seconds()
                r.proxy_cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                r.proxy_rss_mb = proxy.rss_mb()
                if proxy.proc.poll() is not None:
                    problems.append(
                        f"neonpoly {target} died (exit {proxy.proc.returncode}) during {key}:\n" + proxy.log_tail()
                    )
            if r.failed:
                problems.append(f"pgbench {key}/{target}: {r.failed} failed transactions")
            report.pgbench.setdefault(key, {})[target] = r

        for mode in ("simple", "prepared") if args.only in (None, "pgbench") else ():
            key = f"hot-{mode}"
            step(f"warming the cache: {warm_tx * args.clients} hot-set transactions, {mode}")
            run_pgbench(
                ports["cache"],
                pg.password,
                [*common, "-M", mode, "-t", str(warm_tx), "-f", str(HOT_SCRIPT)],
                timeout=120,
                problems=problems,
                label=f"warm-up {mode}",
            )
            time.sleep(0.3)  # write-behind
            for target in TARGETS:
                measure(key, target, ["-f", str(HOT_SCRIPT)], mode)
        for mode in ("simple", "prepared") if args.only in (None, "pgbench") else ():
            for target in TARGETS:
                measure(f"S-{mode}", target, ["-S"], mode)
        if args.only == "pgbench":
            for p in proxies.values():
                problems.extend(p.problems())
            report.elapsed_s = time.monotonic() - t_start
            report.machine["loadavg_end"] = _loadavg()
            return report

        step("calibrating the ~5 ms aggregate on the origin")
        n, ms = calibrate(origin)
        report.agg_rows = n
        step(f"aggregate over aid <= {n}: {ms:.2f} ms direct; {lat_calls} sequential asyncpg calls per target")
        for target in TARGETS:
            like = AGG_PREFIX + "%"
            c0 = origin.calls(like)
            try:
                samples = asyncio.run(_timed_calls(ports[target], pg.password, n, lat_calls, warm=5))
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                problems.append(f"latency {target}: {type(exc).__name__}: {exc}")
                continue
            report.latency[target] = LatencyResult(
                p50_ms=_percentile(samples, 0.5),
                p99_ms=_percentile(samples, 0.99),
                mean_ms=statistics.fmean(samples),
                calls=len(samples),
                origin_calls=origin.calls(like) - c0 if target != "direct" else None,
            )
        for p in proxies.values():
            problems.extend(p.problems())
        report.elapsed_s = time.monotonic() - t_start
        report.machine["loadavg_end"] = _loadavg()
        return report
    finally:
        if origin is not None:
            origin.close()
        for p in proxies.values():
            p.stop()
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                fn()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 s runs (under a minute in total)")
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (default 10, --quick 3)")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
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
    os.chmod(workdir, 0o711)  # the server may run as an unprivileged user when we are root
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
            for log in workdir.glob("neonpoly-*.log"):
                shutil.copy(log, args.keep_logs / log.name)
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(report))
    args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

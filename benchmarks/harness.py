"""One benchmark run, start to end: the origin PostgreSQL initialised by `pgbench -i`, the
targets started, every workload on every target in alternating rounds, the latency test, and
everything stopped again (in the `finally`, whatever happened) before the `Report` is returned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from benchmarks.results import LatencyResult, PgbenchResult, Report, combine, describe_machine, loadavg, source_commit
from benchmarks.targets import (
    BASELINE,
    CACHING,
    COLUMNS,
    NEONPOLY,
    PG_SETTINGS,
    SESSION_DB,
    TARGETS,
    PgBouncer,
    PgPool,
    Proxy,
    Service,
    target_label,
    version,
    which,
)
from benchmarks.workloads import (
    AGG_PREFIX,
    HOT_QUERY_PREFIX,
    LATENCY_METHODS,
    WORKLOADS,
    Origin,
    calibrate,
    percentile,
    run_pgbench,
    timed_calls,
)
from neonpoly.integrations.embedded import LocalPostgres


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
            machine=describe_machine(pg_version),
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
                "source_commit": source_commit(args.source),
                "baseline": str(args.baseline.resolve()) if getattr(args, "baseline", None) else None,
                "baseline_commit": source_commit(args.baseline) if getattr(args, "baseline", None) else None,
                "quick": args.quick,
                "postgres_settings": {k: str(v) for k, v in PG_SETTINGS.items()},
                "auth": "SCRAM-SHA-256 from every client to every target",
            },
            problems=problems,
        )
        report_box.append(report)
        for t in COLUMNS:
            if t not in targets and t not in BASELINE:
                report.peers[t] = "not run (--targets)"

        # ---- the proxies
        upstream = pg.url(sslmode="disable")
        flags = args.proxy_python_flag or []
        src = args.source.resolve()
        starting: list[tuple[str, str]] = []  # (target, database to probe)
        base = args.baseline.resolve() if getattr(args, "baseline", None) else src
        for t, extra in NEONPOLY.items():
            tree = base if t in BASELINE else src
            if t in targets:
                step(f"starting neonpoly {' '.join(extra)} from {tree}")
                services[t] = Proxy(t, upstream, workdir, extra, flags, tree)
                starting.append((t, "postgres"))
        peers: dict[str, tuple[str, type[PgBouncer] | type[PgPool], str]] = {
            "pgbouncer": ("pgbouncer", PgBouncer, SESSION_DB),
            "pgpool": ("pgpool", PgPool, "postgres"),
        }
        for t, (binary_name, cls, probe_db) in peers.items():
            if t not in targets:
                continue
            binary = which(binary_name)
            if binary is None:
                pkg = "pgbouncer" if t == "pgbouncer" else "pgpool2"
                report.peers[t] = f"not installed (apt-get install {pkg})"
                continue
            step(f"starting {cls.label} ({binary})")
            report.peers[t] = version(binary)
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
                if t not in COLUMNS or t in NEONPOLY:
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
            report.pgbench[key] = {t: combine(rs) for t, rs in runs.items()}

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
                        samples = asyncio.run(timed_calls(port, pg.password, db, method, arg, lat_calls, warm=5))
                    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                        problems.append(f"latency {method}/{t}: {type(exc).__name__}: {exc}")
                        continue
                    _, r1 = origin.stats(agg_like)
                    row[t] = LatencyResult(
                        p50_ms=percentile(samples, 0.5),
                        p99_ms=percentile(samples, 0.99),
                        mean_ms=statistics.fmean(samples),
                        calls=len(samples),
                        origin_rows=r1 - r0 if t != "direct" else None,
                        note=f"{pool_mode} pooling" if pool_mode else None,
                    )
                report.latency[method] = row
        for svc in services.values():
            problems.extend(svc.problems())
        report.elapsed_s = time.monotonic() - t_start
        report.machine["loadavg_end"] = loadavg()
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

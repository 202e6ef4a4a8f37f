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
* neonpoly --no-cache (the relay alone) and neonpoly with its cache (`--ttl 600`);
* the same two with `--workers 2` (`no-cache-2w`, `cache-2w`): two relay processes on one
  port sharing invalidations through a private redis-server (its CPU counts as the proxy's).

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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# Run as a script, Python puts benchmarks/ on sys.path, not the repository root. With the root
# first, `neonpoly` is this checkout's, and the modules beside this file import as the package
# `benchmarks` (it has an __init__.py): the same names whether run.py runs as a script or as
# `python -m benchmarks.run`, and the names ruff and mypy give them when they check benchmarks/.
sys.path.insert(0, str(ROOT))

from benchmarks.harness import bench  # noqa: E402
from benchmarks.report import render, to_json  # noqa: E402
from benchmarks.results import Report  # noqa: E402
from benchmarks.targets import BASELINE, TARGETS  # noqa: E402
from benchmarks.workloads import DEFAULT_WORKLOADS, WORKLOADS  # noqa: E402


class Interrupted(Exception):
    """SIGTERM arrived: unwind through every finally so nothing is left running."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


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
    usual = tuple(t for t in TARGETS[1:] if t not in BASELINE)
    parser.add_argument(
        "--targets",
        type=_csv(usual),
        default=usual,
        metavar="LIST",
        help=f"comma-separated targets besides direct (default: {','.join(usual)})",
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
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run both neonpoly modes from this source tree (e.g. a `git archive` of main) as"
        " 'baseline' columns: a before/after in one run",
    )
    parser.add_argument("--only", choices=("pgbench", "latency"), help="run one half")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the proxies' logs here")
    args = parser.parse_args(argv)
    if args.baseline is not None:
        args.targets = (*args.targets, *(f"{t}-base" for t in args.targets if t in ("no-cache", "cache")))
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
    args.json.write_text(to_json(report))
    print(f"\nresults written to {args.json}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

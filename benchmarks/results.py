"""What one benchmark run records: the results of pgbench and of the latency test, the `Report`
they make up (written as JSON with `dataclasses.asdict`), how the rounds of one workload on one
target combine into one result, and what the report says about the machine and the source tree.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


def combine(runs: list[PgbenchResult]) -> PgbenchResult:
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


# --------------------------------------------------------------------------- where it ran
def source_commit(source: Path) -> str:
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


def describe_machine(pg_version: str) -> dict[str, Any]:
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
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"

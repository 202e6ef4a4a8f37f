"""The report of a run as a reader sees it: the markdown table of every workload's ratio to
direct PostgreSQL, the proxies' CPU and memory, what the origin really executed (the cache
witness) and the problems met; and the same report as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from benchmarks.results import Report
from benchmarks.targets import BASELINE, CACHING, COLUMNS
from benchmarks.workloads import LATENCY_METHODS, WORKLOADS


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 and value > 0 else "-"


def _absent(report: Report, target: str) -> str | None:
    status = report.peers.get(target, "")
    return status.split(" (")[0] if status.startswith(("not installed", "did not start", "not run")) else None


def render(report: Report) -> str:
    s = report.settings
    m = report.machine
    flags = " ".join(s.get("proxy_python_flags") or [])
    # The baseline columns only when a baseline ran (--baseline).
    columns = {t: label for t, label in COLUMNS.items() if t not in BASELINE or t in s["targets"]}
    lines = [
        f"neonpoly benchmark: {m['cores']} cores ({m['cpu']}), {m['python']}, {m['postgres']}, {m['uvloop']}",
        f"pgbench scale {s['scale']}, {s['clients']} clients / {s['threads']} threads,"
        f" {s['rounds']} round(s) x {s['duration_s']} s per target and workload (order reversed every other"
        f" round), caches warmed with {s['warmup_transactions']} hot-set transactions per mode;"
        f" total {report.elapsed_s:.0f} s",
        f"neonpoly {s['source_commit']} from {s['source']}, run as: python {flags} -m neonpoly.cli serve".replace(
            "python  -m", "python -m"
        ),
        *([f"baseline columns: neonpoly {s.get('baseline_commit')} from {s['baseline']}"] if s.get("baseline") else []),
        "peers: " + "; ".join(f"{COLUMNS[t]}: {v}" for t, v in report.peers.items()),
        "",
        "| workload | direct | " + " | ".join(columns.values()) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for key, row in report.pgbench.items():
        d = row.get("direct")
        base = d.tps if d else 0.0
        cells = [f"{base:,.0f} tps" if d else "-"]
        for t in columns:
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
            for t in columns:
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
    lines += ["| workload | " + " | ".join(columns.values()) + " |", "|---|" + "---|" * len(columns)]
    for key, row in report.pgbench.items():
        cells = []
        for t in columns:
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


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2) + "\n"

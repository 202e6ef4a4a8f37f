"""Run psycopg 3's own test suite directly against PostgreSQL and through a caching neonpoly.

    .venv/bin/python scripts/psycopg_suite.py PSYCOPG_SRC [--pytest-args ...]

PSYCOPG_SRC is a checkout of https://github.com/psycopg/psycopg (ideally the tag matching the
psycopg neonpoly's tests use). The script

1. makes (once, then reuses) a separate venv for psycopg's tests: psycopg and psycopg_pool from
   PSYCOPG_SRC with their `test` extra, the matching psycopg-binary when PyPI has it (else the
   pure-Python wrapper over the system libpq), pytest-timeout, dnspython and numpy;
2. starts a throwaway PostgreSQL (tests/pgharness.py, with max_prepared_transactions=10 as
   psycopg's CI uses) with two fresh databases, `psycopg_direct` and `psycopg_neonpoly`;
3. starts `neonpoly serve` (cache on, default settings) in front of it, on 127.0.0.1;
4. runs the same pytest selection twice, PSYCOPG_TEST_DSN pointing at PostgreSQL, then at
   neonpoly (sslmode=disable both times, test order fixed with `-p no:randomly`);
5. prints passed/failed/skipped/errors for each run and the test ids whose outcome differs,
   with each failure's one-line crash message; full failure text and logs stay in --out.

Time bounds: `--timeout` per test (pytest-timeout, default 30 s), `-m "not slow"` unless
--include-slow (psycopg marks every test that sleeps, and all mypy tests, `slow`), and
--run-timeout per pytest run (default 1800 s; the run's process group is killed then).

Exit status: 0 when every test failing through neonpoly also fails directly, 1 otherwise,
2 when the suite could not be run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from tests.pgharness import PgServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Outcomes that count as "not passing" when comparing the two runs.
BAD = ("failed", "error")

# A pytest plugin loaded into each run: one JSON record per test id (its outcome and, when it
# did not pass, the crash line and full failure text). Test ids are the same in both runs.
REPORT_PLUGIN = """
import json, os

_results = {}


def _record(nodeid, outcome, report=None):
    entry = _results.setdefault(nodeid, {"outcome": "passed", "message": "", "text": ""})
    entry["outcome"] = outcome
    if report is not None and report.longrepr is not None:
        crash = getattr(report.longrepr, "reprcrash", None)
        entry["message"] = crash.message if crash is not None else str(report.longrepr)[-400:]
        entry["text"] += f"--- {report.when} ---\\n{report.longreprtext}\\n"
        for name, content in report.sections:
            if name.startswith("Captured") and content:
                entry["text"] += f"--- {name} ---\\n{content[-4000:]}\\n"


def pytest_runtest_logreport(report):
    entry = _results.get(report.nodeid)
    xfail = hasattr(report, "wasxfail")
    if report.when == "setup":
        if report.failed:
            _record(report.nodeid, "error", report)
        elif report.skipped:
            _record(report.nodeid, "xfailed" if xfail else "skipped", report)
        return
    if report.when == "call":
        if report.passed:
            _record(report.nodeid, "xpassed" if xfail else "passed")
        elif report.failed:
            _record(report.nodeid, "failed", report)
        else:
            _record(report.nodeid, "xfailed" if xfail else "skipped", report)
        return
    # teardown: a failure turns a pass into an error; a failed call stays failed
    if report.failed:
        if entry is None or entry["outcome"] in ("passed", "skipped", "xfailed", "xpassed"):
            _record(report.nodeid, "error", report)
        else:
            entry["text"] += f"--- teardown ---\\n{report.longreprtext}\\n"


def _write(nodeid):
    # One JSON line per finished test: a run killed at --run-timeout still reports.
    with open(os.environ["NEONPOLY_SUITE_RESULTS"], "a") as f:
        f.write(json.dumps({"nodeid": nodeid, **_results[nodeid]}) + "\\n")


def pytest_runtest_logfinish(nodeid, location):
    if nodeid in _results:
        _write(nodeid)


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid or "<collection>", "error", report)
        _write(report.nodeid or "<collection>")
    elif report.skipped:  # a whole module skipped (importorskip, missing extension)
        _record(report.nodeid, "skipped", report)
        _write(report.nodeid)
"""


@dataclass
class RunResult:
    label: str
    results: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0
    exit_code: int | None = None
    timed_out: bool = False

    def ids(self, *outcomes: str) -> set[str]:
        return {k for k, v in self.results.items() if v["outcome"] in outcomes}

    def counts(self) -> dict[str, int]:
        keys = ("passed", "failed", "skipped", "error", "xfailed", "xpassed")
        return {k: len(self.ids(k)) for k in keys}


def log(msg: str) -> None:
    print(f"[psycopg-suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"neonpoly exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"neonpoly did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


# --- the psycopg test venv -------------------------------------------------------------------


def source_version(src: Path) -> str:
    import tomllib

    with open(src / "psycopg" / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _pip(py: Path, logf: Path, *args: str) -> int:
    cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    with open(logf, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def ensure_venv(src: Path, venv: Path, python: str, out: Path) -> Path:
    """Create/refresh the venv running psycopg's tests; return its python."""
    version = source_version(src)
    py = venv / "bin" / "python"
    stamp = venv / ".neonpoly-psycopg-suite"
    want = f"{src.resolve()} {version}"
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    log(f"creating test venv {venv} for psycopg {version} from {src}")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    logf = out / "pip.log"
    deps = [f"{src / 'psycopg'}[test]", str(src / "psycopg_pool"), "pytest-timeout", "dnspython", "numpy"]
    if _pip(py, logf, *deps) != 0:
        raise RuntimeError(f"pip install failed, see {logf}")
    # The C-accelerated wrapper with its own libpq, when PyPI has it for this exact version;
    # otherwise psycopg falls back to the pure-Python wrapper over the system libpq.
    if _pip(py, logf, f"psycopg-binary=={version}") != 0:
        log(f"psycopg-binary=={version} unavailable: using the pure-Python wrapper (system libpq)")
    check = subprocess.run(
        [str(py), "-c", "import psycopg; print(psycopg.__version__, psycopg.pq.__impl__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"psycopg does not import in the test venv:\n{check.stderr}")
    log(f"test venv ready: psycopg {check.stdout.strip()}")
    stamp.write_text(want)
    return py


# --- the servers ---------------------------------------------------------------------------


def start_postgres() -> PgServer:
    import psycopg

    from tests.pgharness import start_pg_server

    server = start_pg_server(extra_settings={"max_prepared_transactions": 10})
    with psycopg.connect(server.url("postgres", "postgres"), autocommit=True) as conn:
        for db in ("psycopg_direct", "psycopg_neonpoly"):
            conn.execute(f"CREATE DATABASE {db} OWNER postgres".encode())
    return server


def test_dsn(server: PgServer, port: int, database: str) -> str:
    return (
        f"host=127.0.0.1 port={port} user=postgres password={server.password_for('postgres')}"
        f" dbname={database} sslmode=disable"
    )


def start_neonpoly(server: PgServer, out: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    pw = quote(server.password_for("postgres"), safe="")
    upstream = f"postgresql://postgres:{pw}@127.0.0.1:{server.port}/psycopg_neonpoly?sslmode=disable"
    cmd = [
        str(Path(sys.executable).parent / "neonpoly"),
        "serve",
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(out / "neonpoly-state"),
        "--grace",
        "1",
    ]
    if not Path(cmd[0]).exists():
        cmd[0:1] = [sys.executable, "-m", "neonpoly.cli"]
    with open(out / "neonpoly.log", "wb") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    wait_for_port(port, proc, 60)
    return proc, port


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    log(f"stopping {name} (pid {proc.pid})")
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def neonpoly_stats(port: int) -> str:
    """SHOW STATS through the admin database, for the log (best effort)."""
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=postgres dbname=neonpoly sslmode=disable",
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            cur = conn.execute("SHOW STATS")
            names = [c.name for c in cur.description or []]
            return "\n".join(", ".join(f"{n}={v}" for n, v in zip(names, row, strict=False)) for row in cur)
    return "(SHOW STATS unavailable)"


# --- running pytest --------------------------------------------------------------------------


def run_suite(
    label: str, py: Path, src: Path, dsn: str, out: Path, pytest_args: list[str], run_timeout: float
) -> RunResult:
    results_file = out / f"results-{label}.jsonl"
    results_file.unlink(missing_ok=True)
    plugin_dir = out / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "neonpoly_suite_report.py").write_text(REPORT_PLUGIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG_"))}
    env.update(
        PSYCOPG_TEST_DSN=dsn,
        NEONPOLY_SUITE_RESULTS=str(results_file),
        PYTHONPATH=str(plugin_dir),
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [
        str(py),
        "-m",
        "pytest",
        "-p",
        "neonpoly_suite_report",
        "-p",
        "no:randomly",  # the same order in both runs
        "-o",
        f"cache_dir={out / ('pytest-cache-' + label)}",
        *pytest_args,
    ]
    log(f"run {label}: {shlex.join(cmd[1:])}  (cwd {src}, PSYCOPG_TEST_DSN={dsn})")
    result = RunResult(label)
    started = time.monotonic()
    with open(out / f"pytest-{label}.log", "wb") as logf:
        proc = subprocess.Popen(
            cmd,
            cwd=src,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            result.exit_code = proc.wait(run_timeout)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            log(f"run {label} exceeded {run_timeout:.0f}s: interrupting pytest (pid {proc.pid})")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # pytest then prints what failed so far
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    result.seconds = time.monotonic() - started
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            record = json.loads(line)
            result.results[record.pop("nodeid")] = record
    tail = (out / f"pytest-{label}.log").read_text(errors="replace").strip().splitlines()[-1:]
    log(f"run {label} done in {result.seconds:.0f}s (pytest exit {result.exit_code}): {' '.join(tail)}")
    return result


# --- the report ------------------------------------------------------------------------------


def one_line(message: str, width: int = 200) -> str:
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    return first if len(first) <= width else first[: width - 1] + "…"


def report(direct: RunResult, proxy: RunResult, out: Path) -> bool:
    print()
    print("=" * 78)
    header = f"{'':>10} {'passed':>7} {'failed':>7} {'skipped':>8} {'errors':>7} {'xfailed':>8} {'xpassed':>8}  time"
    print(header)
    for r in (direct, proxy):
        c = r.counts()
        note = " (TIMED OUT)" if r.timed_out else ""
        print(
            f"{r.label:>10} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8} {c['error']:>7}"
            f" {c['xfailed']:>8} {c['xpassed']:>8}  {r.seconds:.0f}s{note}"
        )
    direct_bad, proxy_bad = direct.ids(*BAD), proxy.ids(*BAD)
    only_proxy = sorted(proxy_bad - direct_bad)
    only_direct = sorted(direct_bad - proxy_bad)
    missing = sorted(set(direct.results) ^ set(proxy.results))

    details = []
    print(f"\nFail through neonpoly but not directly ({len(only_proxy)}):")
    for nodeid in only_proxy:
        entry = proxy.results[nodeid]
        was = direct.results.get(nodeid, {}).get("outcome", "not run")
        print(f"  {nodeid}  [{entry['outcome']}; direct: {was}]")
        print(f"      {one_line(entry['message'])}")
        details.append(f"{'=' * 78}\n{nodeid} [{entry['outcome']}; direct: {was}]\n{entry['text']}")
    print(f"\nFail directly but not through neonpoly ({len(only_direct)}):")
    for nodeid in only_direct:
        entry = direct.results[nodeid]
        now = proxy.results.get(nodeid, {}).get("outcome", "not run")
        print(f"  {nodeid}  [{entry['outcome']}; neonpoly: {now}]")
        print(f"      {one_line(entry['message'])}")
    if missing:
        print(f"\nRun in only one of the two runs ({len(missing)}; e.g. a timed-out run):")
        for nodeid in missing[:20]:
            print(f"  {nodeid}")
    (out / "neonpoly-only-failures.txt").write_text("\n".join(details))
    print(f"\nFull failure text: {out / 'neonpoly-only-failures.txt'}; logs and results in {out}")
    print("=" * 78)
    return not only_proxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              psycopg_suite.py /tmp/psycopg-src
              psycopg_suite.py /tmp/psycopg-src --pytest-args tests/test_copy.py -x
              psycopg_suite.py /tmp/psycopg-src --include-slow --timeout 120
            """
        ),
    )
    parser.add_argument("psycopg_src", type=Path, help="a psycopg source checkout (has tests/)")
    parser.add_argument(
        "--venv",
        type=Path,
        default=None,
        help="venv for psycopg's tests (default: <tmp>/neonpoly-psycopg-suite-venv-<version>;"
        " made once, reused while the source path and version stay the same)",
    )
    parser.add_argument("--python", default=sys.executable, help="python that makes the venv")
    parser.add_argument("--out", type=Path, default=None, help="logs and results (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=30, help="pytest-timeout per test, seconds (default 30)")
    parser.add_argument("--run-timeout", type=float, default=1800, help="limit per pytest run, seconds (default 1800)")
    parser.add_argument(
        "--include-slow",
        action="store_true",
        help="also run tests marked slow (except the mypy ones); default: -m 'not slow'",
    )
    parser.add_argument("--only", choices=("direct", "neonpoly"), help="run one side only (for debugging)")
    parser.add_argument(
        "--pytest-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="everything after this goes to pytest (test paths, -k, -x …); default: the whole suite",
    )
    args = parser.parse_args(argv)

    src: Path = args.psycopg_src.resolve()
    if not (src / "tests" / "conftest.py").exists() or not (src / "psycopg" / "pyproject.toml").exists():
        parser.error(f"{src} does not look like a psycopg source checkout")
    version = source_version(src)
    venv = args.venv or Path(tempfile.gettempdir()) / f"neonpoly-psycopg-suite-venv-{version}"
    out = args.out or Path(tempfile.mkdtemp(prefix="neonpoly-psycopg-suite-"))
    out.mkdir(parents=True, exist_ok=True)

    pytest_args = ["-q", "-p", "no:cov", f"--timeout={args.timeout:g}", "-r", "N"]
    # mypy tests (all also marked slow) type-check example files and never touch the database.
    pytest_args += ["-m", "not mypy" if args.include_slow else "not slow"]
    pytest_args += args.pytest_args

    started = time.monotonic()
    try:
        py = ensure_venv(src, venv, args.python, out)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        log(f"cannot prepare the test venv: {exc}")
        return 2

    server = neon = None
    direct = proxy = None
    try:
        log("starting PostgreSQL")
        server = start_postgres()
        log(f"PostgreSQL on 127.0.0.1:{server.port} ({server.startup_seconds:.1f}s), log {server.log_file}")
        neon, neon_port = start_neonpoly(server, out)
        log(f"neonpoly (pid {neon.pid}) on 127.0.0.1:{neon_port}, log {out / 'neonpoly.log'}")
        if args.only != "neonpoly":
            direct = run_suite(
                "direct",
                py,
                src,
                test_dsn(server, server.port, "psycopg_direct"),
                out,
                pytest_args,
                args.run_timeout,
            )
        if args.only != "direct":
            proxy = run_suite(
                "neonpoly",
                py,
                src,
                test_dsn(server, neon_port, "psycopg_neonpoly"),
                out,
                pytest_args,
                args.run_timeout,
            )
            stats = neonpoly_stats(neon_port)
            (out / "neonpoly-stats.txt").write_text(stats + "\n")
            log(f"neonpoly SHOW STATS:\n{stats}")
    except Exception as exc:  # report, then clean up
        log(f"aborted: {exc!r}")
        return 2
    finally:
        if neon is not None:
            stop_process(neon, "neonpoly")
        if server is not None:
            log("stopping PostgreSQL")
            with contextlib.suppress(Exception):
                shutil.copy(server.log_file, out / "postgres.log")
            server.destroy()
        log(f"total {time.monotonic() - started:.0f}s")

    if direct is None or proxy is None:
        only = direct or proxy
        assert only is not None
        print(only.counts())
        return 0
    if not direct.results or not proxy.results:
        log("a run produced no results: see its pytest log")
        return 2
    return 0 if report(direct, proxy, out) else 1


if __name__ == "__main__":
    sys.exit(main())

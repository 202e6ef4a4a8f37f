"""Bad input and faults (issue 2, must-show 5): neonpoly fails one connection, never itself.

Raw sockets speak just enough protocol v3 to misbehave on purpose; bystander sessions
prove that the damage stays with the offending connection.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from neonpoly import pgwire
from neonpoly.proxy.origin import Origin
from tests.pgharness import PgServer
from tests.proxy.conftest import RunningProxy, start_proxy


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class RawClient:
    """A protocol v3 client over a plain socket, for sending what real clients never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def message(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """The next backend message as (type, body); raises IncompleteReadError at EOF."""
        head = await asyncio.wait_for(self.reader.readexactly(5), timeout)
        (length,) = struct.unpack("!i", head[1:])
        body = await asyncio.wait_for(self.reader.readexactly(length - 4), timeout)
        return head[:1], body

    async def until(self, mtype: bytes, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        seen: list[tuple[bytes, bytes]] = []
        while True:
            msg = await self.message(timeout)
            seen.append(msg)
            if msg[0] == mtype:
                return seen

    async def login_trust(self, database: str = "app") -> None:
        """Startup as trust_user (no password) and wait for ReadyForQuery."""
        await self.send(pgwire.build_startup({"user": "trust_user", "database": database}))
        msgs = await self.until(b"Z", timeout=10)
        assert (b"R", struct.pack("!i", 0)) in msgs

    async def rest(self, timeout: float = 5.0) -> bytes:
        """Everything until the proxy closes the connection (fails if it never does)."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


def error_fields(data: bytes) -> dict[str, str]:
    """The first ErrorResponse in a byte stream, decoded."""
    frames, _ = pgwire.scan_frames(data)
    for mtype, start, end in frames:
        if mtype == ord("E"):
            return pgwire.parse_error_fields(data[start + 5 : end])
    raise AssertionError(f"no ErrorResponse in {data[:200]!r}")


@pytest.fixture
async def bystander(proxy: RunningProxy) -> AsyncIterator[asyncpg.Connection]:
    """A well-behaved session that must not notice anything."""
    conn = await asyncpg.connect(**proxy.dsn("scram_user"))
    await conn.execute("CREATE TEMP TABLE IF NOT EXISTS mine (x int); INSERT INTO mine VALUES (1)")
    try:
        yield conn
        assert await conn.fetchval("SELECT sum(x) FROM mine") == 1
        assert await conn.fetchval("SELECT $1::text", "unaffected") == "unaffected"
    finally:
        await conn.close()


# --- origin unreachable ---------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_origin_unreachable_gives_08_naming_origin(pg: PgServer) -> None:
    port = _closed_port()
    down = RunningProxy(pg, Origin("127.0.0.1", port, sslmode="require"), connect_timeout=3)
    try:
        for _ in range(2):  # and again: the listener survived the first failure
            started = time.monotonic()
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncpg.connect(**down.dsn("scram_user"))
            assert info.value.sqlstate.startswith("08"), info.value.sqlstate
            assert f"127.0.0.1:{port}" in str(info.value)
            assert time.monotonic() - started < 3
        # psycopg sees the same, with the origin's name in the message.
        with pytest.raises(psycopg.OperationalError, match=f"127.0.0.1:{port}"):
            await asyncio.to_thread(lambda: psycopg.connect(down.url("trust_user"), connect_timeout=5))
        # Failed sessions leave the registry (the proxy closes them right after the error).
        deadline = time.monotonic() + 5
        while down.session_count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert down.session_count == 0
    finally:
        down.close()


# --- bad bytes from a client ----------------------------------------------------------------


async def test_random_bytes_at_startup_close_only_that_connection(
    proxy: RunningProxy, bystander: asyncpg.Connection
) -> None:
    rng = random.Random(20240602)
    for _ in range(5):
        raw = await RawClient.connect(proxy.port)
        junk = bytes([0x7F]) + rng.randbytes(4095)  # first int32 is > 10000: not a startup length
        await raw.send(junk)
        answer = await raw.rest()
        assert error_fields(answer)["C"] == "08P01"
        raw.close()
    assert await bystander.fetchval("SELECT 1") == 1


async def test_random_bytes_after_login_close_only_that_connection(
    proxy: RunningProxy, bystander: asyncpg.Connection
) -> None:
    rng = random.Random(7)
    raw = await RawClient.connect(proxy.port)
    await raw.login_trust()
    await raw.send(b"\x01" + rng.randbytes(2048))
    answer = await raw.rest()
    fields = error_fields(answer)
    assert fields["C"] == "08P01" and "invalid" in fields["M"]
    raw.close()


async def test_truncated_frame_then_eof_closes_quietly(proxy: RunningProxy, bystander: asyncpg.Connection) -> None:
    before = proxy.session_count
    raw = await RawClient.connect(proxy.port)
    await raw.login_trust()
    assert proxy.session_count == before + 1
    # A Query that promises 100 bytes and delivers 10, then the client hangs up its side.
    await raw.send(b"Q" + struct.pack("!i", 104) + b"SELECT 1;\x00")
    raw.writer.write_eof()
    assert await raw.rest() == b""  # nothing may reach the origin; the proxy just closes
    raw.close()
    deadline = time.monotonic() + 5
    while proxy.session_count > before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert proxy.session_count == before


async def test_truncated_startup_packet_then_eof(proxy: RunningProxy) -> None:
    before = proxy.session_count
    raw = await RawClient.connect(proxy.port)
    await raw.send(pgwire.build_startup({"user": "trust_user", "database": "app"})[:12])
    raw.writer.write_eof()
    assert await raw.rest() == b""
    raw.close()
    deadline = time.monotonic() + 5
    while proxy.session_count > before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert proxy.session_count == before


@pytest.mark.parametrize("phase", ["startup", "ready"])
async def test_2gb_length_field_is_refused_without_buffering(
    proxy: RunningProxy, bystander: asyncpg.Connection, phase: str
) -> None:
    rss_before = vm_rss_kib()
    raw = await RawClient.connect(proxy.port)
    if phase == "ready":
        await raw.login_trust()
        header = b"Q" + struct.pack("!I", 0x7FFFFFF0)
    else:
        header = struct.pack("!I", 0x7FFFFFF0) + struct.pack("!i", pgwire.PROTOCOL_3_0)
    await raw.send(header)
    # The answer comes at once, from the header alone: nothing of the 2 GB is waited for.
    answer = await raw.rest()
    assert error_fields(answer)["C"] == "08P01"
    # Pushing the promised payload anyway meets a closed connection, not a buffer.
    chunk = b"x" * (1 << 20)
    sent = 0
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(256):
            await raw.send(chunk)
            sent += len(chunk)
            await asyncio.sleep(0.001)
    raw.close()
    grown = vm_rss_kib() - rss_before
    print(f"\n[2GB length, {phase}] sent {sent >> 20} MiB before reset; RSS +{grown} KiB")
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB"


async def test_oversized_small_message_is_refused(proxy: RunningProxy) -> None:
    """Sync is a 'small' message: a 1 MB Sync is a protocol violation, as in PostgreSQL."""
    raw = await RawClient.connect(proxy.port)
    await raw.login_trust()
    await raw.send(b"S" + struct.pack("!i", 1 << 20))
    assert error_fields(await raw.rest())["C"] == "08P01"
    raw.close()


async def test_many_bad_clients_leave_memory_flat(proxy: RunningProxy, bystander: asyncpg.Connection) -> None:
    rng = random.Random(99)
    rss_before = vm_rss_kib()

    async def misbehave(i: int) -> None:
        raw = await RawClient.connect(proxy.port)
        try:
            if i % 3 == 0:
                await raw.send(b"\xff" + rng.randbytes(8191))
            elif i % 3 == 1:
                await raw.send(struct.pack("!I", 0x80000000) + rng.randbytes(64))
            else:
                await raw.login_trust()
                await raw.send(b"Q" + struct.pack("!I", 0x7FFFFFFF) + rng.randbytes(65536))
            await raw.rest()
        except (ConnectionError, OSError):
            pass
        finally:
            raw.close()

    for _ in range(3):
        await asyncio.gather(*(misbehave(i) for i in range(30)))
    grown = vm_rss_kib() - rss_before
    print(f"\n[90 bad clients] RSS +{grown} KiB")
    assert grown < 32 * 1024
    assert await bystander.fetchval("SELECT 2") == 2


# --- origin dies mid-result -----------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_origin_killed_mid_result(pg_disposable: PgServer, loop: str) -> None:
    proxy = start_proxy(pg_disposable, loop=loop)
    try:
        raw = await RawClient.connect(proxy.port)
        await raw.login_trust("postgres")
        # generate_series in the select list streams; in FROM it would materialize first.
        sql = "SELECT generate_series(1, 50000000) AS g, repeat('x', 200)"
        await raw.send(pgwire.frame(b"Q", pgwire.cstr(sql)))
        rows = 0
        while rows < 2000:  # the result is streaming
            mtype, _ = await raw.message()
            rows += mtype == b"D"
        await asyncio.to_thread(pg_disposable.kill)
        # Drain what was in flight; the stream must end in an error, then EOF.
        seen: list[bytes] = []
        tail = b""
        try:
            while True:
                mtype, body = await raw.message(timeout=10)
                seen.append(mtype)
                if mtype == b"E":
                    tail = body
                    break
        except asyncio.IncompleteReadError:
            pass
        assert tail, f"no ErrorResponse after the origin died (last messages {seen[-3:]})"
        fields = pgwire.parse_error_fields(tail)
        assert fields["C"].startswith("08") or fields["C"].startswith("57"), fields
        assert b"Z" not in seen
        assert await raw.rest() == b""
        raw.close()

        # While the origin is down, new clients get a class 08 error, and neonpoly lives.
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(**proxy.dsn("trust_user", "postgres"))
        assert info.value.sqlstate.startswith("08")

        await asyncio.to_thread(pg_disposable.start)
        conn = await asyncpg.connect(**proxy.dsn("scram_user", "app"))
        try:
            assert await conn.fetchval("SELECT count(*) FROM generate_series(1, 10)") == 10
        finally:
            await conn.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_origin_killed_while_asyncpg_streams_copy(pg_disposable: PgServer, loop: str) -> None:
    proxy = start_proxy(pg_disposable, loop=loop)
    try:
        conn = await asyncpg.connect(**proxy.dsn("scram_user", "app"))
        got = 0
        killed = asyncio.Event()

        async def sink(chunk: bytes) -> None:
            nonlocal got
            got += len(chunk)
            if got > 1 << 20 and not killed.is_set():
                killed.set()
                await asyncio.to_thread(pg_disposable.kill)

        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await asyncio.wait_for(conn.copy_from_query("SELECT generate_series(1, 100000000)", output=sink), 20)
        assert killed.is_set()
        assert conn.is_closed()
        await asyncio.to_thread(pg_disposable.start)
        again = await asyncpg.connect(**proxy.dsn("md5_user", "app"))
        try:
            assert await again.fetchval("SELECT 'back'") == "back"
        finally:
            await again.close()
    finally:
        proxy.close()


# --- wrong password -------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["scram_user", "md5_user"])
async def test_wrong_password_relays_origins_28p01(proxy: RunningProxy, pg: PgServer, role: str) -> None:
    errors: list[dict[str, str]] = []
    for where in (proxy.dsn(role), pg.dsn(role, ssl="require")):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(**{**where, "password": "definitely-wrong"})
        errors.append(info.value.as_dict())
    via_proxy, direct = errors
    assert via_proxy["sqlstate"] == "28P01"
    assert via_proxy == direct


async def test_wrong_password_raw_bytes_unchanged(proxy: RunningProxy, pg: PgServer) -> None:
    """md5 auth spoken by hand: the ErrorResponse bytes are the origin's, byte for byte."""
    import hashlib

    async def fail_md5(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = RawClient(reader, writer)
        await raw.send(pgwire.build_startup({"user": "md5_user", "database": "app"}))
        mtype, body = await raw.message()
        assert mtype == b"R" and pgwire.auth_code(body) == 5
        inner = hashlib.md5(b"wrong" + b"md5_user").hexdigest().encode()
        outer = b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode()
        await raw.send(pgwire.frame(b"p", outer + b"\x00"))
        mtype, body = await raw.message()
        raw.close()
        assert mtype == b"E"
        return body

    via_proxy = await fail_md5(proxy.port)
    direct = await fail_md5(pg.port)
    fields = pgwire.parse_error_fields(via_proxy)
    assert fields["C"] == "28P01"
    # The origin's own frame, except the source line fields which are identical anyway.
    assert via_proxy == direct


# --- shutdown -------------------------------------------------------------------------------


async def test_shutdown_cancels_what_still_runs_at_the_origin(pg: PgServer) -> None:
    """Closing the origin connection does not stop its statement; shutdown cancels it first."""
    proxy = start_proxy(pg)
    marker = "shutdown_cancel_marker"
    conn = await asyncpg.connect(**proxy.dsn("md5_user"))
    task = asyncio.ensure_future(conn.fetch(f"SELECT pg_sleep(60) AS {marker}"))
    async with pg.superuser_conn() as su:
        active = (
            f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND state = 'active'"
            " AND pid <> pg_backend_pid()"
        )
        for _ in range(200):  # the server's own word that it runs
            if await su.fetchval(active) == 1:
                break
            await asyncio.sleep(0.05)
        assert await su.fetchval(active) == 1
        await asyncio.to_thread(proxy.close, 0.2)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await asyncio.wait_for(task, 10)
        for _ in range(100):
            if await su.fetchval(active) == 0:
                break
            await asyncio.sleep(0.05)
        assert await su.fetchval(active) == 0
    await conn.close()

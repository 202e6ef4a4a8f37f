"""A CancelRequest while neonpoly's own identity lookup is in flight releases the client's held
requests, which are forwarded behind the lookup. A gate between neonpoly and the origin holds
the lookup's answer, so the client's statements are deterministically held when the cancel
comes. Whatever the held statements changed, the identity asked *before* them must not key
the answers after them."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from neonpoly import pgwire
from neonpoly.proxy.origin import Origin
from neonpoly.proxy.session import Session
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, eventually, qident, unique
from tests.pgharness import PgServer

_IDENTITY = b"neonpoly: session identity"

T = TypeVar("T")


@dataclass
class Gate:
    """A TCP relay to the origin; once armed, the first identity lookup's answer is held."""

    pg: PgServer
    armed: bool = False
    marker: bytes = _IDENTITY
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    server: asyncio.Server | None = None

    async def start(self) -> int:
        self.release.set()
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        orr, ow = await asyncio.open_connection(self.pg.host, self.pg.port)
        gate = asyncio.Event()
        gate.set()

        async def up() -> None:
            while data := await cr.read(65536):
                if self.armed and self.marker in data and not self.seen.is_set():
                    # Hold the answer from here on: the test lets it go (clearing `release`
                    # only once `seen` fired would race with the answer).
                    self.release.clear()
                    gate.clear()
                    self.seen.set()
                ow.write(data)
                await ow.drain()
            ow.close()

        async def down() -> None:
            while data := await orr.read(65536):
                if not gate.is_set():
                    await self.release.wait()
                    gate.set()
                cw.write(data)
                await cw.drain()
            cw.close()

        for coro in (up(), down()):
            task = asyncio.get_running_loop().create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        self.release.set()
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def gated_proxy(pg: PgServer, cache_dir: Path) -> AsyncIterator[tuple[ProxyService, Gate, int]]:
    gate = Gate(pg)
    gport = await gate.start()
    settings = ProxySettings(listen=("127.0.0.1", 0), cache_dir=cache_dir, cache=CacheSettings())
    service = ProxyService(settings)
    url = pg.url("postgres", "app", "disable", host="127.0.0.1", port=gport)
    service.add_cache("default", Origin.from_url(url))
    _, port = await service.start()
    try:
        yield service, gate, port
    finally:
        await service.close(grace=0.5)
        await gate.close()


def _hits(service: ProxyService) -> int:
    return dict(service.stats.snapshot().totals.by_status).get("hit", 0)


async def _login_held(port: int) -> tuple[rawpg.Raw, tuple[int, bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = rawpg.Raw(reader, writer)
    writer.write(pgwire.build_startup({"user": "trust_user", "database": "app"}))
    msgs = await raw.until_ready()
    keys = [body for kind, body in msgs if kind == b"K"]
    assert keys, msgs
    pid = struct.unpack("!i", keys[0][:4])[0]
    return raw, (pid, keys[0][4:])


def _session(service: ProxyService, key: tuple[int, bytes]) -> Session:
    return service.server.by_key[key]


async def _cancel(port: int, key: tuple[int, bytes]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(pgwire.cancel_request(*key))
    await writer.drain()
    return reader, writer


async def _query(raw: rawpg.Raw, sql: str) -> list[rawpg.Message]:
    raw.send(rawpg.query(sql))
    return await raw.until_ready()


async def _sqlstate(msgs: list[rawpg.Message]) -> str | None:
    for kind, body in msgs:
        if kind == b"E":
            return pgwire.parse_error_fields(body).get("C")
    return None


async def _schema_and_tables(env: Env) -> tuple[str, str]:
    schema = unique("adv_cxs")
    name = unique("adv_cxt")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{name} (v text)",
        f"INSERT INTO public.{name} VALUES ('public')",
        f"CREATE TABLE {schema}.{name} (v text)",
        f"INSERT INTO {schema}.{name} VALUES ('schema')",
        f"GRANT SELECT ON public.{name}, {schema}.{name} TO PUBLIC",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE", f"DROP TABLE IF EXISTS public.{name}")
    return schema, name


async def _read_until_ok(raw: rawpg.Raw, sql: str) -> list[rawpg.Message]:
    # A cancel delivered late may still catch the statement after it: that is 57014 on a
    # direct connection too; run it again then.
    for _ in range(3):
        msgs = await _query(raw, sql)
        if await _sqlstate(msgs) != "57014":
            return msgs
    return msgs


async def test_cancel_releases_held_set_search_path(env: Env, tmp_path: Path) -> None:
    schema, name = await _schema_and_tables(env)
    read = f"SELECT v FROM {name}"
    async with gated_proxy(env.pg, tmp_path / "gcache") as (service, gate, port):
        warm, _ = await _login_held(port)
        try:
            for _ in range(4):
                assert rawpg.rows(await _query(warm, read)) == [[b"public"]]
            before = _hits(service)
            assert rawpg.rows(await _query(warm, read)) == [[b"public"]]
            assert _hits(service) > before, "the default search_path's read never cached"
        finally:
            await warm.close()

        gate.armed = True
        raw, key = await _login_held(port)
        try:
            await asyncio.wait_for(gate.seen.wait(), 10)
            gate.release.clear()
            session = _session(service, key)
            assert session.identity_inflight
            raw.send(rawpg.query(f"SET search_path TO {qident(schema)}"))
            await raw.writer.drain()
            await eventually(lambda: _const(bytes(session.cbuf)), lambda b: len(b) > 0)
            creader, cwriter = await _cancel(port, key)
            try:
                await eventually(lambda: _const(session.hold_released), bool)
                gate.release.set()
                set_answer = await raw.until_ready()
                assert await _sqlstate(set_answer) in (None, "57014"), set_answer
                await asyncio.wait_for(creader.read(), 10)  # neonpoly closes it once delivered
            finally:
                cwriter.close()
            if await _sqlstate(set_answer) == "57014":
                raw.send(rawpg.query(f"SET search_path TO {qident(schema)}"))
                await raw.until_ready()
            got = rawpg.rows(await _read_until_ok(raw, read))
            got2 = rawpg.rows(await _read_until_ok(raw, read))
            got3 = rawpg.rows(await _read_until_ok(raw, read))
            assert [got, got2, got3] == [[[b"schema"]]] * 3, (
                f"after SET search_path TO {schema} (held, released by a cancel), proxy answered "
                f"{[got, got2, got3]!r}; direct says [[b'schema']] each time"
            )
        finally:
            await raw.close()


async def _const(value: T) -> T:
    return value


async def test_two_cancels_then_terminate_while_held(env: Env, tmp_path: Path) -> None:
    """Two cancels in a row while the first statement is held, then the client goes on: every
    answer arrives once and in order, and the session stays usable."""
    _, name = await _schema_and_tables(env)
    async with gated_proxy(env.pg, tmp_path / "gcache2") as (service, gate, port):
        gate.armed = True
        raw, key = await _login_held(port)
        try:
            await asyncio.wait_for(gate.seen.wait(), 10)
            gate.release.clear()
            session = _session(service, key)
            raw.send(rawpg.query("SELECT 1"), rawpg.query("SELECT 2"))
            await raw.writer.drain()
            await eventually(lambda: _const(bytes(session.cbuf)), lambda b: len(b) > 0)
            c1 = await _cancel(port, key)
            await eventually(lambda: _const(session.hold_released), bool)
            c2 = await _cancel(port, key)
            gate.release.set()
            first = await raw.until_ready()
            second = await raw.until_ready()
            for reader, writer in (c1, c2):
                await asyncio.wait_for(reader.read(), 10)
                writer.close()
            assert rawpg.rows(first) in ([[b"1"]], []), first
            assert rawpg.rows(second) in ([[b"2"]], []), second
            third = await _read_until_ok(raw, f"SELECT v FROM {name}")
            assert rawpg.rows(third) == [[b"public"]], third
        finally:
            await raw.close()

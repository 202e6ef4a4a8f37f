"""Twin sessions for adversarial cache tests: one connection through neonpoly, one straight
to the origin, both in the same situation, so every answer the proxy gives can be compared
with what PostgreSQL itself says.

The rule the suite checks: once an entry was provably served from cache (the proxy's hit
counter went up for that very call), the proxy's answer must equal the direct connection's.
Writes that went through neonpoly must never leave a stale answer behind; writes that
bypass neonpoly may (until the TTL), and no case counts those.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlencode

import asyncpg
import psycopg

from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy
from tests.proxy.workers import WorkersProxy

__all__ = [
    "Client",
    "Driver",
    "Env",
    "Login",
    "Rows",
    "Twin",
    "hits",
    "psql_lines",
    "qident",
    "unique",
]

T = TypeVar("T")
Rows = list[tuple[Any, ...]]
# asyncpg: named prepared statements (extended protocol); psycopg: unnamed extended protocol
# when there are parameters, simple Query when there are none; psycopg_prepared: server-side
# prepared statements (prepare=True); psycopg_extended: extended protocol even without
# parameters (binary results force PQsendQueryParams).
# asyncpg_unprepared: asyncpg with statement_cache_size=0 (Parse on every call).
Driver = Literal["asyncpg", "asyncpg_unprepared", "psycopg", "psycopg_prepared", "psycopg_extended"]
DRIVERS: tuple[Driver, ...] = ("asyncpg", "psycopg", "psycopg_prepared")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def qident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Login:
    """Who connects, where, and what goes into the startup packet."""

    user: str = "postgres"
    password: str = ""
    database: str = "app"
    params: tuple[tuple[str, str], ...] = ()  # libpq URL parameters (options, application_name)

    def url(self, host: str, port: int) -> str:
        query = {"sslmode": "disable", **dict(self.params)}
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return f"postgresql://{auth}@{host}:{port}/{quote(self.database, safe='')}?{urlencode(query, quote_via=quote)}"

    def with_params(self, **params: str) -> Login:
        return Login(self.user, self.password, self.database, (*self.params, *params.items()))


def hits(proxy: CachingProxy | WorkersProxy) -> int:
    return proxy.totals().get("hit", 0)


class Client:
    """One connection with one driver; rows come back as plain tuples."""

    def __init__(self, driver: Driver, conn: asyncpg.Connection | psycopg.AsyncConnection[Any]) -> None:
        self.driver = driver
        self.conn = conn

    @classmethod
    async def open(cls, driver: Driver, login: Login, host: str, port: int) -> Client:
        if driver in ("asyncpg", "asyncpg_unprepared"):
            server_settings = {}
            for key, value in login.params:
                if key == "options":
                    raise ValueError("asyncpg takes server_settings, not options")
                server_settings[key] = value
            conn = await asyncpg.connect(
                host=host,
                port=port,
                user=login.user,
                password=login.password,
                database=login.database,
                ssl=False,
                server_settings=server_settings or None,
                statement_cache_size=0 if driver == "asyncpg_unprepared" else 100,
            )
            return cls(driver, conn)
        pconn = await psycopg.AsyncConnection.connect(login.url(host, port), autocommit=True)
        return cls(driver, pconn)

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        if isinstance(self.conn, asyncpg.Connection):
            records = await self.conn.fetch(sql, *params)
            return [tuple(r) for r in records]
        # psycopg prepares a query by itself after 5 runs; keep each driver to one protocol.
        prepare = self.driver == "psycopg_prepared"
        binary = True if self.driver == "psycopg_extended" else None
        cur = self.conn.cursor(binary=bool(binary))
        await cur.execute(sql, params or None, prepare=prepare)
        if cur.description is None:
            return []
        return [tuple(r) for r in await cur.fetchall()]

    async def run(self, sql: str) -> None:
        """A statement whose result does not matter (SET, DDL, writes); simple protocol
        where the driver allows (asyncpg's execute() without arguments is a simple Query)."""
        if isinstance(self.conn, asyncpg.Connection):
            await self.conn.execute(sql)
        else:
            await self.conn.execute(sql)  # no parameters: psycopg sends a simple Query

    async def backend_pid(self) -> int:
        if isinstance(self.conn, asyncpg.Connection):
            return int(self.conn.get_server_pid())
        return int(self.conn.info.backend_pid)

    async def ended_by_peer(self, timeout: float = 10.0) -> None:
        """Wait until the other end (neonpoly) closes this connection: read its socket, on a
        duplicate, to end of file. neonpoly closes a client only after it has handled its
        origin connection's end (and evicted what that end changed), so this is the signal
        that it saw it, where an error message would come before that. psycopg clients only."""
        assert isinstance(self.conn, psycopg.AsyncConnection), "ended_by_peer reads a psycopg socket"
        loop = asyncio.get_running_loop()
        with socket.socket(fileno=os.dup(self.conn.pgconn.socket)) as sock:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                while await loop.sock_recv(sock, 65536):
                    pass

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()


@dataclass
class Twin:
    """A session through neonpoly and its double straight to the origin."""

    env: Env
    via: Client
    direct: Client
    login: Login

    async def both(self, *statements: str) -> None:
        """Apply session-changing statements to both sides identically."""
        for sql in statements:
            await self.via.run(sql)
            await self.direct.run(sql)

    async def through(self, sql: str, params: Sequence[Any] = ()) -> tuple[Rows, bool]:
        """Run once through neonpoly: (rows, whether this very call was a cache hit)."""
        before = hits(self.env.proxy)
        rows = await self.via.rows(sql, params)
        return rows, hits(self.env.proxy) > before

    async def origin(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return await self.direct.rows(sql, params)

    async def probe(
        self,
        sql: str,
        params: Sequence[Any] = (),
        *,
        require_hit: bool = True,
        compare: bool = True,
        tries: int = 5,
    ) -> tuple[Rows, bool]:
        """Run through neonpoly until a call is a provable hit (at most `tries` calls).

        With `compare`, every answer on the way must also equal the direct one. Returns the
        last answer and whether a hit was seen; `require_hit` fails the case without one.
        """
        rows: Rows = []
        for _ in range(tries):
            rows, hit = await self.through(sql, params)
            if compare:
                expected = await self.origin(sql, params)
                assert rows == expected, f"while warming {sql!r}: proxy {rows!r} != direct {expected!r}"
            if hit:
                return rows, True
        assert not require_hit, f"no cache hit for {sql!r} after {tries} runs: {self.env.proxy.totals()}"
        return rows, False

    async def check(self, sql: str, params: Sequence[Any] = (), *, why: str = "") -> Rows:
        """The proxy's answer must equal the direct connection's, now."""
        got, hit = await self.through(sql, params)
        expected = await self.origin(sql, params)
        assert got == expected, (
            f"{why}: proxy answered {got!r} ({'cache hit' if hit else 'from origin'}), "
            f"direct connection says {expected!r} for {sql!r}"
        )
        return got


@dataclass
class Env:
    """One case's world: a fresh caching neonpoly, the origin, and what to clean up."""

    pg: PgServer
    proxy: CachingProxy | WorkersProxy  # one process, or `serve --workers N` (NEONPOLY_TEST_WORKERS)
    stack: contextlib.AsyncExitStack
    cleanups: list[str] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)

    # --- logins and sessions -----------------------------------------------------------

    def login(self, user: str = "postgres", database: str = "app", **params: str) -> Login:
        password = self.passwords.get(user) or self.pg.password_for(user)
        return Login(user, password, database, tuple(params.items()))

    async def client(self, login: Login | None = None, *, via: bool = True, driver: Driver = "psycopg") -> Client:
        login = login or self.login()
        host, port = ("127.0.0.1", self.proxy.port) if via else (self.pg.host, self.pg.port)
        client = await Client.open(driver, login, host, port)
        self.stack.push_async_callback(client.close)
        return client

    async def twin(self, login: Login | None = None, driver: Driver = "psycopg") -> Twin:
        login = login or self.login()
        via = await self.client(login, via=True, driver=driver)
        direct = await self.client(login, via=False, driver=driver)
        return Twin(self, via, direct, login)

    # --- the origin, as the superuser, bypassing neonpoly --------------------------------

    async def admin(self, *statements: str, database: str = "app") -> None:
        conn = await asyncpg.connect(**self.pg.dsn("postgres", database))
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    async def admin_val(self, sql: str, *args: Any, database: str = "app") -> Any:
        conn = await asyncpg.connect(**self.pg.dsn("postgres", database))
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    def on_cleanup(self, *statements: str) -> None:
        self.cleanups.extend(statements)

    async def role(self, prefix: str = "adv_role", *, superuser: bool = False) -> str:
        """A login role of this case's own (scram password), dropped at the end."""
        name = unique(prefix)
        password = f"pw-{uuid.uuid4().hex[:12]}"
        self.passwords[name] = password
        attrs = "SUPERUSER" if superuser else ""
        await self.admin(
            f"CREATE ROLE {name} LOGIN {attrs} PASSWORD '{password}'",
            f"GRANT ALL ON SCHEMA public TO {name}",
        )
        self.on_cleanup(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'",
            f"REVOKE ALL ON SCHEMA public FROM {name}",
            f"DROP OWNED BY {name} CASCADE",
            f"DROP ROLE IF EXISTS {name}",
        )
        return name

    async def table(self, prefix: str, columns: str, *rows: str, grant: str = "PUBLIC") -> str:
        """CREATE TABLE public.<unique>(columns) with rows (SQL tuples), readable by `grant`."""
        name = unique(prefix)
        await self.admin(f"CREATE TABLE public.{name} ({columns})")
        if rows:
            await self.admin(f"INSERT INTO public.{name} VALUES {', '.join(rows)}")
        await self.admin(f"GRANT ALL ON public.{name} TO {grant}")
        self.on_cleanup(f"DROP TABLE IF EXISTS public.{name} CASCADE")
        return name

    async def run_cleanups(self) -> None:
        # Sessions are closed by now; objects first, roles last (they own nothing by then).
        # One connection for them all (a new backend per statement was most of a case's
        # cleanup time); each statement still commits alone, and a statement that ends this
        # connection (a terminate by a pattern it matches) just gets the next one a new one.
        conn: asyncpg.Connection | None = None
        try:
            for sql in self.cleanups:
                for _ in range(20):
                    try:
                        if conn is None or conn.is_closed():
                            conn = await asyncpg.connect(**self.pg.dsn("postgres", "app"))
                        await conn.execute(sql)
                        break
                    except asyncpg.ObjectInUseError:
                        await asyncio.sleep(0.05)  # a terminated backend still exiting
                    except Exception:
                        break
        finally:
            if conn is not None:
                await conn.close()


async def psql_lines(url: str, *sql: str, check: bool = True) -> list[str]:
    """The real psql binary, one connection, each statement with -c; stdout lines."""
    args = ["psql", url, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
    for statement in sql:
        args += ["-c", statement]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if check:
        assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


async def eventually(what: Callable[[], Awaitable[T]], until: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll `what` (a real signal, e.g. the origin's own answer) until `until` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await what()
        if until(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"condition never held; last value {value!r}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def closing(*clients: Client) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for c in clients:
            await c.close()


async def evil_equals(env: Env) -> str:
    """A schema with an `=` for integers that is always true."""
    evil = unique("adv_evil")
    await env.admin(
        f"CREATE SCHEMA {evil}",
        f"GRANT USAGE ON SCHEMA {evil} TO PUBLIC",
        f"CREATE FUNCTION {evil}.always(int, int) RETURNS bool IMMUTABLE LANGUAGE sql AS $$ SELECT true $$",
        f"CREATE OPERATOR {evil}.= (LEFTARG = int, RIGHTARG = int, FUNCTION = {evil}.always)",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {evil} CASCADE")
    return evil

"""The one client of a running neonpoly's admin database: the CLI's admin commands and the
console attached to a `neonpoly serve` both talk through it, with one set of defaults (who
connects, how long to wait) and one translation of failures into sentences."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
from dataclasses import dataclass
from typing import Any

from neonpoly.defaults import ADMIN_DATABASE, ENV_ADMIN_PASSWORD, environment

CONNECT_TIMEOUT = 5.0
QUERY_TIMEOUT = 10.0


class AdminClientError(Exception):
    """An answer to show the user: `message` (one line) and an optional `hint`."""

    def __init__(self, message: str, hint: str | None = None, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.sqlstate = sqlstate


class AdminUnreachable(AdminClientError):
    """Nothing answers at the address (serve not running there, or a firewall)."""


class AdminRefused(AdminClientError):
    """neonpoly answered but would not let this role in (FATAL 28000/28P01)."""


class AdminStatementError(AdminClientError):
    """The statement was refused (unknown cache, bad syntax …); the connection stays usable."""


@dataclass(frozen=True, slots=True)
class Answer:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    tag: str  # the command tag, e.g. "PURGE 3" or "SET MODE"

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def default_user() -> str:
    """$NEONPOLY_ADMIN_USER, else the OS user (an allowed role by default), else postgres."""
    explicit = environment().admin_user
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "postgres"


def quote_ident(name: str) -> str:
    """A double-quoted identifier for an admin statement (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


class AdminClient:
    """One connection to `address`, opened on first use and reopened once if it was lost."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        user: str | None = None,
        password: str | None = None,
        application_name: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        query_timeout: float = QUERY_TIMEOUT,
    ) -> None:
        self.address = address
        self.user = user or default_user()
        self.password = password if password is not None else environment().admin_password
        # Names the cache whose origin checks the login when neonpoly has no password of its own.
        self.application_name = application_name
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._conn: Any = None  # asyncpg.Connection (untyped library)
        self._lock = asyncio.Lock()  # asyncpg runs one statement at a time per connection

    @property
    def where(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _connect(self) -> Any:
        import asyncpg

        host, port = self.address
        try:
            return await asyncpg.connect(
                host=host,
                port=port,
                user=self.user,
                password=self.password,
                database=ADMIN_DATABASE,
                ssl=False,
                timeout=self.connect_timeout,
                statement_cache_size=0,  # admin statements are tiny; no prepared leftovers
                server_settings={"application_name": self.application_name} if self.application_name else None,
            )
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            # "connection refused", not "[Errno 111] Connection refused".
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
            if isinstance(exc, ConnectionRefusedError):  # asyncio says "Connect call failed (…)"
                why = "connection refused"
            raise AdminUnreachable(f"cannot reach neonpoly at {self.where}: {why[:1].lower()}{why[1:]}") from exc
        except asyncpg.PostgresError as exc:
            message, hint, sqlstate = _parts(exc)
            if sqlstate == "28P01" and hint is None:
                hint = (
                    f"log in as a role of the origin with its password (--user/--password), or with "
                    f"${ENV_ADMIN_PASSWORD} if the serve has one"
                )
            raise AdminRefused(message, hint, sqlstate) from exc

    async def run(self, sql: str) -> Answer:
        import asyncpg

        lost = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)
        async with self._lock:
            for attempt in (1, 2):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._connect()
                try:
                    stmt = await self._conn.prepare(sql, timeout=self.query_timeout)
                    records = await stmt.fetch(timeout=self.query_timeout)
                    columns = tuple(a.name for a in stmt.get_attributes())
                    return Answer(columns, tuple(tuple(r) for r in records), stmt.get_statusmsg() or "")
                except lost as exc:
                    await self.close()
                    if attempt == 2:
                        raise AdminUnreachable(f"cannot reach neonpoly at {self.where}: {exc}") from exc
                except asyncpg.PostgresError as exc:
                    if self._conn.is_closed():  # a FATAL (admin shutdown) ends the connection
                        await self.close()
                    raise AdminStatementError(*_parts(exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: closing is best effort
                async with asyncio.timeout(1.0):
                    await conn.close()


def _parts(exc: Exception) -> tuple[str, str | None, str | None]:
    # asyncpg's str() appends DETAIL/HINT lines itself; keep the bare message and the hint.
    message = getattr(exc, "message", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return message, getattr(exc, "hint", None), getattr(exc, "sqlstate", None)

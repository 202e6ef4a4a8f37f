"""The `neonpoly` admin database: PgBouncer/ReadySet-style console on the proxy's listener.

A client that connects to the database `neonpoly` is answered by neonpoly itself. Only roles
in `allowed_roles` get in (default: `neonpoly`, `postgres`, the OS user running neonpoly and
the roles the integrations log in as); others get FATAL 28000 and nothing else. Then the
client proves it is that role (login.py):

- with a password of neonpoly's own (`NEONPOLY_ADMIN_PASSWORD` where it runs),
  by SCRAM-SHA-256 against it;
- without one, by logging in to the origin of the cache it names (application_name, else the
  default cache) as that role, relayed as a normal session's login is: the origin checks the
  role's password. On a listener that is not loopback, a role the origin admits without
  asking for a password is refused; with no origin to ask, every admin login is refused.

Both the simple protocol (psql) and the extended protocol (asyncpg, psycopg) are answered;
statements take no parameters. Values are sent as text or binary as each Bind asks (asyncpg
asks for binary).

`install_admin` sets the endpoint on a `ProxyService`; the rules and TTL policies it shows
and changes belong to the service, and every figure comes from `service.report()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from neonpoly import __version__, pgwire
from neonpoly.admin.commands import (
    BOOL,
    FLOAT8,
    INT8,
    TIMESTAMPTZ,
    AdminError,
    Command,
    Executor,
    Result,
    Value,
    columns_of,
    parse,
)
from neonpoly.admin.login import OriginLogin, ScramLogin, ScramVerifier

NO_AUTH_HINT = "set NEONPOLY_ADMIN_PASSWORD in the environment of the neonpoly that serves it"

if TYPE_CHECKING:
    from neonpoly.proxy.origin import Origin
    from neonpoly.proxy.session import Session
    from neonpoly.service import ProxyService

log = logging.getLogger("neonpoly.admin")

SERVER_VERSION = f"16.0 (neonpoly {__version__})"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def default_admin_roles() -> frozenset[str]:
    roles = {"neonpoly", "postgres"}
    with contextlib.suppress(KeyError, OSError):  # no passwd entry (some containers)
        roles.add(getpass.getuser())
    return frozenset(roles)


class AdminConsole:
    """The AdminEndpoint set as `service.routes.admin`: who may enter, and what answers them."""

    def __init__(
        self,
        service: ProxyService,
        *,
        allowed_roles: Iterable[str] | None = None,
        password: str | None = None,
        integration_roles: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.service = service
        self.explicit_roles = frozenset(allowed_roles) if allowed_roles is not None else None
        self.integration_roles = integration_roles
        self.verifier = ScramVerifier(password) if password else None
        self.executor = Executor(service)
        # Set by a worker of `serve --workers N`: answers a statement for every worker (their
        # figures merged, purges run everywhere), so admin sessions answer asynchronously.
        self.gather: Callable[[Command], Awaitable[Result]] | None = None

    @property
    def allowed_roles(self) -> frozenset[str]:
        if self.explicit_roles is not None:
            return self.explicit_roles
        extra = self.integration_roles() if self.integration_roles is not None else ()
        return default_admin_roles() | frozenset(extra)

    @property
    def loopback_only(self) -> bool:
        """The listener takes connections from this host only."""
        host = self.service.settings.listen[0]
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def origin_for(self, application_name: str) -> Origin | None:
        """The origin that checks an admin login naming this cache (else the default's)."""
        routes = self.service.routes
        route = routes.by_id.get(application_name) or routes.by_id.get(routes.default or "")
        return route.origin if route is not None else None

    def attach(self, session: Session, startup: pgwire.StartupRequest) -> AdminSession:
        return AdminSession(self, session)

    def run(self, sql: str) -> Result:
        """Run one admin statement in-process (the TUI may use this instead of a socket)."""
        return self.executor.run(parse(sql))



def install_admin(
    service: ProxyService,
    *,
    allowed_roles: Iterable[str] | None = None,
    password: str | None = None,
    integration_roles: Callable[[], Iterable[str]] | None = None,
) -> AdminConsole:
    """Answer the `neonpoly` database on the service's listener."""
    console = AdminConsole(
        service, allowed_roles=allowed_roles, password=password, integration_roles=integration_roles
    )
    service.routes.admin = console
    if console.verifier is None and not console.loopback_only:
        log.warning(
            "admin database: no NEONPOLY_ADMIN_PASSWORD and the listener %s is not loopback: admin logins "
            "must pass the origin's password check, and a role the origin admits without one is refused",
            service.settings.listen[0],
        )
    return console


@dataclass(slots=True)
class _Portal:
    command: Command | None  # None: the empty query
    formats: tuple[int, ...] = ()


@dataclass(slots=True)
class AdminSession:
    """One admin connection: authentication, then simple and extended queries."""

    console: AdminConsole
    session: Session
    authenticated: bool = False
    login: ScramLogin | OriginLogin | None = None
    skipping: bool = False  # after an error in an extended batch, until Sync
    statements: dict[str, Command | None] = field(default_factory=dict)
    portals: dict[str, _Portal] = field(default_factory=dict)
    # With `console.gather`: frames waiting for the answer to an earlier one, in order.
    backlog: deque[tuple[int, bytes]] = field(default_factory=deque)
    draining: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        console, state = self.console, self.session.state
        allowed = console.allowed_roles
        if state.user not in allowed:
            hint = f"allowed roles: {', '.join(sorted(allowed))}"
            self.refuse("28000", f'role "{state.user}" may not use the neonpoly admin console', hint)
            return
        if console.verifier is not None:
            self.login = ScramLogin(self, console.verifier)
        elif (origin := console.origin_for(state.application_name)) is not None:
            self.login = OriginLogin(self, origin, need_password=not console.loopback_only)
        else:
            self.refuse(
                "28000",
                "the neonpoly admin console cannot authenticate anyone: it has no password and no origin to check one",
                NO_AUTH_HINT,
            )
            return
        self.login.start()

    # --- the LoginHost of the login -----------------------------------------------------

    @property
    def user(self) -> str:
        return self.session.state.user

    def write(self, data: bytes) -> None:
        if not self.session.closed:
            self.session.write_client(data)
        elif isinstance(self.login, OriginLogin):  # the client left during its login
            self.login.cancel()

    def refuse(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        if self.session.closed:
            return
        self.session.outcome = f"admin refused: {sqlstate}"
        self.session.write_client(pgwire.error_response(sqlstate, message, severity="FATAL", hint=hint))
        self.session.close()

    def admit(self) -> None:
        if self.session.closed:
            return
        self.login = None
        self.authenticated = True
        state = self.session.state
        params = {
            "server_version": SERVER_VERSION,
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "TimeZone": "UTC",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "application_name": state.application_name,
            "is_superuser": "off",
        }
        out = [pgwire.AUTH_OK]
        out.extend(pgwire.parameter_status(k, v) for k, v in params.items())
        out.append(pgwire.backend_key_data(*self.session.proxy_key))
        out.append(pgwire.ready_for_query(b"I"))
        self.session.write_client(b"".join(out))

    # --- input -------------------------------------------------------------------------

    def feed(self, buf: bytearray) -> None:
        frames, used = pgwire.scan_frames(buf, allowed=pgwire.FRONTEND_TYPES, large=pgwire.FRONTEND_LARGE_TYPES)
        data = bytes(buf[:used])
        del buf[:used]
        out: list[bytes] = []
        for index, (mtype, start, end) in enumerate(frames):
            if self.session.closed:
                return
            body = data[start + 5 : end]
            if not self.authenticated:
                if self.login is not None:
                    self.login.client(mtype, body)
                continue
            if self.console.gather is not None:
                self.backlog.extend((m, data[s + 5 : e]) for m, s, e in frames[index:])
                self.session.write_client(b"".join(out))
                if self.draining is None:
                    self.draining = asyncio.get_running_loop().create_task(self._drain())
                return
            if mtype == 0x58:  # Terminate
                self.session.write_client(b"".join(out))
                self.session.outcome = "client terminated"
                self.session.close()
                return
            if mtype == 0x51:
                self._simple(pgwire.query_text(body), out)
            elif mtype == 0x53:  # Sync ends a batch, and the error state of one
                self.skipping = False
                out.append(pgwire.ready_for_query(b"I"))
            elif mtype == 0x48:  # Flush: everything is written at the end of feed anyway
                pass
            elif not self.skipping:
                try:
                    self._extended(mtype, body, out)
                except AdminError as exc:
                    out.append(pgwire.error_response(exc.sqlstate, exc.message, hint=exc.hint))
                    self.skipping = True
        self.session.write_client(b"".join(out))

    async def _drain(self) -> None:
        """Answer the backlog frame by frame, awaiting each statement's answer from every
        worker; the same replies as `feed` gives in one process."""
        assert self.console.gather is not None
        gather = self.console.gather
        try:
            while self.backlog and not self.session.closed:
                mtype, body = self.backlog.popleft()
                out: list[bytes] = []
                if mtype == 0x58:  # Terminate
                    self.session.outcome = "client terminated"
                    self.session.close()
                    return
                if mtype == 0x51:
                    await self._simple_gathered(pgwire.query_text(body), out, gather)
                elif mtype == 0x53:
                    self.skipping = False
                    out.append(pgwire.ready_for_query(b"I"))
                elif mtype != 0x48 and not self.skipping:
                    try:
                        if mtype == 0x45:  # Execute: the one message that runs a statement
                            portal = self._portal(pgwire.parse_execute(body).portal)
                            if portal.command is None:
                                out.append(pgwire.EMPTY_QUERY)
                            else:
                                result = await gather(portal.command)
                                out.extend(_data_row(result.columns, row, portal.formats) for row in result.rows)
                                out.append(pgwire.command_complete(result.tag))
                        else:
                            self._extended(mtype, body, out)
                    except AdminError as exc:
                        out.append(pgwire.error_response(exc.sqlstate, exc.message, hint=exc.hint))
                        self.skipping = True
                if out and not self.session.closed:
                    self.session.write_client(b"".join(out))
        finally:
            self.draining = None

    async def _simple_gathered(
        self, sql: str, out: list[bytes], gather: Callable[[Command], Awaitable[Result]]
    ) -> None:
        statements = [s for s in sql.split(";") if s.strip()]
        if not statements:
            out.append(pgwire.EMPTY_QUERY)
        for text in statements:
            try:
                result = await gather(parse(text))
            except AdminError as exc:
                out.append(pgwire.error_response(exc.sqlstate, exc.message, hint=exc.hint))
                break
            if result.columns:
                out.append(_row_description(result.columns, ()))
            out.extend(_data_row(result.columns, row, ()) for row in result.rows)
            out.append(pgwire.command_complete(result.tag))
        out.append(pgwire.ready_for_query(b"I"))

    def _simple(self, sql: str, out: list[bytes]) -> None:
        statements = [s for s in sql.split(";") if s.strip()]
        if not statements:
            out.append(pgwire.EMPTY_QUERY)
        for text in statements:
            try:
                result = self.console.executor.run(parse(text))
            except AdminError as exc:
                out.append(pgwire.error_response(exc.sqlstate, exc.message, hint=exc.hint))
                break
            if result.columns:
                out.append(_row_description(result.columns, ()))
            out.extend(_data_row(result.columns, row, ()) for row in result.rows)
            out.append(pgwire.command_complete(result.tag))
        out.append(pgwire.ready_for_query(b"I"))

    def _extended(self, mtype: int, body: bytes, out: list[bytes]) -> None:
        if mtype == 0x50:  # Parse: check the statement now, as PostgreSQL does
            msg = pgwire.parse_parse(body)
            self.statements[msg.name] = parse(msg.query) if msg.query.strip(" \t\r\n;") else None
            out.append(pgwire.PARSE_COMPLETE)
        elif mtype == 0x42:  # Bind
            bind = pgwire.parse_bind(body)
            if bind.statement not in self.statements:
                raise AdminError("26000", f'prepared statement "{bind.statement}" does not exist')
            formats = _result_formats(bind.tail)
            self.portals[bind.portal] = _Portal(self.statements[bind.statement], formats)
            out.append(pgwire.BIND_COMPLETE)
        elif mtype == 0x44:  # Describe
            target = pgwire.parse_target(body)
            if target.kind == b"S":
                if target.name not in self.statements:
                    raise AdminError("26000", f'prepared statement "{target.name}" does not exist')
                command, formats = self.statements[target.name], tuple[int, ...]()
                out.append(pgwire.frame(b"t", b"\x00\x00"))  # no parameters
            else:
                portal = self._portal(target.name)
                command, formats = portal.command, portal.formats
            columns = columns_of(command) if command is not None else ()
            out.append(_row_description(columns, formats) if columns else pgwire.NO_DATA)
        elif mtype == 0x45:  # Execute
            portal = self._portal(pgwire.parse_execute(body).portal)
            if portal.command is None:
                out.append(pgwire.EMPTY_QUERY)
                return
            result = self.console.executor.run(portal.command)
            out.extend(_data_row(result.columns, row, portal.formats) for row in result.rows)
            out.append(pgwire.command_complete(result.tag))
        elif mtype == 0x43:  # Close
            target = pgwire.parse_target(body)
            (self.statements if target.kind == b"S" else self.portals).pop(target.name, None)
            out.append(pgwire.CLOSE_COMPLETE)
        else:  # FunctionCall, COPY data: nothing here takes them
            raise AdminError("0A000", "the neonpoly admin console does not support this message")

    def _portal(self, name: str) -> _Portal:
        portal = self.portals.get(name)
        if portal is None:
            raise AdminError("34000", f'portal "{name}" does not exist')
        return portal


# --- encoding -----------------------------------------------------------------------------


def _result_formats(tail: bytes) -> tuple[int, ...]:
    """The result-format codes at the end of a Bind (after parameter formats and values)."""
    try:
        pos = 0
        (nformats,) = struct.unpack_from("!h", tail, pos)
        pos += 2 + 2 * nformats
        (nparams,) = struct.unpack_from("!h", tail, pos)
        pos += 2
        if nparams:
            raise AdminError("42P02", "admin statements take no parameters")
        (nresults,) = struct.unpack_from("!h", tail, pos)
        pos += 2
        return struct.unpack_from(f"!{nresults}h", tail, pos)
    except struct.error as exc:
        raise AdminError("08P01", f"malformed Bind message: {exc}") from exc


def _format(formats: Sequence[int], i: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[i]


def _row_description(columns: Sequence[tuple[str, int]], formats: Sequence[int]) -> bytes:
    sizes = {BOOL: 1, INT8: 8, FLOAT8: 8, TIMESTAMPTZ: 8}
    parts = [struct.pack("!h", len(columns))]
    for i, (name, oid) in enumerate(columns):
        parts.append(pgwire.cstr(name) + struct.pack("!ihihih", 0, 0, oid, sizes.get(oid, -1), -1, _format(formats, i)))
    return pgwire.frame(b"T", b"".join(parts))


def _data_row(columns: Sequence[tuple[str, int]], row: Sequence[Value], formats: Sequence[int]) -> bytes:
    parts = [struct.pack("!h", len(row))]
    for i, ((_, oid), value) in enumerate(zip(columns, row, strict=True)):
        if value is None:
            parts.append(struct.pack("!i", -1))
            continue
        enc = _binary(oid, value) if _format(formats, i) == 1 else _text(oid, value).encode()
        parts.append(struct.pack("!i", len(enc)) + enc)
    return pgwire.frame(b"D", b"".join(parts))


def _text(oid: int, value: Value) -> str:
    if oid == BOOL:
        return "t" if value else "f"
    if oid == FLOAT8:
        v = float(value)  # type: ignore[arg-type]
        if v != v:
            return "NaN"
        if v in (float("inf"), float("-inf")):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if oid == TIMESTAMPTZ and isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return str(value)


def _binary(oid: int, value: Value) -> bytes:
    if oid == BOOL:
        return b"\x01" if value else b"\x00"
    if oid == INT8:
        return struct.pack("!q", int(value))  # type: ignore[arg-type]
    if oid == FLOAT8:
        return struct.pack("!d", float(value))  # type: ignore[arg-type]
    if oid == TIMESTAMPTZ and isinstance(value, datetime):
        delta = value - _PG_EPOCH
        micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
        return struct.pack("!q", micros)
    return str(value).encode()

"""One login to an origin: to check a URL before it is recorded (`integrations add`), and to
list the databases and roles the Manage drawer offers (local and URL origins; Neon origins
are listed through the Neon API).

The login is made as the proxy would make it (the origin's host as TLS SNI even when
`--connect-to` dials elsewhere) and never reads PGPASSWORD or ~/.pgpass: what is checked is
what was given.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any

from neonpoly.defaults import ORIGIN_CHECK_TIMEOUT
from neonpoly.integrations.discovery import parse_connect_to
from neonpoly.integrations.store import IntegrationError
from neonpoly.proxy.origin import Origin

DATABASES_SQL = (
    "SELECT datname FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
)
ROLES_SQL = "SELECT rolname FROM pg_catalog.pg_roles WHERE rolcanlogin ORDER BY 1"


class OriginCheckError(IntegrationError):
    """The origin could not be reached or refused the login; one line for the user."""


@dataclass(frozen=True, slots=True)
class OriginChoices:
    """What the origin offers the role that logged in."""

    databases: tuple[str, ...]
    roles: tuple[str, ...]


class _NamedContext(ssl.SSLContext):
    """A TLS context that always sends `sni` as the server name: asyncpg names the host it
    dials, which under --connect-to is not the origin's (Neon routes by SNI)."""

    sni: str | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, self.sni or server_hostname, session)


def _ssl(origin: Origin) -> Any:
    """asyncpg's `ssl=` for the origin's sslmode, as libpq means it."""
    if origin.sslmode == "disable":
        return False
    if origin.sslmode in ("allow", "prefer"):
        return origin.sslmode
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sni = origin.host
    if origin.sslmode == "require":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        if origin.sslrootcert:
            ctx.load_verify_locations(cafile=origin.sslrootcert)
        else:
            ctx.load_default_certs()
        ctx.check_hostname = origin.sslmode == "verify-full"
    return ctx


def url_origin(url: str, connect_to: str | None = None) -> Origin:
    """The origin a URL names, redirected by a `--connect-to` rule that matches it."""
    try:
        origin = Origin.from_url(url)
    except ValueError as exc:
        raise IntegrationError(str(exc)) from exc
    if connect_to:
        try:
            rule = parse_connect_to(connect_to)
        except ValueError as exc:
            raise IntegrationError(f"--connect-to: {exc}") from exc
        if rule.matches(origin.host, origin.port):
            origin = origin.connecting_to(*rule.target(origin.host, origin.port))
    return origin


async def list_choices(
    origin: Origin,
    *,
    user: str,
    password: str | None,
    database: str,
    timeout: float = ORIGIN_CHECK_TIMEOUT,
) -> OriginChoices | None:
    """Log in to `origin` and list its databases (that accept connections, no templates) and
    login roles. None when the role must give a password and none is known: the origin
    answered, the login itself could not be tried. Raises OriginCheckError (one line)."""
    import asyncpg

    host, port = origin.dial
    where = origin.label
    try:
        conn = await asyncpg.connect(
            host=host,
            port=port,
            user=user,
            password=password or "",  # "" rather than None: never PGPASSWORD or ~/.pgpass
            database=database,
            ssl=_ssl(origin),
            timeout=timeout,
            statement_cache_size=0,
            server_settings={"application_name": "neonpoly (origin check)"},
        )
    except asyncpg.InvalidPasswordError as exc:
        if not password:
            return None
        raise OriginCheckError(
            f"the origin {where} refused role {user!r}: password authentication failed "
            "(a wrong password, or no such role)"
        ) from exc
    except asyncpg.InvalidCatalogNameError as exc:
        raise OriginCheckError(f"the origin {where} has no database {database!r}") from exc
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise OriginCheckError(f"the origin {where} refused role {user!r}: {_first_line(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise OriginCheckError(f"the origin {where} refused the login: {_first_line(exc)}") from exc
    except TimeoutError as exc:
        raise OriginCheckError(f"cannot reach the origin {where}: no answer within {timeout:g}s") from exc
    except socket.gaierror as exc:
        raise OriginCheckError(f"cannot reach the origin {where}: unknown host {origin.dial[0]!r}") from exc
    except ConnectionRefusedError as exc:
        raise OriginCheckError(f"cannot reach the origin {where}: connection refused (nothing listens there)") from exc
    except ssl.SSLError as exc:
        raise OriginCheckError(
            f"TLS with the origin {where} failed (sslmode={origin.sslmode}): {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise OriginCheckError(f"cannot reach the origin {where}: {exc.strerror or exc}") from exc
    except (asyncpg.InterfaceError, ConnectionError) as exc:
        raise OriginCheckError(f"cannot talk to the origin {where}: {_first_line(exc)}") from exc
    try:
        databases = tuple(r[0] for r in await conn.fetch(DATABASES_SQL, timeout=timeout))
        roles = tuple(r[0] for r in await conn.fetch(ROLES_SQL, timeout=timeout))
    except (asyncpg.PostgresError, TimeoutError) as exc:
        raise OriginCheckError(
            f"the origin {where} would not list its databases and roles: {_first_line(exc)}"
        ) from exc
    finally:
        try:
            await conn.close(timeout=timeout)
        except Exception:  # closing is best effort; the answer is in hand
            conn.terminate()
    return OriginChoices(databases, roles)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

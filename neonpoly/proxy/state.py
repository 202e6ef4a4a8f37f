"""What a session knows about its own state, and the part of it that keys cached answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from neonpoly.pgwire import TX_IDLE
from neonpoly.proxy.identity import Identity


class Phase(StrEnum):
    """Where a session is in its life (SHOW CONNECTIONS shows the value)."""

    STARTUP = "startup"  # reading the startup packet (again after a TLS upgrade)
    TLS = "tls"  # the TLS handshake with the client is under way
    CONNECTING = "connecting"  # dialling the origin; client bytes wait
    AUTH = "auth"  # authentication relayed between client and origin
    READY = "ready"  # relaying (and caching) queries
    ADMIN = "admin"  # answered by the admin console, no origin
    CANCEL = "cancel"  # a CancelRequest connection, closed once the cancel is delivered


# The members as module constants, for `session.phase is READY`: `Phase.READY` goes through
# the enum's metaclass (~0.1 us on Python 3.11), and the phase is checked on every read.
STARTUP = Phase.STARTUP
TLS = Phase.TLS
CONNECTING = Phase.CONNECTING
AUTH = Phase.AUTH
READY = Phase.READY
ADMIN = Phase.ADMIN
CANCEL = Phase.CANCEL
LOGGING_IN = frozenset((STARTUP, TLS, CONNECTING, AUTH))  # what the login timeout cuts short


@dataclass(slots=True)
class SessionState:
    user: str = ""
    database: str = ""
    application_name: str = ""
    tx_status: bytes = TX_IDLE
    bypass: str | None = None  # why this session is never cached (a replication connection)
    # The server-derived identity (see identity.py); None while it is unknown or being
    # learned again, and then nothing is cached for the session.
    identity: Identity | None = None
    server_params: dict[str, str] = field(default_factory=dict)
    _context: bytes | None = None
    # It may hold temporary objects: its identity said so, or it ran code or DDL (which may
    # make them) since its identity was last learned. Their end (DISCARD TEMP/ALL, the
    # session's end) drops them with no DDL statement: other sessions' catalog helpers see them.
    temp_objects: bool = False

    def apply_startup(self, params: Mapping[str, str]) -> None:
        if "replication" in {name.lower() for name in params}:
            self.bypass = "a replication connection"

    # No text from this session can be trusted (nothing is cached, its statements evict the
    # database): standard_conforming_strings off (backslashes escape in '…' strings, which
    # the parser neonpoly uses does not model), or text not in UTF-8 (neonpoly reads SQL as
    # UTF-8: a LATIN1 client's "café" is not the relation the server finds). Why: `unreadable`.
    legacy_strings: bool = False
    unreadable: str = ""

    def parameter(self, name: str, value: str) -> bool:
        """A ParameterStatus from the origin; True when it changed a value already known
        (the session's identity must then be learned again)."""
        before = self.server_params.get(name)
        self.server_params[name] = value
        if name in ("standard_conforming_strings", "client_encoding", "server_encoding"):
            self.unreadable = _unreadable(self.server_params)
            self.legacy_strings = bool(self.unreadable)
        return before is not None and before != value

    def learned(self, identity: Identity | None) -> None:
        self.identity = identity
        self._context = None
        if identity is not None:
            self.temp_objects = identity.temp  # the server's word, asked at an idle moment

    def context(self) -> bytes:
        """The result-changing part of the session, as bytes for the cache key (only while the
        identity is known)."""
        if self._context is None:
            self._context = self.database.encode() + b"\x00" + (self.identity.key if self.identity else b"")
        return self._context


def _unreadable(params: Mapping[str, str]) -> str:
    """Why the session's text is not read as the server reads it ("" when it is)."""
    if params.get("standard_conforming_strings") == "off":
        return "standard_conforming_strings is off: text not read as the server reads it"
    client = params.get("client_encoding", "UTF8").upper().replace("-", "")
    server = params.get("server_encoding", "UTF8").upper().replace("-", "")
    # SQL_ASCII: no conversion; into a UTF-8 database the server still checks it is UTF-8.
    if client != "UTF8" and not (client == "SQL_ASCII" and server == "UTF8"):
        return f"client_encoding is {client}: neonpoly reads SQL as UTF-8, names would not match"
    if server == "SQL_ASCII":
        return "the database's encoding is SQL_ASCII: names may be in any encoding"
    return ""

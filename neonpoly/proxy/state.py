"""What a session knows about its own state, and the part of it that keys cached answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from neonpoly.pgwire import TX_IDLE
from neonpoly.proxy.identity import Identity


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

    def apply_startup(self, params: Mapping[str, str]) -> None:
        if "replication" in {name.lower() for name in params}:
            self.bypass = "a replication connection"

    # standard_conforming_strings off: backslashes escape in '…' strings, which the parser
    # neonpoly uses does not model, so no text from this session can be trusted.
    legacy_strings: bool = False

    def parameter(self, name: str, value: str) -> bool:
        """A ParameterStatus from the origin; True when it changed a value already known
        (the session's identity must then be learned again)."""
        before = self.server_params.get(name)
        self.server_params[name] = value
        if name == "standard_conforming_strings":
            self.legacy_strings = value == "off"
        return before is not None and before != value

    def learned(self, identity: Identity | None) -> None:
        self.identity = identity
        self._context = None

    def context(self) -> bytes:
        """The result-changing part of the session, as bytes for the cache key (only while the
        identity is known)."""
        if self._context is None:
            self._context = self.database.encode() + b"\x00" + (self.identity.key if self.identity else b"")
        return self._context

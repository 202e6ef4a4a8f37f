"""What a session needs from the listener that accepted it.

The session depends on this protocol, never on the listener itself (server.py's
ProxyServer, which satisfies it): the server imports the session to make sessions, and the
session does not import the server back, as an HTTP connection does not know its pool.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from neonpoly.proxy.routes import Refusal, Route
    from neonpoly.proxy.state import SessionState

# The session type: a host registers and forgets the very sessions it made.
S = TypeVar("S", contravariant=True)


class SessionHost(Protocol[S]):
    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """Offered to clients that ask for TLS; None: SSLRequest is declined."""

    @property
    def connect_timeout(self) -> float: ...

    @property
    def login_timeout(self) -> float:
        """Seconds a client has to finish logging in (PostgreSQL's authentication_timeout)."""

    def route_for(self, state: SessionState) -> tuple[Route | None, Refusal | None]:
        """Where a session with this startup state goes, or None and why not."""

    def cancel(self, pid: int, secret: bytes, done: Callable[[], None] | None = None) -> None:
        """A CancelRequest arrived with this key; `done` runs once it was dealt with."""

    def register_key(self, session: S) -> None:
        """The session now has its cancel key (`proxy_key`)."""

    def forget(self, session: S) -> None:
        """The session closed."""

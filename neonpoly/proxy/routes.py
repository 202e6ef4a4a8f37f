"""Where a session goes: its cache and origin, or the admin console.

The listener (server.py) holds the table and picks a route for each session; the session
follows it. Both import this module, and it imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from neonpoly.proxy.origin import Origin

if TYPE_CHECKING:
    from neonpoly import pgwire
    from neonpoly.cache.query_cache import QueryCache


class AdminHandler(Protocol):
    """Answers one session's messages itself (the admin console)."""

    def feed(self, buf: bytearray) -> None:
        """Consume complete frames from `buf` (delete what was used); reply via
        `session.write_client`, end with `session.close()`."""


class AdminEndpoint(Protocol):
    """Something that answers a session itself instead of relaying it (the admin console)."""

    # `session` is the proxy.session.Session attaching itself. It is Any because this module
    # sits below the session (which imports it); the console names the real type.
    def attach(self, session: Any, startup: pgwire.StartupRequest) -> AdminHandler: ...


@dataclass(slots=True)
class Route:
    """Where a session goes: its cache (None = pass-through) and origin, or the admin."""

    cache_id: str
    origin: Origin
    cache: QueryCache | None = None
    admin: AdminEndpoint | None = None


@dataclass(slots=True)
class Routes:
    """The caches this listener serves, by cache id; `default` takes unnamed clients."""

    by_id: dict[str, Route] = field(default_factory=dict)
    default: str | None = None
    removed: set[str] = field(default_factory=set)
    admin: AdminEndpoint | None = None
    admin_database: str = "neonpoly"

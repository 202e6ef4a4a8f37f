"""Where a session goes: its cache and origin, or the admin console.

The listener (server.py) holds the table and picks a route for each session; the session
follows it. Both import this module, and it imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

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


class Refusal(NamedTuple):
    """Why a session has no route: the FATAL's message, and a hint on how to get served."""

    message: str
    hint: str | None = None


@dataclass(slots=True)
class Routes:
    """The caches this listener serves, by cache id; `default` takes unnamed clients."""

    by_id: dict[str, Route] = field(default_factory=dict)
    default: str | None = None
    removed: set[str] = field(default_factory=set)
    admin: AdminEndpoint | None = None
    admin_database: str = "neonpoly"
    # cache id -> the integration's name, for people (refusals name what is served by it).
    names: dict[str, str] = field(default_factory=dict)

    def served(self) -> str:
        """What this listener serves and how to reach it, in one sentence (for refusals)."""
        if not self.by_id:
            return "this neonpoly serves no cache now: add an integration with `neonpoly integrations add`"
        if list(self.by_id) == ["default"] and "default" not in self.names:
            return (
                f"this neonpoly serves only its --upstream {self.by_id['default'].origin.label} (connect without "
                "application_name); `neonpoly serve` without --upstream serves the state dir's integrations"
            )
        listed = ", ".join(
            f"{self.names[cid]} (application_name={cid})" if cid in self.names else f"application_name={cid}"
            for cid in sorted(self.by_id, key=lambda c: (self.names.get(c, c), c))
        )
        return (
            f"this neonpoly serves {listed}; `neonpoly connection-string NAME` prints one's string, "
            "`neonpoly integrations add` adds another"
        )

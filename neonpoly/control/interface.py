"""The one facade the TUI and the CLI call: integrations, caches, stats.

It owns a running `ProxyService` (the proxy in the background) and the integration state
on disk. Every method that may take time is async; everything else is a cheap read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from neonpoly.stats import StatsSnapshot

OriginKind = Literal["neon", "url", "embedded"]


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """What the console's header shows: where we are and whether the proxy runs."""

    project: str  # project name, or "local"
    region: str | None
    branch: str | None  # primary branch name, or None for local origins
    listen: str  # "127.0.0.1:6543"
    running: bool


@dataclass(frozen=True, slots=True)
class IntegrationView:
    cache_id: str  # a UUID, also the application_name clients send
    name: str  # e.g. "shop-main"
    workspace: str
    kind: OriginKind
    origin_label: str  # "ep-dawn-king-a527wlyu.us-east-2.aws.neon.tech:5432" or "127.0.0.1:5432"
    endpoint_id: str | None
    endpoint_state: str | None  # "active" | "idle" | "init" | None for local origins
    branch: str | None
    project: str | None
    databases: tuple[str, ...]
    roles: tuple[str, ...]
    database: str  # the chosen database (drives the connection string)
    role: str  # the chosen role
    # False when neonpoly does not know the chosen role's password (another role of a URL
    # origin): its connection string then carries no password and the client must give it.
    password_known: bool = True


@dataclass(frozen=True, slots=True)
class CacheStatus:
    entries: int
    bytes: int
    connections: int
    calls: int
    hits: int
    hit_rate: float | None  # None before any cacheable query
    origin: str = ""  # "host:port" of the origin (never a password)
    endpoint_state: str | None = None  # Neon endpoint state as last discovered
    freshness: Freshness | None = None  # None when the proxy has not reported it (not served)


@dataclass(frozen=True, slots=True)
class Freshness:
    """How the cache learns of writes that bypass it (the origin's change feed)."""

    feed: str  # "on (lag 1 ms)", "off: wal_level is replica", "idle: …" (the report's summary)
    following: bool  # the feed is live: direct writes on the origin evict too
    changes: int  # committed transactions the feed applied
    ddl: int  # catalog changes it caught
    gaps: int  # evictions for a gap in the feed (connect, reconnect, idle close)
    last_change: float | None  # Unix time of the last change applied
    plane: str = "off"  # the shared invalidation plane (`serve --redis`): "up, 2 nodes, lag 1 ms", "down: …"
    slot: str = ""  # the feed's replication slot(s) on the origin ("" while it has none)


@dataclass(frozen=True, slots=True)
class SignInResult:
    mode: Literal["neon", "local"]
    account: str  # what we are signed in as ("Neon API key …abcd" or "local")
    workspaces: tuple[str, ...]


Progress = Callable[[str], None]


class ControlError(Exception):
    """A failure to show the user as one line (inline in the TUI, stderr in the CLI)."""


class Control:
    """Interface; `neonpoly.control.local.LocalControl` and `neonpoly.control.attached.AttachedControl` implement it."""

    def header(self) -> HeaderInfo:
        raise NotImplementedError

    def integrations(self) -> list[IntegrationView]:
        raise NotImplementedError

    async def sign_in(self, api_key: str | None = None) -> SignInResult:
        raise NotImplementedError

    async def add(self, workspace: str, progress: Progress) -> IntegrationView:
        raise NotImplementedError

    def select(
        self, cache_id: str, *, database: str | None = None, role: str | None = None
    ) -> IntegrationView:
        raise NotImplementedError

    async def refresh_choices(self, cache_id: str) -> IntegrationView:
        """Ask the origin again which databases and roles it offers (local and URL origins:
        one login with the integration's stored credentials, `pg_database` that allow
        connections minus templates, `pg_roles` that can log in); the view's `databases` and
        `roles` are updated (the chosen ones always stay listed) and recorded in the state dir.
        Neon origins keep the lists the Neon API gave at Add. Raises ControlError (one line)
        when the origin cannot be reached or refuses. This default lists nothing new."""
        for view in self.integrations():
            if view.cache_id == cache_id or view.name == cache_id:
                return view
        raise ControlError(f"no integration {cache_id!r}")

    def connection_string(self, cache_id: str, *, reveal: bool = False) -> str:
        raise NotImplementedError

    def status(self, cache_id: str) -> CacheStatus:
        raise NotImplementedError

    def stats(self, cache_id: str | None = None) -> StatsSnapshot:
        raise NotImplementedError

    async def purge(self, cache_id: str) -> int:
        raise NotImplementedError

    async def purge_template(self, cache_id: str, template_id: str) -> int:
        """Drop one query template's cached results; returns the entries removed."""
        raise NotImplementedError

    async def remove(self, cache_id: str) -> int:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

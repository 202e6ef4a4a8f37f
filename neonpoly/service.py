"""The composition root: builds a running proxy from settings (CLI, TUI and tests share it)."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neonpoly.cache.query_cache import DEFAULT_ADMIT_AFTER, DEFAULT_TTL, QueryCache
from neonpoly.cache.store import CacheStore, MemoryStore, open_store
from neonpoly.proxy.origin import Origin
from neonpoly.proxy.server import ProxyServer, Route, Routes
from neonpoly.stats import StatsRecorder

log = logging.getLogger("neonpoly.service")

DEFAULT_LISTEN = ("127.0.0.1", 6543)
DEFAULT_MAX_CACHE_BYTES = 1 << 30
DEFAULT_L1_BYTES = 128 << 20


@dataclass(slots=True)
class CacheSettings:
    enabled: bool = True
    ttl: float = DEFAULT_TTL
    admit_after: int = DEFAULT_ADMIT_AFTER
    max_bytes: int = DEFAULT_MAX_CACHE_BYTES
    l1_bytes: int = DEFAULT_L1_BYTES
    max_entry_bytes: int | None = None


@dataclass(slots=True)
class ProxySettings:
    listen: tuple[str, int] = DEFAULT_LISTEN
    cache_dir: Path | None = None
    cache: CacheSettings = field(default_factory=CacheSettings)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout: float = 10.0
    login_timeout: float = 60.0  # PostgreSQL's authentication_timeout default


class ProxyService:
    """The proxy's engine objects, and the operations on caches that CLI and TUI share."""

    def __init__(self, settings: ProxySettings, stats: StatsRecorder | None = None) -> None:
        self.settings = settings
        self.stats = stats or StatsRecorder()
        self.routes = Routes()
        # Called with each Route add_cache creates (the admin console attaches TTL policies).
        self.cache_added: list[Callable[[Route], None]] = []
        tls = None
        if settings.tls_cert is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(settings.tls_cert, settings.tls_key)
        self.server = ProxyServer(
            self.routes, tls_context=tls, connect_timeout=settings.connect_timeout, login_timeout=settings.login_timeout
        )

    def cache_dir(self, cache_id: str) -> Path | None:
        if self.settings.cache_dir is None:
            return None
        return self.settings.cache_dir / cache_id

    def add_cache(self, cache_id: str, origin: Origin, *, default: bool = False) -> Route:
        """Start serving a cache (an integration) on this listener."""
        cache = None
        conf = self.settings.cache
        store: CacheStore
        if conf.enabled:
            directory = self.cache_dir(cache_id)
            if directory is None:
                store = MemoryStore(conf.l1_bytes, max_entry_bytes=conf.max_entry_bytes)
            else:
                store = open_store(
                    directory, conf.max_bytes, conf.l1_bytes, time.time, max_entry_bytes=conf.max_entry_bytes
                )
            cache = QueryCache(cache_id, store, self.stats, ttl=conf.ttl, admit_after=conf.admit_after)
            cache.siblings = lambda: self._caches_of(origin, cache_id)
        route = Route(cache_id, origin, cache)
        self.routes.by_id[cache_id] = route
        for hook in self.cache_added:
            hook(route)
        self.routes.removed.discard(cache_id)
        if default or self.routes.default is None:
            self.routes.default = cache_id
        return route

    def _caches_of(self, origin: Origin, but: str) -> list[QueryCache]:
        """The other caches a write through this one may make stale: all of them. Whether two
        origins are the same server cannot be told from their addresses (localhost and
        127.0.0.1, a DNS alias, a pooler in front), and evicting by table name in a cache of
        another server only costs misses."""
        return [r.cache for r in self.routes.by_id.values() if r.cache is not None and r.cache_id != but]

    def remove_cache(self, cache_id: str) -> int:
        """Stop serving a cache: end its connections, drop its entries. Returns connections ended."""
        route = self.routes.by_id.pop(cache_id, None)
        self.routes.removed.add(cache_id)
        if self.routes.default == cache_id:
            self.routes.default = None
        ended = self.server.terminate(cache_id, f'terminating connection: neonpoly cache "{cache_id}" was removed')
        if route is not None and route.cache is not None:
            route.cache.purge()
            route.cache.close()
        self.stats.forget_cache(cache_id)
        return ended

    def purge(self, cache_id: str | None = None) -> int:
        total = 0
        for route in self.routes.by_id.values():
            if route.cache is not None and (cache_id is None or route.cache_id == cache_id):
                total += route.cache.purge()
        return total

    async def start(self) -> tuple[str, int]:
        host, port = self.settings.listen
        return await self.server.start(host, port)

    async def close(self, grace: float = 5.0) -> None:
        await self.server.close(grace)
        for route in self.routes.by_id.values():
            if route.cache is not None:
                route.cache.close()

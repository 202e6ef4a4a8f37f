"""The one engine assembly: listener, routes, caches with their TTL policies, and the read model.

`ProxyService` is what `serve`, the console's in-process proxy and the test fixtures run: the
same object with the same wiring (rules and adaptive TTL on every cache), so a test of the
proxy tests what users run. `report()` is the one read model of it: the admin console,
`/metrics` and both controls read their per-cache figures there, never from the parts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from neonpoly.cache.adaptive import AdaptiveTTL
from neonpoly.cache.keys import feed_names
from neonpoly.cache.query_cache import DEFAULT_ADMIT_AFTER, DEFAULT_TTL, QueryCache
from neonpoly.cache.rules import RuleBook, RulePolicy, bare_tables
from neonpoly.cache.siblings import SiblingBoard
from neonpoly.cache.store import CacheStore, MemoryStore, open_store
from neonpoly.defaults import DEFAULT_L1_BYTES, DEFAULT_LISTEN, DEFAULT_MAX_CACHE_BYTES
from neonpoly.freshness.changefeed import ChangeSink, FeedSettings, FeedStatus, FeedTarget
from neonpoly.freshness.feeds import FeedManager
from neonpoly.freshness.plane import PlaneSettings, PlaneStatus
from neonpoly.freshness.redis_plane import RedisPlane
from neonpoly.proxy.origin import Origin
from neonpoly.proxy.server import ProxyServer, Route, Routes
from neonpoly.stats import StatsRecorder, TemplateStats, Totals

log = logging.getLogger("neonpoly.service")


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
    rules_dir: Path | None = None  # where rules.toml persists; None keeps rules in memory
    change_feed: FeedSettings = field(default_factory=FeedSettings)
    reuse_port: bool = False  # SO_REUSEPORT: several processes share the listener (`serve --workers`)
    redis: PlaneSettings | None = None  # the shared invalidation plane (`serve --redis`)
    siblings: SiblingBoard | None = None  # generations shared with the other workers (`serve --workers N`)


@dataclass(frozen=True, slots=True)
class TemplateReport:
    """One query template's figures with the TTL its cache applies now and why."""

    stats: TemplateStats
    ttl: float | None
    ttl_source: str


@dataclass(frozen=True, slots=True)
class CacheReport:
    """One cache (an integration served on the listener) as every reader sees it."""

    cache_id: str
    is_default: bool
    mode: str  # the rules mode ("auto", "fixed", "off"), or "disabled" without a cache
    origin: str  # "host:port", never a password
    ttl: float | None  # the cache's TTL cap; None without a cache
    entries: int  # live entries (expired ones are not counted)
    bytes: int
    max_bytes: int
    connections: int
    totals: Totals
    change_feed: str = ""  # "on (lag 3 ms)", "off: wal_level is replica", …
    feeds: tuple[FeedStatus, ...] = ()  # one per database of the origin followed
    plane: str = "off"  # the invalidation plane for this origin: "up, 2 nodes, lag 1 ms", "down: … (passing through)"


@dataclass(frozen=True, slots=True)
class ServiceReport:
    caches: tuple[CacheReport, ...]  # by cache id; includes caches removed while stats remain
    totals: Totals  # every cache together
    templates: tuple[TemplateReport, ...]  # most called first
    plane: PlaneStatus | None = None  # the shared invalidation plane (None without --redis)

    def cache(self, cache_id: str) -> CacheReport | None:
        return next((c for c in self.caches if c.cache_id == cache_id), None)


class ProxyService:
    """The proxy's engine objects, and the operations on caches that CLI and TUI share."""

    def __init__(
        self,
        settings: ProxySettings,
        stats: StatsRecorder | None = None,
        *,
        adaptive: AdaptiveTTL | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats or StatsRecorder()
        self.routes = Routes()
        self.rules = RuleBook.in_dir(settings.rules_dir) if settings.rules_dir is not None else RuleBook()
        self.adaptive = adaptive or AdaptiveTTL()
        self.policies: dict[str, RulePolicy] = {}  # cache id → the TTL policy of its cache
        # cache id → a name for people (the integration's), set by whoever adds the cache;
        # readers label with it (metrics' cache_name) and fall back to the id.
        self.names: dict[str, str] = self.routes.names
        tls = None
        if settings.tls_cert is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(settings.tls_cert, settings.tls_key)
        self.server = ProxyServer(
            self.routes,
            tls_context=tls,
            connect_timeout=settings.connect_timeout,
            login_timeout=settings.login_timeout,
            on_session_change=self._sessions_changed,
            reuse_port=settings.reuse_port,
        )
        # Who hears of changes the origin's feed reports: the caches. The invalidation plane
        # hears them from there (it observes every bump of the caches' generations).
        self.change_sinks: list[ChangeSink] = [_CacheSink(self.routes)]
        self.plane = RedisPlane(settings.redis, board=settings.siblings) if settings.redis is not None else None
        self.feeds = FeedManager(settings.change_feed, self.change_sinks, leases=self.plane)
        if self.plane is not None:
            self.plane.wants_leases = self.feeds.enabled
            self.plane.lease_listener = self.feeds.lease_changed
        self._sessions_pending = False
        self._routes_version = 0  # moves whenever `routes.by_id` does (`_caches_of`)
        self._siblings: dict[str, tuple[int, tuple[QueryCache, ...]]] = {}

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
            cache.siblings = partial(self._caches_of, cache_id)
            self._attach_policy(cache_id, cache)
            if self.plane is not None:
                self.plane.attach(cache, origin.label)
            self.feeds.watch(cache_id, feed_target(origin), origin.database or origin.user)
        route = Route(cache_id, origin, cache)
        self.routes.by_id[cache_id] = route
        self._routes_version += 1
        self.routes.removed.discard(cache_id)
        if default or self.routes.default is None:
            self.routes.default = cache_id
        return route

    def _attach_policy(self, cache_id: str, cache: QueryCache) -> None:
        """Rules decide each template's TTL, learned from refetches when the mode is auto."""
        stats = self.stats

        def report(template_id: str, ttl: float | None) -> None:
            stats.set_ttl(cache_id, template_id, ttl)

        policy = RulePolicy(self.rules, cache_id, lambda: cache.ttl, self.adaptive, report)
        # Longer TTLs while the change feed follows every table a query reads (adaptive.py).
        policy.feed_ttl = lambda tables: (
            ttl if (ttl := self.feeds.safety_ttl(cache_id)) is not None and cache.relations.followed(tables) else None
        )
        self.policies[cache_id] = policy
        cache.ttl_policy = policy
        cache.on_refetch = self.adaptive.on_refetch

    def _caches_of(self, but: str) -> tuple[QueryCache, ...]:
        """The other caches a write through this one may make stale: all of them. Whether two
        origins are the same server cannot be told from their addresses (localhost and
        127.0.0.1, a DNS alias, a pooler in front), and evicting by table name in a cache of
        another server only costs misses. Asked twice by every write: worked out again only
        after the caches served changed (`_routes_version`, moved wherever `by_id` is)."""
        found = self._siblings.get(but)
        if found is None or found[0] != self._routes_version:
            others = tuple([r.cache for r in self.routes.by_id.values() if r.cache is not None and r.cache_id != but])
            found = self._siblings[but] = (self._routes_version, others)
        return found[1]

    def remove_cache(self, cache_id: str) -> int:
        """Stop serving a cache: end its connections, drop its entries. Returns connections ended."""
        route = self.routes.by_id.pop(cache_id, None)
        self._routes_version += 1
        self._siblings.pop(cache_id, None)
        self.routes.removed.add(cache_id)
        if self.routes.default == cache_id:
            self.routes.default = None
        ended = self.server.terminate(cache_id, f'terminating connection: neonpoly cache "{cache_id}" was removed')
        if route is not None and route.cache is not None:
            if self.plane is not None:
                self.plane.detach(route.cache)
            route.cache.purge()
            route.cache.close()
        self.stats.forget_cache(cache_id)
        self.policies.pop(cache_id, None)
        self.names.pop(cache_id, None)
        self.feeds.unwatch(cache_id)
        return ended

    def _sessions_changed(self) -> None:
        """A session started or ended: tell the feeds which databases clients use (once per
        loop iteration, however many sessions changed)."""
        if self._sessions_pending:
            return
        self._sessions_pending = True
        asyncio.get_running_loop().call_soon(self._report_sessions)

    def _report_sessions(self) -> None:
        # Only sessions the origin accepted (it sent their backend key): a client naming
        # databases at random must not make neonpoly open feeds for them.
        self._sessions_pending = False
        self.feeds.sessions_changed(
            {
                (s.route.cache_id, s.state.database)
                for s in self.server.sessions
                if s.route is not None and s.route.cache is not None and s.origin_key is not None and s.state.database
            }
        )

    def purge(self, cache_id: str | None = None) -> int:
        total = 0
        for route in self.routes.by_id.values():
            if route.cache is not None and (cache_id is None or route.cache_id == cache_id):
                total += route.cache.purge()
        return total

    def report(self, cache_id: str | None = None) -> ServiceReport:
        """The read model: every figure a reader shows, computed here once."""
        snapshot = self.stats.snapshot(cache_id)
        names = sorted(set(self.routes.by_id) | set(snapshot.caches))
        caches = tuple(self._cache_report(cid) for cid in names if cache_id is None or cid == cache_id)
        templates = tuple(self._template_report(t) for t in snapshot.templates)
        plane = self.plane.status() if self.plane is not None else None
        return ServiceReport(caches, snapshot.totals, templates, plane)

    def _cache_report(self, cache_id: str) -> CacheReport:
        route = self.routes.by_id.get(cache_id)
        cache = route.cache if route is not None else None
        entries = size = max_bytes = 0
        if cache is not None:
            usage = cache.store.usage()
            entries, size, max_bytes = usage.entries, usage.bytes, usage.max_bytes
        return CacheReport(
            cache_id=cache_id,
            is_default=cache_id == self.routes.default,
            mode=self.rules.mode(cache_id) if cache is not None else "disabled",
            origin=route.origin.label if route is not None else "",
            ttl=cache.ttl if cache is not None else None,
            entries=entries,
            bytes=size,
            max_bytes=max_bytes,
            connections=len(self.server.connections(cache_id)),
            totals=self.stats.snapshot(cache_id).totals,
            change_feed=self.feeds.summary(cache_id) if cache is not None else "off: no cache",
            feeds=self.feeds.statuses(cache_id),
            plane=self._plane_summary(route),
        )

    def _plane_summary(self, route: Route | None) -> str:
        if self.plane is None:
            return "off"
        if route is None or route.cache is None:
            return "off: no cache"
        return self.plane.status().summary(route.origin.label)

    def _template_report(self, t: TemplateStats) -> TemplateReport:
        counts = dict(t.by_status)
        if counts.get("hit", 0) + counts.get("miss", 0) + counts.get("disabled", 0) == 0:
            return TemplateReport(t, None, "not cacheable")
        policy = self.policies.get(t.cache_id)
        if policy is None:
            return TemplateReport(t, t.ttl, "cache")
        names = bare_tables(t.tables)
        feed = policy.feed_ttl(frozenset(names)) if policy.feed_ttl is not None else None
        decision = policy.decide(t.template_id, names, feed)
        return TemplateReport(t, decision.ttl, decision.source)

    async def start(self) -> tuple[str, int]:
        """Join the invalidation plane (it decides which node runs each origin's feed), open
        the change feeds (with `--change-feed on`, raise FeedUnavailable when the origin has
        none to give), then listen."""
        if self.plane is not None:
            await self.plane.start()
        await self.feeds.start()
        host, port = self.settings.listen
        return await self.server.start(host, port)

    async def close(self, grace: float = 5.0) -> None:
        await self.server.close(grace)
        await self.feeds.close()
        if self.plane is not None:
            await self.plane.close()
        for route in self.routes.by_id.values():
            if route.cache is not None:
                route.cache.close()


def feed_target(origin: Origin) -> FeedTarget:
    host, port = origin.dial
    return FeedTarget(
        key=origin.label,
        host=origin.host,
        port=origin.port,
        dial_host=host,
        dial_port=port,
        sslmode=origin.sslmode,
        sslrootcert=origin.sslrootcert,
        user=origin.user,
        password=origin.password,
    )


class _CacheSink:
    """The caches' ear on the feed: a change bumps the tables (or the database) in every
    cache of that origin. `QueryCache.invalidate` fans out from one cache to its siblings."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes

    def on_change(
        self,
        origin_key: str,
        database: str | None,
        tables: frozenset[str],
        everything: bool,
        rows: Mapping[str, Mapping[str, frozenset[int]]],
    ) -> None:
        cache = next(
            (r.cache for r in self.routes.by_id.values() if r.cache is not None and r.origin.label == origin_key),
            None,
        )
        if cache is None:
            return
        if everything or database is None:
            cache.invalidate(database, frozenset(), True)
        else:
            # Keys where every cache's relation book agrees on the key column (cache/keys.py).
            caches = (cache, *cache.siblings())
            names = feed_names(tables, rows, lambda t: [c.relations.key_column(database, t) for c in caches])
            cache.invalidate(database, names, False, (tables, False))

"""Which change feeds run: one per (origin, database) that clients use, opened and closed
with them.

Logical replication is per database, so a feed follows one. The integration's own database
gets its feed when serving starts (so `--change-feed on` can refuse at once, and the first
client finds the feed live); any other database gets one when the first session for it
appears. A feed closes once no client has used its database for `idle` seconds: a connected
walsender keeps a Neon compute from scaling to zero, and neonpoly's own origin connections
are gone by then. Reopening is a gap like any other (the feed evicts the database).

Caches of the same origin share its feeds (`FeedTarget.key`, "host:port"); a feed's sinks
are told the origin and the database, and the caches' sink bumps every cache of it.

With several nodes sharing an invalidation plane, one node runs an origin's feeds at a time:
the one holding its lease (`FeedLeases`); the bumps reach the others through the plane. The
others keep theirs stopped ("standby") until the lease comes to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, Protocol

from neonpoly.freshness import origin_sql
from neonpoly.freshness.changefeed import ChangeFeed, ChangeSink, FeedSettings, FeedStatus, FeedTarget, FeedUnavailable
from neonpoly.freshness.libpq import LibpqError

log = logging.getLogger("neonpoly.changefeed")

# How long an "off" verdict holds before a new client makes the feed ask again (the origin
# may have been switched to wal_level=logical meanwhile; that restarts it).
RECHECK_AFTER = 600.0

Key = tuple[str, str]  # (origin key, database)


class FeedLeases(Protocol):
    """Which node may run an origin's change feed (the invalidation plane's lease)."""

    def holds_lease(self, origin_key: str) -> bool: ...
    def lease_holder(self, origin_key: str) -> str: ...


class FeedManager:
    """The feeds of one proxy; the service tells it which caches and sessions exist."""

    def __init__(
        self, settings: FeedSettings, sinks: Sequence[ChangeSink], *, leases: FeedLeases | None = None
    ) -> None:
        self.settings = settings
        self.sinks = sinks
        self.leases = leases
        self._caches: dict[str, tuple[FeedTarget, str | None]] = {}  # cache id -> origin, its database
        self._feeds: dict[Key, ChangeFeed] = {}
        self._last_used: dict[Key, float] = {}  # monotonic; while in use: now
        self._in_use: set[Key] = set()
        self._refused_at: dict[Key, float] = {}
        self._logged: dict[Key, str] = {}
        self._started = False
        self._ticker: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        # cache id -> the feeds that must be live for `follows` (asked for every query: a
        # list kept until the caches, sessions or feeds change; [] when one is missing)
        self._following: dict[str, list[ChangeFeed]] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.mode != "off"

    # --- what the service tells it ---------------------------------------------------

    def watch(self, cache_id: str, target: FeedTarget, database: str | None) -> None:
        """A cache in front of `target` is served; `database` is the one its clients use
        by default (its feed starts with serving)."""
        self._caches[cache_id] = (target, database)
        self._following.clear()
        if self._started and database:
            self._ensure(target, database, eager=True)

    def unwatch(self, cache_id: str) -> None:
        """The cache was removed: stop the feeds no other cache needs, and drop from the
        origin what neonpoly created there (the DDL event trigger)."""
        entry = self._caches.pop(cache_id, None)
        self._following.clear()
        if entry is None:
            return
        target = entry[0]
        if any(t.key == target.key for t, _ in self._caches.values()):
            return
        feeds = [f for (key, _), f in self._feeds.items() if key == target.key]
        for feed in feeds:
            del self._feeds[(target.key, feed.database)]
        if feeds:
            self._chore(self._retire(target, feeds))

    def sessions_changed(self, in_use: Iterable[tuple[str, str]]) -> None:
        """The (cache id, database) pairs clients are connected to now."""
        now = time.monotonic()
        keys: set[Key] = set()
        for cache_id, database in in_use:
            entry = self._caches.get(cache_id)
            if entry is not None and database:
                keys.add((entry[0].key, database))
        for key in keys | self._in_use:
            self._last_used[key] = now
        if keys != self._in_use:
            self._following.clear()
        self._in_use = keys
        if self._started:
            for key in keys:
                self._ensure(self._target(key[0]), key[1])

    def lease_changed(self, origin_key: str, held: bool) -> None:
        """This node gained (start the feeds its caches and clients want) or lost (stop
        them: another node runs them now) the lease of an origin's feeds."""
        self._following.clear()
        if held:
            if not self._started:
                return
            for target, database in list(self._caches.values()):
                if target.key == origin_key and database:
                    self._ensure(target, database, eager=True)
            for key in list(self._in_use):
                if key[0] == origin_key:
                    self._ensure(self._target(key[0]), key[1])
            return
        for (origin, _), feed in list(self._feeds.items()):
            if origin == origin_key and feed.running:
                self._chore(feed.stop("standby", "another node runs the change feed"))

    # --- life ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the feeds of the caches' own databases. With `--change-feed on`, wait for
        them and raise FeedUnavailable (one line) if any cannot be had."""
        if self._started or not self.enabled:
            return
        self._started = True
        self._following.clear()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        eager: list[ChangeFeed] = []
        for target, database in list(self._caches.values()):
            if database:
                feed = self._ensure(target, database, eager=True)
                if feed is not None:
                    eager.append(feed)
        if self.settings.mode == "on":
            wait = self.settings.connect_timeout * 3
            for feed in eager:
                try:
                    async with asyncio.timeout(wait):
                        why = await feed.first_attempt()
                except TimeoutError:
                    why = f"no answer in {wait:g} s (creating a slot waits for open writing transactions)"
                if why is not None:
                    raise FeedUnavailable(f"no change feed for {feed.target.key}/{feed.database}: {why}")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        feeds, self._feeds = list(self._feeds.values()), {}
        self._following.clear()
        await asyncio.gather(*(f.stop() for f in feeds), return_exceptions=True)
        chores = list(self._chores)
        if chores:
            await asyncio.wait(chores, timeout=5.0)
        self._started = False

    # --- reading -------------------------------------------------------------------

    def feed(self, origin_key: str, database: str) -> ChangeFeed | None:
        return self._feeds.get((origin_key, database))

    def statuses(self, cache_id: str) -> tuple[FeedStatus, ...]:
        entry = self._caches.get(cache_id)
        if entry is None:
            return ()
        key = entry[0].key
        return tuple(f.status() for (k, _), f in sorted(self._feeds.items()) if k == key)

    def follows(self, cache_id: str) -> bool:
        """True while this node's feeds are live for every database the cache's clients use
        and for its own: every commit there is evicted before the next hit, and a feed that
        stops evicts its database (changefeed.py), so entries stored now cannot outlive it.
        A standby node (another runs the feeds), a feed starting, off or reconnecting: no."""
        feeds = self._following.get(cache_id)
        if feeds is None:
            feeds = self._following[cache_id] = self._must_follow(cache_id)
        if not feeds:
            return False
        for feed in feeds:  # noqa: SIM110 (asked for every query: no generator)
            if feed.state != "live":
                return False
        return True

    def _must_follow(self, cache_id: str) -> list[ChangeFeed]:
        entry = self._caches.get(cache_id)
        if entry is None or not self._started or not self.enabled:
            return []
        target, database = entry
        keys = {key for key in self._in_use if key[0] == target.key}
        if database:
            keys.add((target.key, database))
        feeds = [self._feeds.get(key) for key in keys]
        return [f for f in feeds if f is not None] if all(f is not None for f in feeds) else []

    def safety_ttl(self, cache_id: str) -> float | None:
        """The TTL cap of reads the feeds follow (cache/rules.py), or None when they do not."""
        return self.settings.ttl if self.follows(cache_id) else None

    def summary(self, cache_id: str) -> str:
        """One line for SHOW CACHES: "on (lag 3 ms)", "off: wal_level is replica", …"""
        if not self.enabled:
            return "off (--change-feed off)"
        if cache_id not in self._caches:
            return "off: no cache"
        if self.leases is not None and not self.leases.holds_lease(self._caches[cache_id][0].key):
            holder = self.leases.lease_holder(self._caches[cache_id][0].key)
            return f"standby: node {holder} runs it" if holder else "standby: waiting for the feed lease"
        statuses = self.statuses(cache_id)
        if not statuses:
            return "starting" if not self._started else "idle: no clients yet"
        if len(statuses) == 1:
            return statuses[0].summary()
        return "; ".join(f"{s.database}: {s.summary()}" for s in statuses)

    # --- inside --------------------------------------------------------------------

    def _target(self, origin_key: str) -> FeedTarget:
        return next(t for t, _ in self._caches.values() if t.key == origin_key)

    def _ensure(self, target: FeedTarget, database: str, *, eager: bool = False) -> ChangeFeed | None:
        if self.leases is not None and not self.leases.holds_lease(target.key):
            return None  # another node runs this origin's feeds
        key = (target.key, database)
        feed = self._feeds.get(key)
        if feed is None:
            feed = ChangeFeed(target, database, self.settings, self.sinks, on_refused=self._refused)
            self._feeds[key] = feed
            self._following.clear()
        elif feed.running or (
            feed.state == "off" and time.monotonic() - self._refused_at.get(key, 0.0) < RECHECK_AFTER
        ):
            return feed
        if eager:
            self._last_used[key] = time.monotonic()
        feed.start()
        return feed

    def _refused(self, feed: ChangeFeed, why: str) -> None:
        key = (feed.target.key, feed.database)
        self._refused_at[key] = time.monotonic()
        if self._logged.get(key) != why:
            self._logged[key] = why
            log.info("change feed off for %s/%s: %s", feed.target.key, feed.database, why)

    async def _tick(self) -> None:
        idle = self.settings.idle
        every = max(0.05, min(1.0, idle / 4))
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for key, feed in list(self._feeds.items()):
                if key in self._in_use or not feed.running:
                    continue
                if now - self._last_used.get(key, now) >= idle:
                    log.info("change feed %s/%s closed: no client for %g s", key[0], key[1], idle)
                    await feed.stop("idle", f"closed after {idle:g} s without clients; reopens with the next")

    def _chore(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _retire(self, target: FeedTarget, feeds: list[ChangeFeed]) -> None:
        for feed in feeds:
            await feed.stop("stopped", "the integration was removed")
        for feed in feeds:
            if feed.ddl_mode != "stream" and self.settings.ddl != "install":
                continue  # nothing of neonpoly's there: do not wake the origin for nothing
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await feed.remove_from_origin()
                except (LibpqError, OSError) as exc:
                    log.warning(
                        "change feed %s/%s: could not drop neonpoly's objects from the origin: %s "
                        "(by hand: DROP EVENT TRIGGER %s; DROP SCHEMA %s CASCADE)",
                        target.key, feed.database, exc, origin_sql.DDL_TRIGGER, origin_sql.DDL_SCHEMA,
                    )

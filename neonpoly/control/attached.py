"""`AttachedControl`: the console on a `neonpoly serve` that is already running.

It never serves anything itself. Numbers come from the proxy's admin console (asyncpg to the
database `neonpoly` on the proxy's listener, one connection kept open, polled every second);
integration metadata comes from the state dir on this machine, which the serve process
follows (`StateFollower`), so add, remove and select are writes to integrations.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from neonpoly.admin.client import AdminClient, AdminClientError, quote_ident
from neonpoly.control.interface import (
    CacheStatus,
    Control,
    ControlError,
    Freshness,
    HeaderInfo,
    IntegrationView,
    Progress,
    SignInResult,
)
from neonpoly.control.local import LocalControl
from neonpoly.control.serving import EmbeddedRunner
from neonpoly.defaults import LOCALHOST, environment
from neonpoly.integrations.neon_api import RetryPolicy
from neonpoly.integrations.store import (
    Integration,
    IntegrationError,
    IntegrationStore,
    forget,
)
from neonpoly.service import ProxySettings
from neonpoly.state import StateLock
from neonpoly.stats import SERIES_SECONDS, SeriesSnapshot, StatsSnapshot, TemplateStats, Totals

log = logging.getLogger("neonpoly.attach")

ALL = "(all)"  # the SHOW STATS row that sums every cache
QUERY_TIMEOUT = 5.0
FOLLOW_TIMEOUT = 3.0  # the serve process re-reads integrations.toml every second
Row = dict[str, Any]


def _statuses(text: str | None) -> tuple[tuple[str, int], ...]:
    """`hit=3,miss=1` (admin_commands._statuses) back into sorted (status, count) pairs."""
    pairs: list[tuple[str, int]] = []
    for part in (text or "").split(","):
        name, sep, count = part.partition("=")
        if sep and count.isdigit():
            pairs.append((name, int(count)))
    return tuple(sorted(pairs))


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _totals(row: Row | None) -> Totals:
    if row is None:
        return Totals(0, 0, 0, 0, 0.0, (), 0.0, 0)
    return Totals(
        calls=row["calls"],
        hits=row["hits"],
        misses=row["misses"],
        passthrough=row["passthrough"],
        hit_rate=row["hit_rate"],
        by_status=_statuses(row["statuses"]),
        time_saved_s=row["time_saved_ms"] / 1000,
        bytes_served=row["bytes_served"],
    )


def _template(row: Row) -> TemplateStats:
    last_seen = row["last_seen"]
    return TemplateStats(
        cache_id=row["cache"],
        template_id=row["template_id"],
        template=row["template"],
        tables=tuple(row["tables"].split(", ")) if row["tables"] else (),
        calls=row["calls"],
        hits=row["hits"],
        misses=row["misses"],
        hit_rate=row["hit_rate"],
        by_status=_statuses(row["statuses"]),
        hit_p50_s=_seconds(row["hit_p50_ms"]),
        hit_p95_s=_seconds(row["hit_p95_ms"]),
        miss_p50_s=_seconds(row["miss_p50_ms"]),
        miss_p95_s=_seconds(row["miss_p95_ms"]),
        time_saved_s=row["time_saved_ms"] / 1000,
        bytes_served=row["bytes_served"],
        last_seen=last_seen.timestamp() if isinstance(last_seen, datetime) else 0.0,
        last_status=row["last_status"] or "",
        last_reason=row.get("last_reason") or None,
        ttl=row["ttl_s"],
    )


class DeltaSeries:
    """Per-second hit/miss/pass-through counts rebuilt from cumulative counters.

    The admin console only has totals, so each poll's increase is booked to the second the
    poll ran in. A cache's counter only goes down when the proxy restarted: it counts from 0.
    """

    def __init__(self) -> None:
        self.last: tuple[int, int, int] | None = None
        self.buckets: dict[int, list[int]] = {}

    def observe(self, second: int, counts: tuple[int, int, int], *, baseline: bool) -> None:
        previous = self.last if self.last is not None or baseline else (0, 0, 0)
        self.last = counts
        if previous is None:
            return  # the first poll: those counts happened before we were looking
        bucket = self.buckets.setdefault(second, [0, 0, 0])
        for i, (new, old) in enumerate(zip(counts, previous, strict=True)):
            bucket[i] += new - old if new >= old else new
        for old_second in [s for s in self.buckets if s <= second - SERIES_SECONDS]:
            del self.buckets[old_second]

    def window(self, now_second: int) -> SeriesSnapshot:
        start = now_second - SERIES_SECONDS + 1
        empty = (0, 0, 0)
        rows = [self.buckets.get(s, empty) for s in range(start, now_second + 1)]
        return SeriesSnapshot(start, tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))


def _sum_windows(windows: list[SeriesSnapshot], now_second: int) -> SeriesSnapshot:
    if not windows:
        return DeltaSeries().window(now_second)

    def total(key: str) -> tuple[int, ...]:
        return tuple(sum(column) for column in zip(*(getattr(w, key) for w in windows), strict=True))

    return SeriesSnapshot(windows[0].start_second, total("hits"), total("misses"), total("passthrough"))


@dataclass(frozen=True, slots=True)
class Poll:
    """One answer of the admin console: SHOW STATS and SHOW QUERIES rows, by cache."""

    taken_at: float
    stats: dict[str, Row]  # cache id (or ALL) → row
    queries: tuple[Row, ...]
    caches: dict[str, Row]  # cache id → SHOW CACHES row (the change feed's state)


@dataclass(frozen=True, slots=True)
class RunningNeonpoly:
    """The process serving a state dir (it holds the state lock) and where it listens."""

    pid: int
    address: tuple[str, int]
    upstream_only: bool = False  # a `serve --upstream`: the state dir's integrations are not its

    @property
    def where(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dialable(address: tuple[str, int]) -> tuple[str, int]:
    """A wildcard listen address is where serve accepts, not one to dial: use loopback."""
    host, port = address
    return {"0.0.0.0": LOCALHOST, "::": "::1", "": LOCALHOST}.get(host, host), port


def admin_client(
    address: tuple[str, int],
    root: Path | None,
    *,
    user: str | None = None,
    password: str | None = None,
    query_timeout: float | None = None,
) -> AdminClient:
    """A client of the admin database with the credentials this machine has: the password
    given or $NEONPOLY_ADMIN_PASSWORD (neonpoly's own), else the role and password of an
    integration in the state dir (the serve checks them with that integration's origin)."""
    cache_id, env = None, environment()
    user = user or env.admin_user
    if password is None and not env.admin_password and root is not None:
        store = IntegrationStore(root)
        try:
            items = store.load()
        except IntegrationError:
            items = []
        for item in items:
            secret = store.passwords(item.cache_id).get(item.role)
            if secret and user in (None, item.role):
                user, password, cache_id = item.role, secret, item.cache_id
                break
    extra = {} if query_timeout is None else {"query_timeout": query_timeout}
    return AdminClient(address, user=user, password=password, application_name=cache_id, **extra)


def find_running(root: Path) -> RunningNeonpoly | None:
    """The neonpoly (`serve` or a console) serving from `root`, found through the state lock
    and the address every serve records; None when none runs."""
    pid = StateLock(root).holder()
    if pid is None:
        return None
    state = IntegrationStore(root).read()
    return RunningNeonpoly(pid, dialable(state.listen), state.upstream_only)


async def cache_connections(client: AdminClient, cache_id: str) -> int:
    """Open client connections of one cache (SHOW CONNECTIONS); raises AdminClientError."""
    return sum(1 for r in (await client.run("SHOW CONNECTIONS")).dicts() if r["cache"] == cache_id)


async def wait_unserved(client: AdminClient, cache_id: str, timeout: float) -> bool:
    """Poll until the proxy serves `cache_id` no more (SHOW CACHES) and holds none of its
    connections; False after `timeout`. Raises AdminClientError when the proxy cannot answer."""
    deadline = time.monotonic() + timeout
    while True:
        served = any(r["cache"] == cache_id for r in (await client.run("SHOW CACHES")).dicts())
        if not served and not await cache_connections(client, cache_id):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


class AttachedControl(Control):
    """Control on a running `neonpoly serve` at `address`, through its admin console."""

    def __init__(
        self,
        address: tuple[str, int],
        root: Path | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        api_host: str | None = None,
        project_id: str | None = None,
        upstream: str | None = None,
        connect_to: str | None = None,
        retry: RetryPolicy | None = None,
        interval: float = 1.0,
    ) -> None:
        self.address = address
        self.interval = interval
        # Never started: it is the state-dir half of LocalControl (integrations, select,
        # sign-in, connection strings on `address`), reused rather than rewritten. No cache
        # directory, so nothing it could do would touch the serve process's cache files.
        self.local = LocalControl(
            root,
            ProxySettings(listen=address, cache_dir=None),
            api_key=api_key,
            api_host=api_host,
            project_id=project_id,
            upstream=upstream,
            connect_to=connect_to,
            retry=retry,
        )
        self.store: IntegrationStore = self.local.store
        self.client = admin_client(address, root, user=user, password=password, query_timeout=QUERY_TIMEOUT)
        self._poll: Poll | None = None
        self._series: dict[str, DeltaSeries] = {}
        self._ok = False
        self._error: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        return self.client.where

    @property
    def last_error(self) -> str | None:
        return self._error

    # -- the admin connection -----------------------------------------------------------
    async def query(self, sql: str) -> list[Row]:
        """Run one admin statement (the client reopens a lost connection once)."""
        try:
            return (await self.client.run(sql)).dicts()
        except AdminClientError as exc:
            raise ControlError(exc.message) from exc

    # -- polling ------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Fetch SHOW STATS and SHOW QUERIES now and book the per-second deltas."""
        try:
            stats = await self.query("SHOW STATS")
            queries = await self.query("SHOW QUERIES")
            caches = await self.query("SHOW CACHES")
        except ControlError as exc:
            if self._ok or self._error != str(exc):
                log.warning("%s", exc)
            self._ok, self._error = False, str(exc)
            raise
        now = time.time()
        baseline = self._poll is None
        by_cache = {row["cache"]: row for row in stats}
        second = int(now)
        for cache_id, row in by_cache.items():
            if cache_id == ALL:
                continue  # the sum of the caches' series; its row drops when a cache goes
            series = self._series.setdefault(cache_id, DeltaSeries())
            series.observe(second, (row["hits"], row["misses"], row["passthrough"]), baseline=baseline)
        for gone in set(self._series) - set(by_cache):
            del self._series[gone]
        self._poll = Poll(now, by_cache, tuple(queries), {row["cache"]: row for row in caches})
        self._ok, self._error = True, None

    async def _run_poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(ControlError):  # shown by header(); retried next second
                await self.refresh()

    # -- cheap reads ----------------------------------------------------------------------
    def header(self) -> HeaderInfo:
        return replace(self.local.header(), listen=f"{self.where} (attached)", running=self._ok)

    def integrations(self) -> list[IntegrationView]:
        return self.local.integrations()

    def select(self, cache_id: str, *, database: str | None = None, role: str | None = None) -> IntegrationView:
        return self.local.select(cache_id, database=database, role=role)

    async def refresh_choices(self, cache_id: str) -> IntegrationView:
        # The origin is asked from here, with the state dir's credentials, as LocalControl does.
        return await self.local.refresh_choices(cache_id)

    def connection_string(self, cache_id: str, *, reveal: bool = False) -> str:
        return self.local.connection_string(cache_id, reveal=reveal)

    def _find(self, cache_id: str) -> Integration:
        try:
            return self.store.find(cache_id)
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc

    def _row(self, cache_id: str | None) -> Row | None:
        return self._poll.stats.get(ALL if cache_id is None else cache_id) if self._poll else None

    def status(self, cache_id: str) -> CacheStatus:
        item = self._find(cache_id)
        row = self._row(item.cache_id)
        totals = _totals(row)
        cacheable = totals.hits + totals.misses
        return CacheStatus(
            entries=row["entries"] if row else 0,
            bytes=row["bytes"] if row else 0,
            connections=row["connections"] if row else 0,
            calls=totals.calls,
            hits=totals.hits,
            hit_rate=totals.hits / cacheable if cacheable else None,
            origin=item.origin_label,
            endpoint_state=item.endpoint_state,
            freshness=self._freshness(item.cache_id),
        )

    def _freshness(self, cache_id: str) -> Freshness | None:
        row = self._poll.caches.get(cache_id) if self._poll else None
        if row is None:
            return None
        last = row["feed_last_change"]
        feed = str(row["change_feed"])
        return Freshness(
            feed=feed, following=feed.startswith("on"), changes=int(row["feed_changes"]),
            ddl=int(row["feed_ddl"]), gaps=int(row["feed_gaps"]),
            last_change=last.timestamp() if isinstance(last, datetime) else None,
            plane=str(row.get("plane") or "off"),
            slot=str(row.get("feed_slot") or ""),
        )

    def stats(self, cache_id: str | None = None) -> StatsSnapshot:
        now = time.time()
        poll = self._poll
        caches = tuple(sorted(c for c in poll.stats if c != ALL)) if poll else ()
        rows = poll.queries if poll else ()
        templates = [_template(r) for r in rows if cache_id is None or r["cache"] == cache_id]
        templates.sort(key=lambda t: (-t.calls, t.cache_id, t.template_id))
        if cache_id is None:
            series = _sum_windows([s.window(int(now)) for s in self._series.values()], int(now))
        else:
            series = (self._series.get(cache_id) or DeltaSeries()).window(int(now))
        return StatsSnapshot(
            cache_id,
            poll.taken_at if poll else now,
            caches,
            _totals(self._row(cache_id)),
            tuple(templates),
            series,
        )

    # -- actions --------------------------------------------------------------------------
    async def sign_in(self, api_key: str | None = None) -> SignInResult:
        return await self.local.sign_in(api_key)

    async def add(self, workspace: str, progress: Progress) -> IntegrationView:
        # The embedded origin is started (or adopted, if serve already runs it) and left
        # running on purpose: the serve process adopts the cluster and stops it when it exits.
        item = await self.local.record(workspace, progress, EmbeddedRunner(self.store.root))
        progress(f"Waiting for neonpoly at {self.where} to serve it")
        if not await self._until(lambda: self._served(item.cache_id)):
            raise ControlError(
                f"added {item.name}, but neonpoly at {self.where} did not start serving it within "
                f"{FOLLOW_TIMEOUT:g}s (is it `neonpoly serve` on this state dir, without --upstream?)"
            )
        progress("Cache ready")
        return self.local.view(item)

    async def purge(self, cache_id: str) -> int:
        item = self._find(cache_id)
        rows = await self.query(f'PURGE ALL FOR CACHE "{item.cache_id}"')
        with contextlib.suppress(ControlError):  # the count is what matters; numbers catch up
            await self.refresh()
        return int(rows[0]["removed"]) if rows else 0

    async def purge_template(self, cache_id: str, template_id: str) -> int:
        item = self._find(cache_id)
        # Quoted as `neonpoly purge --query` quotes it: one word to the admin tokenizer.
        rows = await self.query(f"PURGE QUERY {quote_ident(template_id)} FOR CACHE {quote_ident(item.cache_id)}")
        with contextlib.suppress(ControlError):
            await self.refresh()
        return int(rows[0]["removed"]) if rows else 0

    async def remove(self, cache_id: str) -> int:
        """Forget the integration in the state dir; the serve process ends its connections and
        deletes its cache (it owns the files). Returns the connections it had."""
        item = self._find(cache_id)
        before = await self._connections(item.cache_id)
        try:
            forget(self.store, item.cache_id, None)
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc
        try:
            done = await wait_unserved(self.client, item.cache_id, FOLLOW_TIMEOUT)
        except AdminClientError as exc:
            raise ControlError(exc.message) from exc
        with contextlib.suppress(ControlError):
            await self.refresh()
        if not done:
            raise ControlError(
                f"removed {item.name} from the state, but neonpoly at {self.where} still serves it "
                f"after {FOLLOW_TIMEOUT:g}s (is it `neonpoly serve` on this state dir?)"
            )
        return before

    async def _served(self, cache_id: str) -> bool:
        return any(r["cache"] == cache_id for r in await self.query("SHOW CACHES"))

    async def _connections(self, cache_id: str) -> int:
        try:
            return await cache_connections(self.client, cache_id)
        except AdminClientError as exc:
            raise ControlError(exc.message) from exc

    async def _until(self, done: Callable[[], Awaitable[bool]]) -> bool:
        """Poll `done` until true or FOLLOW_TIMEOUT (the serve process follows within ~1 s)."""
        deadline = time.monotonic() + FOLLOW_TIMEOUT
        while True:
            if await done():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def start(self) -> None:
        if self._task is not None:
            return
        # Poll even when the first attempt fails: the header turns green once serve is up.
        self._task = asyncio.get_running_loop().create_task(self._run_poll())
        await self.refresh()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.close()
        self._ok = False


__all__ = ["AttachedControl", "DeltaSeries"]

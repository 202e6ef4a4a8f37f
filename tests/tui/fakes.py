"""A deterministic `Control` for rendering tests and screenshots: fixed names, ids, ports,
clock and traffic, so snapshots never vary. Flow tests drive the real LocalControl."""

from __future__ import annotations

import asyncio
from dataclasses import replace

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
from neonpoly.stats import HIT, MISS, StatsRecorder, StatsSnapshot

NOW = 1_717_000_000.0
CACHE_ID = "5f0c2d7e-8b1a-4c3e-9d2f-6a7b8c9da91e"
PASSWORD = "npg_s3cr3tPassw0rd"

TRAFFIC: tuple[tuple[str, str, tuple[str, ...], int, int, float, float, float | None], ...] = (
    # (template_id, template, tables, hits, misses, hit s, miss s, ttl)
    ("t1", "SELECT id, name, price FROM products WHERE id = $1", ("products",), 940, 38, 0.0002, 0.0048, 300.0),
    (
        "t2",
        "SELECT * FROM orders WHERE customer_id = $1 ORDER BY created_at DESC LIMIT [?]",
        ("orders",),
        412,
        97,
        0.0003,
        0.0121,
        300.0,
    ),
    ("t3", "SELECT count(*) FROM products WHERE category = $1", ("products",), 188, 12, 0.0002, 0.0350, 60.0),
    ("t4", "SELECT name FROM categories ORDER BY name", ("categories",), 77, 3, 0.0001, 0.0021, 3600.0),
)
# A local origin answers in a millisecond or two: savings are ms, not seconds.
LOCAL_TRAFFIC: tuple[tuple[str, str, tuple[str, ...], int, int, float, float, float | None], ...] = (
    ("t1", "SELECT id, name FROM items WHERE id = $1", ("items",), 46, 4, 0.00012, 0.0009, 300.0),
    ("t2", "SELECT count(*) FROM items WHERE price < $1", ("items",), 9, 3, 0.00015, 0.0031, 60.0),
)
PASSTHROUGH: tuple[tuple[str, str, str, str, int], ...] = (
    # (template_id, template, status, the engine's reason, calls)
    ("t5", "SELECT now(), pg_backend_pid()", "volatile", "calls time-dependent function now()", 31),
    ("t6", "UPDATE products SET price = $1 WHERE id = $2", "uncacheable", "writes table products", 12),
)


def demo_stats(cache_id: str, *, local: bool = False) -> StatsRecorder:
    """Synthetic traffic spread over the last 15 minutes, recorded through the real recorder."""
    clock = [NOW - 899]
    stats = StatsRecorder(clock=lambda: clock[0])
    for tid, template, tables, hits, misses, hit_s, miss_s, ttl in LOCAL_TRAFFIC if local else TRAFFIC:
        total = misses + hits
        for i in range(total):
            # Misses early, hits later and denser: the shape of a cache warming up.
            clock[0] = NOW - 899 + int(899 * (i / total) ** 0.6)
            status = MISS if i < misses else HIT
            stats.record(cache_id, tid, template, tables, status, miss_s if status == MISS else hit_s, 512)
        stats.set_ttl(cache_id, tid, ttl)
    for tid, template, status, reason, n in PASSTHROUGH:
        for i in range(n):
            clock[0] = NOW - 899 + (i * 29) % 900
            stats.record(cache_id, tid, template, (), status, 0.004, reason=reason)
    clock[0] = NOW
    return stats


class DemoControl(Control):
    def __init__(
        self,
        *,
        configured: bool = False,
        local: bool = False,
        traffic: bool = True,
        sign_in_error: str | None = None,
        add_failures: int = 0,
    ) -> None:
        self.local = local
        self.traffic = traffic
        self.sign_in_error = sign_in_error
        self.add_failures = add_failures
        self.started = False
        self.entries = 1204
        self.connections = 3
        self.copied: list[str] = []
        self.purged_templates: list[str] = []
        self.api_keys: list[str | None] = []  # every key sign_in was given, None for empty
        self.choices: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # what refresh_choices finds
        self.choices_error: str | None = None
        self.choice_refreshes = 0
        self._view: IntegrationView | None = self._make_view() if configured else None
        self._stats = demo_stats(CACHE_ID, local=local) if traffic else StatsRecorder(clock=lambda: NOW)

    def _make_view(self) -> IntegrationView:
        if self.local:
            return IntegrationView(
                CACHE_ID,
                "local-app",
                "local",
                "url",
                "127.0.0.1:5432",
                None,
                None,
                None,
                None,
                ("app",),
                ("postgres",),
                "app",
                "postgres",
            )
        return IntegrationView(
            CACHE_ID,
            "shop-main",
            "default",
            "neon",
            "ep-dawn-king-a527wlyu.us-east-2.aws.neon.tech:5432",
            "ep-dawn-king-a527wlyu",
            "idle",
            "main",
            "shop",
            ("neondb", "analytics"),
            ("neondb_owner", "reporter"),
            "neondb",
            "neondb_owner",
        )

    def header(self) -> HeaderInfo:
        if self.local:
            return HeaderInfo("local", None, None, "127.0.0.1:6543", self.started)
        return HeaderInfo("shop", "aws-us-east-2", "main", "127.0.0.1:6543", self.started)

    def integrations(self) -> list[IntegrationView]:
        return [self._view] if self._view else []

    async def sign_in(self, api_key: str | None = None) -> SignInResult:
        self.api_keys.append(api_key)
        await asyncio.sleep(0)
        if self.sign_in_error:
            raise ControlError(self.sign_in_error)
        if self.local:
            return SignInResult("local", "local", ("local",))
        return SignInResult("neon", "Neon API key …abcd", ("default", "shop-team"))

    async def add(self, workspace: str, progress: Progress) -> IntegrationView:
        neon_lines = (
            "finding project shop",
            "primary branch main",
            "read-write endpoint ep-dawn-king-a527wlyu (idle)",
            "databases neondb, analytics · roles neondb_owner, reporter",
        )
        for line in ("Origin 127.0.0.1:5432",) if self.local else neon_lines:
            progress(line)
            await asyncio.sleep(0)
        if self.add_failures:
            self.add_failures -= 1
            if self.local:
                raise ControlError("cannot reach the origin 127.0.0.1:5432: connection refused")
            raise ControlError("endpoint ep-dawn-king-a527wlyu did not wake up in 30 s")
        progress("starting the cache")
        self._view = replace(self._make_view(), workspace=workspace)
        return self._view

    def _need(self, cache_id: str) -> IntegrationView:
        if self._view is None or self._view.cache_id != cache_id:
            raise ControlError(f"no integration {cache_id}")
        return self._view

    def select(self, cache_id: str, *, database: str | None = None, role: str | None = None) -> IntegrationView:
        view = self._need(cache_id)
        self._view = replace(view, database=database or view.database, role=role or view.role)
        return self._view

    async def refresh_choices(self, cache_id: str) -> IntegrationView:
        """What the origin lists now: `choices` (databases, roles) when set, an error when
        `choices_error` is, else the lists as they were."""
        view = self._need(cache_id)
        self.choice_refreshes += 1
        await asyncio.sleep(0)
        if self.choices_error:
            raise ControlError(self.choices_error)
        if self.choices is not None:
            self._view = view = replace(view, databases=self.choices[0], roles=self.choices[1])
        return view

    def connection_string(self, cache_id: str, *, reveal: bool = False) -> str:
        view = self._need(cache_id)
        password = PASSWORD if reveal else "••••••"
        return f"postgres://{view.role}:{password}@127.0.0.1:6543/{view.database}?application_name={cache_id}"

    def status(self, cache_id: str) -> CacheStatus:
        self._need(cache_id)
        totals = self._stats.snapshot(cache_id).totals
        return CacheStatus(
            self.entries,
            self.entries * 15_200,
            self.connections,
            totals.calls,
            totals.hits,
            totals.hit_rate if totals.hits + totals.misses else None,
            # No last_change: "12 s ago" would follow the real clock, not the fixed NOW.
            freshness=Freshness(feed="on (lag 1 ms)", following=True, changes=12, ddl=1, gaps=0, last_change=None),
        )

    def stats(self, cache_id: str | None = None) -> StatsSnapshot:
        return self._stats.snapshot(cache_id)

    async def purge(self, cache_id: str) -> int:
        self._need(cache_id)
        purged, self.entries = self.entries, 0
        return purged

    async def purge_template(self, cache_id: str, template_id: str) -> int:
        self._need(cache_id)
        # A result is stored per miss, so a template holds as many entries as it had misses.
        stored = {row[0]: row[4] for row in TRAFFIC}.get(template_id, 0)
        purged = min(stored, self.entries)
        self.entries -= purged
        self.purged_templates.append(template_id)
        return purged

    async def remove(self, cache_id: str) -> int:
        self._need(cache_id)
        ended, self.connections = self.connections, 0
        self._view = None
        return ended

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

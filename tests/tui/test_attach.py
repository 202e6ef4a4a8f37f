"""`neonpoly tui --attach`: the console on a proxy it did not start, through the admin console.

The "running serve" is the real thing in-process: a ProxyService with the admin console and a
StateFollower on a temp state dir holding one URL integration for the session's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from textual.widgets import Label

from neonpoly.cli.main import build_parser
from neonpoly.control.attached import AttachedControl, DeltaSeries
from neonpoly.control.interface import ControlError
from neonpoly.control.serving import start_serving
from neonpoly.integrations.store import IntegrationStore, record_url
from neonpoly.service import ProxyService, ProxySettings
from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.widgets.template_table import TemplateTable
from tests.pgharness import PgServer
from tests.tui.scenes import settle

QUERY = "SELECT id, name FROM attach_items WHERE id > 0 ORDER BY id"


@dataclass
class Serve:
    service: ProxyService
    port: int
    cache_id: str
    password: str  # the role's password on the origin, which checks the admin login

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", password=self.password, database="neonpoly", ssl=False
        )

    async def admin(self, sql: str) -> list[dict[str, Any]]:
        """An independent admin client: what `neonpoly stats` would print."""
        conn = await self.connect()
        try:
            return [dict(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()


@pytest.fixture
async def serve(pg: PgServer, state_root: Path) -> AsyncIterator[Serve]:
    """What `neonpoly serve --state-dir state_root` runs, minus the signal handling."""
    async with pg.superuser_conn() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS attach_items (id int PRIMARY KEY, name text);"
            "INSERT INTO attach_items VALUES (1, 'lamp'), (2, 'desk') ON CONFLICT DO NOTHING"
        )
    item = record_url(IntegrationStore(state_root), pg.url("postgres", "app", "require"))
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=state_root / "cache"))
    running = await start_serving(service, state_root, embedded_when_empty=False, follow_every=0.2)
    try:
        yield Serve(service, running.address[1], item.cache_id, pg.password_for("postgres"))
    finally:
        await running.close(grace=0.5)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _notes(app: ConsoleApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_console_attached_to_a_running_serve(serve: Serve, state_root: Path) -> None:
    control = AttachedControl(("127.0.0.1", serve.port), state_root, interval=0.2)
    app = ConsoleApp(control)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await _until(lambda: control.header().running)
        header = control.header()
        assert header.listen == f"127.0.0.1:{serve.port} (attached)"
        page = app.screen
        assert isinstance(page, IntegrationsScreen)
        app.refresh_views()
        assert page.has_class("-configured")  # PolyScale is CONFIGURED, from the state dir

        # A client on the copied string; the connection string names the attached listener.
        await pilot.press("c")
        await settle(pilot)  # the copy runs in a worker (a clipboard tool may take a moment)
        copied = app.clipboard
        assert f"@127.0.0.1:{serve.port}/app?application_name={serve.cache_id}" in copied
        conn = await asyncpg.connect(copied)
        await control.refresh()  # a baseline before the queries, so the series sees them
        for _ in range(5):
            assert len(await conn.fetch(QUERY)) == 2
        await control.refresh()
        assert sum(control.stats(serve.cache_id).series.hits) >= 1

        # View cache: the numbers are SHOW STATS / SHOW QUERIES, as another admin client sees them.
        await pilot.press("v")
        view = app.screen
        assert isinstance(view, CacheViewScreen)
        app.refresh_views()
        await pilot.pause()
        [stats] = await serve.admin(f"SHOW STATS FOR CACHE {serve.cache_id}")
        queries = await serve.admin(f"SHOW QUERIES FOR CACHE {serve.cache_id}")
        assert stats["hits"] >= 2
        assert str(view.query_one("#cv-calls", Label).content) == f"{stats['calls']:,} queries"
        assert str(view.query_one("#total-hits", Label).content) == f"{stats['hits']:,}"
        rate = stats["hits"] / (stats["hits"] + stats["misses"])
        assert stats["hit_rate"] == pytest.approx(rate)  # SHOW STATS and the TUI agree on it
        assert str(view.query_one("#cv-hit-rate", Label).content) == f"hit rate {rate * 100:.0f}%"
        table = view.query_one(TemplateTable)
        assert table.row_count == len(queries)
        mine = next(q for q in queries if "attach_items" in q["template"])
        cells = [c.plain for c in table.get_row(mine["template_id"])]
        assert "attach_items" in cells[0] and cells[1] == f"{mine['calls']:,}"
        status = control.status(serve.cache_id)
        assert (status.calls, status.hits, status.connections) == (stats["calls"], stats["hits"], 1)
        await control.refresh()
        view.refresh_data()
        fresh = control.status(serve.cache_id).freshness
        [caches] = await serve.admin("SHOW CACHES")
        assert fresh is not None and fresh.feed == caches["change_feed"]  # as SHOW CACHES says
        assert fresh.slot == (caches["feed_slot"] or "")
        fresh_line = str(view.query_one("#cv-fresh", Label).content)
        assert fresh_line.startswith("fresh    change feed ") and caches["change_feed"] in fresh_line

        # One query through the admin console (PURGE QUERY): only its entries go.
        route = serve.service.routes.by_id[serve.cache_id]
        assert route.cache is not None
        route.cache.store.flush()
        [before] = await serve.admin("SHOW CACHES")
        purged = await control.purge_template(serve.cache_id, mine["template_id"])
        [after] = await serve.admin("SHOW CACHES")
        assert purged >= 1 and after["entries"] == before["entries"] - purged
        assert await control.purge_template(serve.cache_id, mine["template_id"]) == 0
        assert len(await conn.fetch(QUERY)) == 2  # a miss again: stored for the purge below

        # Purge through the console: the running proxy's cache is empty afterwards.
        route.cache.store.flush()
        [cache] = await serve.admin("SHOW CACHES")
        assert cache["entries"] >= 1
        await pilot.press("P")  # shift+p: the whole cache (p is the highlighted query)
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await _until(lambda: any("Purged" in n for n in _notes(app)))
        assert f"Purged {cache['entries']:,} entr" in " ".join(_notes(app))
        [cache] = await serve.admin("SHOW CACHES")
        assert cache["entries"] == 0

        # Remove: the serve process follows the state file and ends the client's connection.
        # (Opened now: with no origin left to check a login, the serve admits no new admin.)
        adm = await serve.connect()
        await pilot.press("escape")
        assert isinstance(app.screen, IntegrationsScreen)
        await pilot.press("r")
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await _until(lambda: any("Removed PolyScale" in n for n in _notes(app)))
        await _until(conn.is_closed, timeout=2)
        assert any("ended 1 connection" in n for n in _notes(app)), _notes(app)
        assert serve.cache_id not in serve.service.routes.by_id
        assert [r for r in await adm.fetch("SHOW CONNECTIONS") if r["cache"] != "admin"] == []
        assert control.integrations() == []
        await settle(pilot)
        assert not app.screen.has_class("-configured")
    assert not control.header().running  # closed with the app; the proxy itself keeps running
    assert await adm.fetch("SHOW CACHES") == []
    await adm.close()


async def test_unreachable_proxy_is_one_line(state_root: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    control = AttachedControl(("127.0.0.1", port), state_root, interval=0.1)
    try:
        with pytest.raises(ControlError, match=rf"^cannot reach neonpoly at 127\.0\.0\.1:{port}: "):
            await control.start()
        assert not control.header().running
        assert control.stats().totals.calls == 0  # renders as empty, not an exception
    finally:
        await control.close()


async def test_reconnects_after_the_admin_connection_drops(serve: Serve, state_root: Path) -> None:
    control = AttachedControl(("127.0.0.1", serve.port), state_root)
    try:
        await control.refresh()
        # End our admin session from the proxy side, as a restart of serve would.
        for session in list(serve.service.server.sessions):
            if session.state.database == "neonpoly":
                session.close()
        await control.refresh()
        assert control.header().running
        assert control.stats(serve.cache_id).caches == (serve.cache_id,)
    finally:
        await control.close()


def test_delta_series_books_increases_per_second() -> None:
    series = DeltaSeries()
    series.observe(100, (5, 2, 1), baseline=True)  # before we looked: not booked
    series.observe(101, (8, 3, 1), baseline=False)
    series.observe(102, (1, 0, 0), baseline=False)  # counters restarted
    window = series.window(102)
    assert window.hits[-3:] == (0, 3, 1) and window.misses[-3:] == (0, 1, 0)
    fresh = DeltaSeries()  # a cache that appears after the first poll counts from zero
    fresh.observe(200, (2, 1, 0), baseline=False)
    assert fresh.window(200).hits[-1] == 2


def test_cli_takes_attach() -> None:
    args = build_parser().parse_args(["tui", "--attach", "127.0.0.1:7000", "--admin-user", "neonpoly"])
    assert args.attach == ("127.0.0.1", 7000) and args.admin_user == "neonpoly"

"""The seed, walked through the console with the real LocalControl and a real PostgreSQL:
add → manage → database and role → copy → view cache → purge → remove."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import asyncpg
from textual.widgets import Label, Select

from neonpoly.control.local import LocalControl
from neonpoly.integrations.store import MASK
from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.add_drawer import AddPolyScaleDrawer
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from neonpoly.tui.widgets.template_table import TemplateTable
from tests.pgharness import PgServer
from tests.tui.scenes import settle

QUERY = "SELECT id, name FROM tui_items WHERE id > 0 ORDER BY id"


async def _seed(pg: PgServer) -> None:
    async with pg.superuser_conn() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tui_items (id int PRIMARY KEY, name text);"
            "INSERT INTO tui_items VALUES (1, 'lamp'), (2, 'desk') ON CONFLICT DO NOTHING;"
            "GRANT SELECT ON tui_items TO scram_user, md5_user")


async def _until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _notes(app: ConsoleApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_the_whole_seed(pg: PgServer, control: LocalControl) -> None:
    await _seed(pg)
    app = ConsoleApp(control)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await _until(lambda: control.header().running)
        page = app.screen
        assert isinstance(page, IntegrationsScreen) and not page.has_class("-configured")

        # Add: How to add → Sign in (NEON_API_KEY from the env) → Workspace → Authorize.
        await pilot.press("a")
        assert isinstance(app.screen, AddPolyScaleDrawer)
        await pilot.press("enter")  # the empty API-key box has the focus: enter signs in
        await settle(pilot)
        assert "Signed in as Neon API key" in str(app.screen.query_one("#account", Label).content)
        await pilot.press("enter")  # then Authorize Access has it
        # The drawer is the screen as soon as it is pushed, its widgets only once composed (a
        # loaded machine read '#database' in between): wait for what is used next.
        await _until(lambda: isinstance(app.screen, ManagePolyScaleDrawer)
                     and bool(app.screen.query("#database")) and bool(app.screen.query("#role")))
        await settle(pilot)
        [view] = control.integrations()
        assert (view.kind, view.project, view.branch) == ("neon", "shop", "main")
        assert control.header().project == "shop"
        assert page.has_class("-configured")  # the card moved to CONFIGURED

        # Manage: Database and Role rewrite the string.
        drawer = app.screen
        assert isinstance(drawer, ManagePolyScaleDrawer)
        drawer.query_one("#database", Select).value = "postgres"
        drawer.query_one("#role", Select).value = "md5_user"
        await settle(pilot)
        view = control.integrations()[0]
        assert (view.database, view.role) == ("postgres", "md5_user")
        shown = str(drawer.query_one("#conn-string", Label).content)
        assert "md5_user:" in shown and "/postgres?" in shown
        assert urlsplit(shown).password == MASK  # not "absent from" a string with a port and an id
        await pilot.press("s")
        assert pg.password_for("md5_user") in str(drawer.query_one("#conn-string", Label).content)
        drawer.query_one("#database", Select).value = "app"
        await settle(pilot)

        # Copy: the clipboard holds a working string with the password.
        await pilot.press("c")
        await settle(pilot)  # the copy runs in a worker (a clipboard tool may take a moment)
        copied = app.clipboard
        assert copied == control.connection_string(view.cache_id, reveal=True)
        assert pg.password_for("md5_user") in copied and "/app?" in copied
        conn = await asyncpg.connect(copied)
        for _ in range(4):
            assert len(await conn.fetch(QUERY)) == 2
        assert control.status(view.cache_id).hits >= 1

        # View cache: the template is there, numbers equal the engine's snapshot.
        await pilot.press("v")
        cache_view = app.screen
        assert isinstance(cache_view, CacheViewScreen)
        app.refresh_views()
        await pilot.pause()
        snap = control.stats(view.cache_id)
        table = cache_view.query_one(TemplateTable)
        assert table.row_count == len(snap.templates) >= 1
        row = next(t for t in snap.templates if "tui_items" in t.template)
        cells = [c.plain for c in table.get_row(row.template_id)]
        assert "tui_items" in cells[0] and cells[1] == f"{row.calls:,}"
        hit_label = str(cache_view.query_one("#cv-hit-rate", Label).content)
        assert hit_label.startswith("hit rate ") and hit_label != "hit rate —"

        # Purge: confirm, then "Purged N entries" and the store is empty.
        route = control.service.routes.by_id[view.cache_id]
        assert route.cache is not None
        route.cache.store.flush()
        entries = control.status(view.cache_id).entries
        assert entries >= 1
        await pilot.press("P")  # shift+p: the whole cache (p is the highlighted query)
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("y")
        await settle(pilot)
        assert f"Purged {entries:,} entr" in " ".join(_notes(app))
        assert control.status(view.cache_id).entries == 0

        # Remove: confirm; the open connection is terminated, the card returns to AVAILABLE.
        await pilot.press("escape")  # back to the Manage drawer the view was opened from
        assert isinstance(app.screen, ManagePolyScaleDrawer)
        await pilot.press("escape")  # back to the page
        assert isinstance(app.screen, IntegrationsScreen)
        await pilot.press("r")
        assert isinstance(app.screen, ConfirmModal)
        assert "terminates all current connections" in str(
            app.screen.query_one(".message", Label).content)
        await pilot.press("y")
        await settle(pilot)
        await _until(lambda: conn.is_closed(), timeout=2)
        assert control.integrations() == []
        assert view.cache_id not in control.service.routes.by_id
        assert isinstance(app.screen, IntegrationsScreen)
        assert not app.screen.has_class("-configured")
        assert any("ended 1 connection" in n for n in _notes(app)), _notes(app)

        # Add again after remove (issue 12: DuplicateIds 'manage-drawer', then 'cache-view'),
        # view it, and remove it from the drawer the view goes back to.
        await pilot.press("a", "enter")
        await settle(pilot)
        await pilot.press("enter")
        await _until(lambda: isinstance(app.screen, ManagePolyScaleDrawer))
        [again] = control.integrations()
        assert again.cache_id != view.cache_id
        await pilot.press("v")
        assert isinstance(app.screen, CacheViewScreen) and app.screen.cache_id == again.cache_id
        await pilot.press("escape")
        assert isinstance(app.screen, ManagePolyScaleDrawer) and app.screen.cache_id == again.cache_id
        await pilot.press("r", "y")
        await settle(pilot)
        await _until(lambda: isinstance(app.screen, IntegrationsScreen) and not control.integrations())
        assert app.is_running
    assert not control.header().running  # the app closed the proxy it started

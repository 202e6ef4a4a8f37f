"""The cache view's per-template keys on the real LocalControl and PostgreSQL: enter shows the
highlighted query's details, p purges only that query's entries, P still purges everything."""

from __future__ import annotations

import asyncio

import asyncpg
from textual.widgets import Label

from neonpoly.control.local import LocalControl
from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.template_details import TemplateDetailsModal
from neonpoly.tui.widgets.template_table import TemplateTable
from tests.pgharness import PgServer
from tests.tui.scenes import settle
from tests.tui.test_flow import _notes, _until

PURGED = "SELECT id, name FROM tpl_items WHERE id > 0 ORDER BY id"
KEPT = "SELECT count(*) AS n FROM tpl_items"
# pg_stat_statements' normalized text of each, distinct from the other's.
PURGED_AT_ORIGIN = "FROM tpl_items WHERE id"
KEPT_AT_ORIGIN = "AS n FROM tpl_items"


async def _seed(pg: PgServer) -> None:
    async with pg.superuser_conn() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tpl_items (id int PRIMARY KEY, name text);"
            "INSERT INTO tpl_items VALUES (1, 'lamp'), (2, 'desk') ON CONFLICT DO NOTHING;"
            "GRANT SELECT ON tpl_items TO scram_user, md5_user")


async def test_purge_one_template_and_show_its_details(pg: PgServer, control: LocalControl) -> None:
    await _seed(pg)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await _until(lambda: control.header().running)
        view = await control.add("default", lambda _: None)
        conn = await asyncpg.connect(control.connection_string(view.cache_id, reveal=True))
        try:
            route = control.service.routes.by_id[view.cache_id]
            assert route.cache is not None

            def both_hit() -> bool:
                hits = [t.hits for t in control.stats(view.cache_id).templates]
                return len(hits) == 2 and min(hits) >= 1

            # Misses store in the background: repeat until each query has been served a hit.
            for _ in range(50):
                assert len(await conn.fetch(PURGED)) == 2
                assert (await conn.fetchrow(KEPT))["n"] == 2
                if both_hit():
                    break
                await asyncio.sleep(0.05)
            assert both_hit()
            route.cache.store.flush()
            snap = control.stats(view.cache_id)
            purged = next(t for t in snap.templates if "tpl_items WHERE" in t.template)
            kept = next(t for t in snap.templates if "count(*)" in t.template)

            # Highlight the query to purge; enter opens its details, esc closes them.
            await pilot.press("v")
            screen = app.screen
            assert isinstance(screen, CacheViewScreen)
            table = screen.query_one(TemplateTable)
            table.move_cursor(row=table.get_row_index(purged.template_id))
            assert screen.highlighted() == purged
            await pilot.press("enter")
            details = app.screen
            assert isinstance(details, TemplateDetailsModal)
            # Its labels are mounted after it is pushed: on a loaded machine, after the press returned.
            await _until(lambda: bool(details.query(".detail-value")))
            values = [str(label.content) for label in details.query(".detail-value").results(Label)]
            assert purged.template_id in values
            assert "tpl_items" in values  # tables
            assert str(details.query_one("#details-template", Label).content) == purged.template
            await pilot.press("escape")
            assert app.screen is screen

            # p: confirm names the query; only its entries go.
            entries = control.status(view.cache_id).entries
            await pilot.press("p")
            modal = app.screen
            assert isinstance(modal, ConfirmModal)
            assert purged.template in str(modal.query_one(".message", Label).content)
            await pilot.press("y")
            await settle(pilot)
            route.cache.store.flush()
            left = control.status(view.cache_id).entries
            removed = entries - left
            assert removed >= 1 and left >= 1
            assert f"Purged {removed} entr" in " ".join(_notes(app))
            assert "of this query" in " ".join(_notes(app))

            # The purged query reaches the origin again; the other is still served from cache.
            purged_calls = await pg.calls(PURGED_AT_ORIGIN)
            kept_calls = await pg.calls(KEPT_AT_ORIGIN)
            assert len(await conn.fetch(PURGED)) == 2
            assert (await conn.fetchrow(KEPT))["n"] == 2
            route.cache.store.flush()
            assert await pg.calls(PURGED_AT_ORIGIN) == purged_calls + 1
            assert await pg.calls(KEPT_AT_ORIGIN) == kept_calls
            again = {t.template_id: t for t in control.stats(view.cache_id).templates}
            assert again[kept.template_id].hits == kept.hits + 1
            assert again[purged.template_id].misses == purged.misses + 1

            # P (shift+p) still purges the whole cache.
            route.cache.store.flush()
            await pilot.press("P")
            assert isinstance(app.screen, ConfirmModal)
            assert "every cached result" in str(app.screen.query_one(".message", Label).content)
            await pilot.press("y")
            await settle(pilot)
            assert control.status(view.cache_id).entries == 0
        finally:
            await conn.close()

"""Keyboard paths, errors and the command palette, on the deterministic control (fast)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from textual.widgets import Button, Input, Label

from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.add_drawer import AddPolyScaleDrawer
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.help import MORE, HelpScreen
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from neonpoly.tui.screens.template_details import TemplateDetailsModal
from neonpoly.tui.widgets.template_table import TemplateTable
from tests.tui.fakes import PASSWORD, DemoControl
from tests.tui.scenes import settle


def _text(app: ConsoleApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Label).content)


def _footer(app: ConsoleApp) -> dict[str, str]:
    """What the footer shows: key → description of every shown, active binding."""
    return {
        key: active.binding.description for key, active in app.screen.active_bindings.items() if active.binding.show
    }


async def test_add_drawer_focuses_the_key_box_and_its_footer_names_its_keys() -> None:
    control = DemoControl()
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", *"napi_quoted")
        drawer = app.screen
        assert isinstance(drawer, AddPolyScaleDrawer)
        assert drawer.query_one("#api-key", Input).value == "napi_quoted"  # typing lands (q too: a letter in the box)
        # The drawer's keys, not the page's underneath (a Add, m Manage, v View cache).
        assert _footer(app) == {"escape": "Close", "enter": "Sign in", "tab": "Next"}
        await pilot.press("enter")
        await settle(pilot)
        assert control.api_keys == ["napi_quoted"]
        assert app.focused is drawer.query_one("#authorize", Button)
        assert _footer(app) == {"escape": "Close", "enter": "Authorize", "tab": "Next"}
        await pilot.press("shift+tab", "shift+tab")  # the Workspace select: enter opens it
        assert "enter" not in _footer(app)
        await pilot.press("tab", "tab")
        await pilot.pause(0.25)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, ManagePolyScaleDrawer) and control.integrations()


async def test_add_with_enter_enter_on_an_empty_key() -> None:
    control = DemoControl()
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", "enter")  # empty box: $NEON_API_KEY or local
        await settle(pilot)
        assert control.api_keys == [None]
        await pilot.press("enter")  # Authorize Access has the focus
        await settle(pilot)
        assert isinstance(app.screen, ManagePolyScaleDrawer) and control.integrations()


async def test_manage_drawer_footer_names_its_keys() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("m")
        assert _footer(app) == {
            "escape": "Close",
            "c": "Copy",
            "s": "Show/hide",
            "v": "View cache",
            "p": "Purge",
            "r": "Remove",
        }


async def test_counts_are_pluralised() -> None:
    control = DemoControl(configured=True)
    control.entries = control.connections = 1
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await pilot.pause()
        assert _text(app, "#polyscale-configured .description").endswith("· 1 entry")
        await pilot.press("m")
        assert _text(app, "#entries-line").endswith("· 1 connection")
        await pilot.press("p", "y")
        await settle(pilot)
        # Read each note right away: a notification expires after a few seconds, and on a
        # loaded machine the remove below took long enough for the purge's to be gone.
        assert "Purged 1 entry." in " ".join(str(n.message) for n in app._notifications)
        await pilot.press("r", "y")
        await settle(pilot)
        assert "ended 1 connection." in " ".join(str(n.message) for n in app._notifications)


async def test_cache_view_counts_one_query_and_shows_the_snapshot_hit_rate() -> None:
    control = DemoControl(configured=True, traffic=False)
    control._stats.record(control.integrations()[0].cache_id, "t1", "SELECT 1", (), "hit", 0.001)
    control._stats.record(control.integrations()[0].cache_id, "t2", "UPDATE t", (), "write", 0.001)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("v")
        assert _text(app, "#cv-calls") == "2 queries"
        # 1 hit, 0 misses, 1 pass-through: 100% of the cacheable lookups (not 1 of 2 calls).
        assert _text(app, "#cv-hit-rate") == "hit rate 100%"
        control._stats.reset()
        control._stats.record(control.integrations()[0].cache_id, "t1", "SELECT 1", (), "hit", 0.001)
        app.refresh_views()
        assert _text(app, "#cv-calls") == "1 query"


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_help_prose_wraps_inside_the_card(size: tuple[int, int]) -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=size) as pilot:
        await pilot.press("question_mark")
        card = app.screen.query_one("#help")
        about = app.screen.query_one(".about", Label)
        card.scroll_end(animate=False)
        await pilot.pause()
        assert about.size.width <= card.content_region.width  # never past the card's edge
        assert about.size.height >= 3  # the whole sentence, wrapped
        assert "writes around it do not." in str(about.content)


async def test_help_says_more_keys_follow_until_scrolled_to_the_end() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        card = app.screen.query_one("#help")
        assert card.border_subtitle == MORE  # about half the keys fit at 80x24
        for _ in range(4):  # the keys the cue names scroll the card: it has the focus
            await pilot.press("pagedown")
        await pilot.pause()
        assert card.scroll_y == card.max_scroll_y > 0 and card.border_subtitle == ""
        await pilot.press("pageup")
        await pilot.pause()
        assert card.border_subtitle == MORE
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        card = app.screen.query_one("#help")
        assert card.max_scroll_y == 0 and card.border_subtitle == ""  # all of it shows: no cue


async def test_sign_in_error_is_inline_and_retry_recovers() -> None:
    control = DemoControl(sign_in_error="401 Unauthorized: bad key", add_failures=1)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.press("a", "enter")
        await settle(pilot)
        assert "Sign in failed: 401 Unauthorized" in _text(app, "#error")
        control.sign_in_error = None
        await pilot.pause(0.25)  # a Button ignores presses during its 0.2 s press effect
        await pilot.press("enter")  # focus went back to the key box: enter retries
        await settle(pilot)
        assert _text(app, "#error") == ""
        await pilot.press("enter")  # Authorize Access: fails once
        await settle(pilot)
        assert isinstance(app.screen, AddPolyScaleDrawer)
        assert "did not wake up" in _text(app, "#error")
        assert str(app.screen.query_one("#authorize", Button).label) == "Retry"
        await pilot.pause(0.25)
        await pilot.press("enter")  # Retry
        await settle(pilot)
        assert isinstance(app.screen, ManagePolyScaleDrawer)
        assert control.integrations()


async def test_keys_without_integration_explain_instead_of_failing() -> None:
    app = ConsoleApp(DemoControl(), refresh_seconds=None)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        for key in ("m", "v", "p", "r", "c"):
            await pilot.press(key)
            assert isinstance(app.screen, IntegrationsScreen)
        notes = [str(n.message) for n in app._notifications]
        assert len(notes) == 5 and all("press a to add" in n for n in notes)


async def test_manage_keys_reveal_copy_and_cancel() -> None:
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.press("m")
        assert urlsplit(_text(app, "#conn-string")).password == "••••••"
        await pilot.press("s")
        assert PASSWORD in _text(app, "#conn-string")
        await pilot.press("c")
        await settle(pilot)  # the copy runs in a worker (a clipboard tool may take a moment)
        assert app.clipboard.endswith(control.integrations()[0].cache_id)
        assert PASSWORD in app.clipboard
        await pilot.press("escape")
        assert isinstance(app.screen, IntegrationsScreen)
        await pilot.press("m")  # shown again: the password is hidden again
        assert urlsplit(_text(app, "#conn-string")).password == "••••••"
        await pilot.press("a")  # already added: Add says so and stays on Manage
        assert isinstance(app.screen, ManagePolyScaleDrawer)


async def test_cache_view_filter_and_sort() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("v")
        screen = app.screen
        assert isinstance(screen, CacheViewScreen)
        table = screen.query_one(TemplateTable)
        assert table.row_count == 6
        first = [row.key.value for row in table.ordered_rows]
        await pilot.press("s")  # calls → hit %
        assert "hit %" in _text(app, "#cv-sort")
        assert [row.key.value for row in table.ordered_rows] != first
        await pilot.press("slash", *"orders")
        assert screen.query_one("#filter", Input).has_focus
        assert table.row_count == 1
        await pilot.press("escape")  # clears the filter
        assert table.row_count == 6
        await pilot.press("escape")  # leaves the view
        assert isinstance(app.screen, IntegrationsScreen)


async def test_cache_view_keys_act_on_the_highlighted_query() -> None:
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await pilot.press("v")
        screen = app.screen
        assert isinstance(screen, CacheViewScreen)
        footer = _footer(app)
        assert (footer["enter"], footer["p"], footer["P"]) == ("Details", "Purge query", "Purge all")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Purge query template", "Query details", "Purge cache"} <= titles
        await pilot.press("down")  # t2: the orders query, 97 misses stored
        chosen = screen.highlighted()
        assert chosen is not None and chosen.template_id == "t2"
        await pilot.press("enter")
        assert isinstance(app.screen, TemplateDetailsModal)
        assert "LIMIT [?]" in _text(app, "#details-template")  # brackets are text, not markup
        await pilot.press("escape")
        await pilot.press("p")
        assert isinstance(app.screen, ConfirmModal)
        assert chosen.template in _text(app, ".message")
        await pilot.press("y")
        await settle(pilot)
        assert control.purged_templates == ["t2"] and control.entries == 1204 - 97
        assert "Purged 97 entries of this query." in [str(n.message) for n in app._notifications]
        await pilot.press("P", "y")
        await settle(pilot)
        assert control.entries == 0


async def test_query_keys_outside_the_cache_view_explain() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.pause()
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert "Purge query template" not in titles  # only where a row can be highlighted
        await app.run_action("purge_template")
        await pilot.pause()
        assert isinstance(app.screen, IntegrationsScreen)
        assert any("Open the cache view" in str(n.message) for n in app._notifications)


async def test_every_action_is_in_the_command_palette() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {
            "Add PolyScale",
            "Manage PolyScale",
            "View cache",
            "Purge cache",
            "Remove integration",
            "Copy connection string",
            "Help",
            "Quit",
        } <= titles
        await pilot.press("ctrl+p", *"view cache")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, CacheViewScreen)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, CacheViewScreen)


async def test_purge_and_remove_can_be_cancelled() -> None:
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("p", "n")
        await pilot.press("r", "escape")
        await pilot.press("r", "enter")  # focus starts on Cancel: enter never destroys
        await settle(pilot)
        assert control.entries == 1204 and control.integrations()

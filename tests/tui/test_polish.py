"""Issue 12's polish points, on the deterministic control: keys in drawers and dialogs, the
Add drawer's steps, visible focus, local-origin wording, and what `c Copy` really did."""

from __future__ import annotations

import stat
from itertools import accumulate
from pathlib import Path

import pytest
from rich.style import Style
from textual.geometry import Region
from textual.selection import Selection
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Select

from neonpoly.control.interface import SignInResult
from neonpoly.control.local import LocalControl
from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.add_drawer import NOTES, AddPolyScaleDrawer
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.help import HelpScreen
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from neonpoly.tui.screens.template_details import TemplateDetailsModal
from neonpoly.tui.widgets.conn_string import url_parts
from neonpoly.tui.widgets.scroll import Scroll
from tests.tui.fakes import PASSWORD, DemoControl
from tests.tui.scenes import settle


def footer(app: ConsoleApp) -> dict[str, str]:
    return {
        key: active.binding.description for key, active in app.screen.active_bindings.items() if active.binding.show
    }


def text(app: ConsoleApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Label).content)


def notes(app: ConsoleApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


# -- keys in drawers and dialogs -----------------------------------------------------------


async def test_dialog_footers_show_the_dialogs_keys() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("m", "r")
        assert isinstance(app.screen, ConfirmModal)
        assert footer(app) == {"y": "Confirm", "n": "Cancel", "escape": "Cancel"}
        await pilot.press("escape", "question_mark")  # help opens from the drawer too
        assert isinstance(app.screen, HelpScreen)
        assert footer(app) == {"escape": "Close"}
        await pilot.press("escape", "escape", "v", "enter")
        assert isinstance(app.screen, TemplateDetailsModal)
        assert footer(app) == {"escape": "Close"}


async def test_drawers_say_esc_close_and_q_closes_them() -> None:
    app = ConsoleApp(DemoControl(), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a")
        assert isinstance(app.screen, AddPolyScaleDrawer)
        assert text(app, ".drawer-title .hint") == "esc Close"
        await pilot.press("q")  # typed into the focused key box: a letter, not a close
        assert isinstance(app.screen, AddPolyScaleDrawer)
        assert app.screen.query_one("#api-key", Input).value == "q"
        await pilot.press("tab", "q")  # off the box: q closes the drawer
        assert isinstance(app.screen, IntegrationsScreen) and app.is_running
        await pilot.press("a", "enter", "enter")
        await settle(pilot)
        assert isinstance(app.screen, ManagePolyScaleDrawer)
        assert text(app, ".drawer-title .hint") == "esc Close"
        assert footer(app)["escape"] == "Close"
        await pilot.press("q")
        assert isinstance(app.screen, IntegrationsScreen) and app.is_running
        await pilot.press("m", "p", "q")  # q in a dialog answers no
        assert isinstance(app.screen, ManagePolyScaleDrawer)


@pytest.mark.parametrize("keys", [(), ("a",), ("a", "tab"), ("m",), ("m", "v")], ids=str)
async def test_ctrl_c_quits_from_any_screen(keys: tuple[str, ...]) -> None:
    control = DemoControl(configured="m" in keys)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(*keys)
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert not app.is_running
    assert app.return_code == 0


async def test_ctrl_c_with_text_selected_in_the_key_box_copies_it() -> None:
    app = ConsoleApp(DemoControl(), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", *"napi_abc")
        box = app.screen.query_one("#api-key", Input)
        box.select_all()
        await pilot.press("ctrl+c")
        await settle(pilot)
        assert app.is_running and app.clipboard == "napi_abc"


# -- the Add drawer ----------------------------------------------------------------------------


async def test_workspace_is_chosen_and_the_primary_style_moves_on() -> None:
    app = ConsoleApp(DemoControl(), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a")
        drawer = app.screen
        sign_in, authorize = drawer.query_one("#sign-in", Button), drawer.query_one("#authorize", Button)
        select = drawer.query_one("#workspace", Select)
        assert (sign_in.variant, authorize.variant) == ("primary", "default")
        assert select.disabled and not select._allow_blank  # no blank choice, ever
        await pilot.press("enter")
        await settle(pilot)
        assert (sign_in.variant, authorize.variant) == ("default", "primary")
        assert select.value == "default" and not select.disabled  # pre-selected
        assert [value for _, value in select._options] == ["default", "shop-team"]


async def test_no_workspace_says_so_instead_of_a_silent_authorize() -> None:
    class NoWorkspace(DemoControl):
        async def sign_in(self, api_key: str | None = None) -> SignInResult:
            return SignInResult("neon", "Neon API key …abcd", ())

    app = ConsoleApp(NoWorkspace(), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", "enter")
        await settle(pilot)
        drawer = app.screen
        assert "no workspace" in text(app, "#error")
        assert drawer.query_one("#authorize", Button).disabled
        drawer.query_one("#authorize", Button).disabled = False
        drawer.query_one("#authorize", Button).press()  # even if it were pressed
        await settle(pilot)
        assert "Choose a workspace first" in text(app, "#error")
        assert isinstance(app.screen, AddPolyScaleDrawer)


def _look(widget: Widget) -> list[tuple[str, Style | None]]:
    """What the widget draws: the text and style of every segment (of a scrolling column:
    of its scrollbar, which shows its focus)."""
    target: Widget = widget
    if isinstance(widget, Select):
        target = widget.query_one("SelectCurrent")
    elif isinstance(widget, Scroll):
        target = widget.vertical_scrollbar
    strips = target.render_lines(Region(0, 0, target.size.width, target.size.height))
    return [(segment.text, segment.style) for strip in strips for segment in strip]


def _visibly_different(one: list[tuple[str, Style | None]], two: list[tuple[str, Style | None]]) -> bool:
    """A change a person sees: bold, reverse or underline toggled somewhere, or a background
    that moved by more than a faint tint (Textual's own focus style for compact fields is a
    5% tint, which nobody sees)."""

    def marks(look: list[tuple[str, Style | None]]) -> set[tuple[bool, bool, bool]]:
        return {(bool(st.bold), bool(st.reverse), bool(st.underline)) for text, st in look if st and text.strip()}

    def backgrounds(look: list[tuple[str, Style | None]]) -> list[tuple[int, int, int]]:
        """The colour each cell shows most of: its background, or its colour when reversed
        (a scrollbar's thumb); a block glyph shows its colour too."""
        shown = []
        for text, st in look:
            colour = None
            if st is not None:
                blocks = any(glyph in "▁▂▃▄▅▆▇█" for glyph in text)
                colour = st.color if st.reverse or blocks else st.bgcolor
            shown.append(colour.get_truecolor() if colour else (0, 0, 0))
        return shown

    if marks(one) != marks(two):
        return True
    return any(sum(abs(a - b) for a, b in zip(x, y, strict=True)) > 60
               for x, y in zip(backgrounds(one), backgrounds(two), strict=False))


@pytest.mark.parametrize(
    ("keys", "size"),
    [(("a",), (80, 24)), (("a", "enter"), (80, 24)), (("a", "enter", "enter"), (80, 24)), (("m",), (80, 24)),
     (("m",), (120, 40)), ((), (80, 24)), ((), (60, 16))],
    ids=["add", "add-signed-in", "add-failed-scrolls", "manage", "manage-wide", "page", "page-scrolls"],
)
async def test_every_tab_stop_shows_focus(keys: tuple[str, ...], size: tuple[int, int]) -> None:
    control = DemoControl(configured=keys == ("m",), add_failures=1)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=size) as pilot:
        await pilot.press(*keys)
        await settle(pilot)
        chain = list(app.screen.focus_chain)
        assert chain and all(isinstance(w, (Input, Select, Button, Scroll)) for w in chain), chain
        for scroll in app.screen.query(Scroll):  # a column is a Tab stop only when it scrolls
            assert (scroll in chain) == (scroll.max_scroll_y > 0), scroll
        for widget in chain:
            widget.focus()
            await pilot.pause()
            focused = _look(widget)
            app.screen.set_focus(None)
            await pilot.pause()
            assert _visibly_different(_look(widget), focused), f"{widget!r}: focus is not visible"


# -- local origin --------------------------------------------------------------------------------


async def test_local_origin_hides_neon_only_wording() -> None:
    app = ConsoleApp(DemoControl(local=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a")
        assert text(app, "#note") == NOTES[None]  # before signing in, both are possible
        await pilot.press("enter")
        await settle(pilot)
        assert text(app, "#note") == NOTES["local"]
        assert text(app, "#account") == "Local origin: no sign-in needed"
        assert text(app, "#step-1").endswith("(local origin)")
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, ManagePolyScaleDrawer)
        assert "Neon" not in text(app, ".warning") and "SQL Editor" not in text(app, ".warning")


class UpstreamDemo(DemoControl):
    """`tui --upstream URL`: signed in to the URL's origin, which may be on another machine."""

    async def sign_in(self, api_key: str | None = None) -> SignInResult:
        await super().sign_in(api_key)
        return SignInResult("local", "db.example.com:5432", ("local",))


async def test_an_upstream_origin_is_named_not_called_local(state_root: Path) -> None:
    # What LocalControl gives the drawer for `tui --upstream URL`: the origin's host:port.
    control = LocalControl(state_root, upstream="postgres://u:pw@db.example.com/app")
    assert (await control.sign_in()).account == "db.example.com:5432"
    app = ConsoleApp(UpstreamDemo(local=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("a", "enter")
        await settle(pilot)
        # Before: "Local origin" and "It caches your local PostgreSQL", whatever the URL's host.
        assert text(app, "#account") == "Origin db.example.com:5432 (--upstream): no sign-in needed"
        assert text(app, "#note").startswith("It caches the PostgreSQL at db.example.com:5432 (--upstream)")
        assert text(app, "#step-1").endswith("(--upstream URL)")


# -- c Copy says what it did -------------------------------------------------------------------


async def test_copy_without_a_clipboard_tool_says_osc_52() -> None:
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.press("m", "c")
        await settle(pilot)
        assert PASSWORD in app.clipboard
        [note] = notes(app)
        assert note.startswith("Sent the connection string for neondb as neondb_owner to the terminal clipboard")
        assert "(OSC 52); if nothing was copied, press s and select the string shown." in note


def _tool(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return [str(path)]


async def test_copy_with_a_clipboard_tool_uses_it(tmp_path: Path) -> None:
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    app.clipboard_command = _tool(tmp_path, "fake-copy", f"cat > {tmp_path / 'board'}")
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.press("c")
        await settle(pilot)
        assert (tmp_path / "board").read_text() == control.connection_string(
            control.integrations()[0].cache_id, reveal=True)
        assert notes(app) == ["Copied the connection string for neondb as neondb_owner to the clipboard (fake-copy)."]


async def test_copy_with_a_failing_clipboard_tool_says_osc_52(tmp_path: Path) -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    app.clipboard_command = _tool(tmp_path, "broken-copy", "exit 1")
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.press("c")
        await settle(pilot)
        [note] = notes(app)
        assert "(OSC 52); if nothing was copied, open Manage (m), press s and select the string shown." in note


async def test_revealed_string_breaks_only_between_its_parts() -> None:
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("m", "s")
        label = app.screen.query_one("#conn-string", Label)
        whole = control.connection_string(control.integrations()[0].cache_id, reveal=True)
        lines = [strip.text.strip() for strip in label.render_lines(Region(0, 0, *label.size))]
        lines = [line for line in lines if line]
        assert len(lines) > 1 and "".join(lines) == whole
        # Every line ends where a part of the URL ends: the password, host or id never split.
        part_ends = set(accumulate(len(part) for part in url_parts(whole)))
        assert set(accumulate(len(line) for line in lines)) <= part_ends, lines
        assert any(line.endswith(f"{PASSWORD}@") for line in lines)
        assert lines[-1].startswith("?application_name=")
        # Selected with the console's own mouse selection, it copies as one string.
        assert label.get_selection(Selection(None, None)) == (whole, "\n")
        await pilot.press("escape", "v")
        assert isinstance(app.screen, CacheViewScreen)


# -- statuses and figures in the cache view ------------------------------------------------------


async def test_local_hits_save_ms_and_statuses_explain_themselves() -> None:
    control = DemoControl(configured=True, local=True, traffic=False)
    cache_id = control.integrations()[0].cache_id
    record = control._stats.record
    record(cache_id, "t1", "SELECT name FROM items WHERE id = $1", ("items",), "miss", 0.0016)
    record(cache_id, "t1", "SELECT name FROM items WHERE id = $1", ("items",), "hit", 0.0004)
    record(cache_id, "t2", "COPY items TO STDOUT", ("items",), "uncacheable", 0.002,
           reason="not cacheable (uncacheable)")
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("v")
        assert text(app, "#cv-saved") == "saved 1.2 ms"
        table = app.screen.query_one("#templates")
        rows = {key.value: [c.plain for c in table.get_row(key)] for key in table.rows}  # type: ignore[attr-defined]
        assert rows["t1"][-1] == "cacheable" and rows["t1"][4] == "1.2 ms"
        assert rows["t2"][-1] == "not cacheable" and rows["t2"][4] == "—"  # nothing to save
        view = app.screen
        assert isinstance(view, CacheViewScreen)
        await pilot.press("down")  # sorted by calls: t1 (2), then t2 (1)
        chosen = view.highlighted()
        assert chosen is not None and chosen.template_id == "t2"
        await pilot.press("enter")
        assert isinstance(app.screen, TemplateDetailsModal)
        values = {str(row.query_one(".detail-label", Label).content): str(row.query_one(".detail-value", Label).content)
                  for row in app.screen.query(".detail-row")}
        assert values["status"] == "not cacheable — this kind of statement is never cached"
        assert "last status" not in values and "reason" not in values

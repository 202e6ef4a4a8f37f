"""The Manage drawer asks the origin for its databases and roles each time it opens (in a
worker: the drawer is usable meanwhile), shows a failure inline, and says when the string
carries no password for the chosen role."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from textual.pilot import Pilot
from textual.widgets import Button, Label, Select

from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from tests.tui.fakes import DemoControl
from tests.tui.scenes import settle


async def until(pilot: Pilot[None], condition: Callable[[], bool], tries: int = 200) -> None:
    for _ in range(tries):
        if condition():
            return
        await pilot.pause(0.01)
    raise AssertionError("condition not met")


def note(app: ConsoleApp) -> Label:
    return app.screen.query_one("#choices-note", Label)


async def test_the_drawer_lists_what_the_origin_offers_now() -> None:
    control = DemoControl(configured=True, local=True)
    control.choices = (("app", "analytics"), ("app_user", "reporter"))
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("m")
        await settle(pilot)
        assert isinstance(app.screen, ManagePolyScaleDrawer)
        await until(pilot, lambda: control.choice_refreshes >= 1)
        database = app.screen.query_one("#database", Select)
        await until(pilot, lambda: "analytics" in {v for _, v in database._options})
        database.value = "analytics"  # a listed option now: chosen, recorded, in the string
        await until(pilot, lambda: control.integrations()[0].database == "analytics")
        role = app.screen.query_one("#role", Select)
        assert {v for _, v in role._options} >= {"reporter", control.integrations()[0].role}
        assert not note(app).display
        # Closed and opened again: the origin is asked again.
        asked = control.choice_refreshes
        await pilot.press("escape", "m")
        await until(pilot, lambda: control.choice_refreshes == asked + 1)


async def test_a_failed_listing_shows_inline_and_the_drawer_stays_usable() -> None:
    control = DemoControl(configured=True, local=True)
    control.choices_error = "cannot reach the origin 127.0.0.1:5432: connection refused"
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("m")
        await until(pilot, lambda: bool(note(app).display))
        shown = str(note(app).content)
        assert shown.startswith("Could not list the origin's databases and roles:") and "connection refused" in shown
        await pilot.press("s")  # the drawer still answers
        assert "s Hide" in str(app.screen.query_one("#reveal", Button).label)


async def test_a_role_without_a_known_password_is_said_so() -> None:
    control = DemoControl(configured=True, local=True)
    assert control._view is not None
    control._view = replace(control._view, password_known=False)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("m")
        await until(pilot, lambda: bool(note(app).display))
        assert "carries none" in str(note(app).content) and control._view.role in str(note(app).content)


async def test_a_refresh_between_a_pick_and_its_handler_does_not_undo_the_pick() -> None:
    """The 1 s ticker may repaint the drawer after a pick was made but before its Changed
    message was handled; the pick must win (it lost, under load, before the fix)."""
    control = DemoControl(configured=True, local=True)
    control.choices = (("app", "analytics"), ("app_user", "reporter"))
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("m")
        await settle(pilot)
        drawer = app.screen
        assert isinstance(drawer, ManagePolyScaleDrawer)
        database = drawer.query_one("#database", Select)
        await until(pilot, lambda: "analytics" in {v for _, v in database._options})
        before = control.integrations()[0].database
        assert before != "analytics"
        database.value = "analytics"  # Changed is queued, not handled yet ...
        drawer.refresh_data()  # ... when a tick repaints from the stored (old) choice
        await settle(pilot)
        assert control.integrations()[0].database == "analytics"
        assert database.value == "analytics"

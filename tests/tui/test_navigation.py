"""Screen navigation under any sequence of add / manage / view / purge / remove, repeated.

The Manage drawer and the cache view are kept installed between showings; these tests hold
that no sequence of keys installs one twice, leaves one mounted after its cache is gone, or
uninstalls one still on the stack (issue 12: `DuplicateIds 'manage-drawer'` after remove and
re-add, `'cache-view'` after view, remove, re-add, view).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
from textual.pilot import Pilot
from textual.screen import Screen

from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.add_drawer import AddPolyScaleDrawer
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from tests.tui.fakes import DemoControl
from tests.tui.scenes import settle

ADD = ("a", "enter", "enter")  # open the drawer, sign in (empty key), Authorize Access


def mounted_screens(app: ConsoleApp) -> list[Screen[object]]:
    """Every screen the app holds in its DOM: on the stack, or kept installed off it."""
    return [node for node in app._nodes if isinstance(node, Screen)]


def assert_healthy(app: ConsoleApp) -> None:
    assert app.is_running and app._exception is None, app._exception
    screens = mounted_screens(app)
    stack = app.screen_stack
    assert isinstance(stack[0], IntegrationsScreen) and len(stack) <= 4, stack
    assert len({id(s) for s in stack}) == len(stack), "a screen is on the stack twice"
    # At most one kept Manage drawer and one cache view, of the integration there is.
    views = app.control.integrations()
    for kind in (ManagePolyScaleDrawer, CacheViewScreen):
        kept = [s for s in screens if isinstance(s, kind)]
        assert len(kept) <= len(views), (kind.__name__, kept)
        for screen in kept:
            assert any(v.cache_id == screen.cache_id for v in views), (kind.__name__, screen)
    off_stack = [s for s in screens if s not in stack]
    assert all(isinstance(s, (ManagePolyScaleDrawer, CacheViewScreen)) for s in off_stack), off_stack


async def press(pilot: Pilot[None], *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(pilot)
    assert_healthy(pilot.app)  # type: ignore[arg-type]


# Many keys each, every one waited for (press, then settle): ~45 s a case on a 2-core machine
# with two busy cores beside it, past the default 120 s under a CI-like load of 10.
pytestmark = pytest.mark.timeout(600)

# With the ticker, the Manage drawer of a vanished cache also closes itself. A tick every
# 0.25 s still comes between the keys; every 0.05 s kept a loaded machine's app so busy that
# one key was not taken in within pilot's 30 s (flake-tui-1.log).
TICK = 0.25


def app_for(control: DemoControl, ticker: bool) -> ConsoleApp:
    return ConsoleApp(control, refresh_seconds=TICK if ticker else None)


@pytest.mark.parametrize("ticker", [False, True], ids=["no-ticker", "ticker"])
async def test_add_remove_add_again(ticker: bool) -> None:
    control = DemoControl()
    app = app_for(control, ticker)
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(2):
            await press(pilot, *ADD)
            assert isinstance(app.screen, ManagePolyScaleDrawer) and control.integrations()
            await press(pilot, "r", "y")
            assert isinstance(app.screen, IntegrationsScreen) and not control.integrations()
        # The drawer closed with esc (kept, off the stack), then remove from the page.
        await press(pilot, *ADD, "escape", "r", "y", *ADD)
        assert isinstance(app.screen, ManagePolyScaleDrawer)


@pytest.mark.parametrize("ticker", [False, True], ids=["no-ticker", "ticker"])
async def test_view_remove_add_view(ticker: bool) -> None:
    control = DemoControl()
    app = app_for(control, ticker)
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(2):
            await press(pilot, *ADD, "v")
            assert isinstance(app.screen, CacheViewScreen)
            await press(pilot, "escape", "escape", "r", "y")
            assert isinstance(app.screen, IntegrationsScreen)
        await press(pilot, *ADD, "v", "escape", "r", "y", *ADD, "v")
        assert isinstance(app.screen, CacheViewScreen)
        await press(pilot, "escape")
        assert isinstance(app.screen, ManagePolyScaleDrawer)


async def test_removed_elsewhere_then_added_again_shows_fresh_screens() -> None:
    control = DemoControl()
    app = app_for(control, ticker=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await press(pilot, *ADD, "v")
        old_view = app.screen
        await press(pilot, "escape")
        old_drawer = app.screen
        assert isinstance(old_drawer, ManagePolyScaleDrawer)
        await control.remove(control.integrations()[0].cache_id)  # as the CLI would
        for _ in range(100):  # the ticker closes the drawer of a vanished cache
            if isinstance(app.screen, IntegrationsScreen):
                break
            await pilot.pause(0.02)
        assert isinstance(app.screen, IntegrationsScreen)
        await press(pilot, *ADD, "v")
        assert app.screen is not old_view and isinstance(app.screen, CacheViewScreen)
        assert old_view not in mounted_screens(app) and old_drawer not in mounted_screens(app)


async def test_replaced_elsewhere_while_its_cache_view_is_open() -> None:
    """Removed and added again by the CLI (a new cache id) under an open cache view."""
    control = DemoControl(configured=True)
    app = ConsoleApp(control, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await press(pilot, "m", "v")
        old_view = app.screen
        assert isinstance(old_view, CacheViewScreen)
        await control.remove(old_view.cache_id)
        await control.add("default", lambda _line: None)
        assert control._view is not None
        control._view = replace(control._view, cache_id="0b7e-new-cache")
        await press(pilot, "m")
        assert isinstance(app.screen, ManagePolyScaleDrawer) and app.screen.cache_id == "0b7e-new-cache"
        await press(pilot, "v")
        assert isinstance(app.screen, CacheViewScreen) and app.screen.cache_id == "0b7e-new-cache"
        assert old_view not in mounted_screens(app)


async def test_esc_from_the_cache_view_returns_where_it_came_from() -> None:
    app = ConsoleApp(DemoControl(configured=True), refresh_seconds=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await press(pilot, "m", "s", "v")  # reveal, then the cache view over the drawer
        assert isinstance(app.screen, CacheViewScreen)
        await press(pilot, "escape")
        drawer = app.screen
        assert isinstance(drawer, ManagePolyScaleDrawer)
        assert drawer.revealed  # uncovered, not reopened: the drawer is as it was left
        await press(pilot, "v", "m")  # m in the cache view goes back down to that drawer
        assert app.screen is drawer and len(app.screen_stack) == 2
        await press(pilot, "escape", "v")  # from the page, esc goes back to the page
        await press(pilot, "escape")
        assert isinstance(app.screen, IntegrationsScreen)
        await press(pilot, "m")  # opened anew: the password is hidden again
        reopened: object = app.screen  # (not narrowed by the isinstance checks above)
        assert reopened is drawer and not drawer.revealed


# -- random walks --------------------------------------------------------------------------


@dataclass
class Model:
    """What the console should show: the screen on top and whether PolyScale is added."""

    top: str = "page"  # page | manage | view | view-over-manage
    added: bool = False


def choices(model: Model) -> list[str]:
    if model.top == "page":
        return ["add", "manage", "view", "purge", "remove", "help"]
    if model.top == "manage":
        return ["esc", "view", "purge", "remove", "reveal", "cancel-remove", "q"]
    return ["esc", "manage", "purge-query", "purge-all", "sort"]


async def step(pilot: Pilot[None], model: Model, op: str) -> None:
    app = pilot.app
    if op == "add":
        keys: tuple[str, ...] = ADD if not model.added else ("a",)
        model.top, model.added = "manage", True
    elif op == "manage":
        keys = ("m",)
        model.top = "manage" if model.added else model.top
    elif op == "view":
        keys = ("v",)
        if model.added:
            model.top = "view-over-manage" if model.top == "manage" else "view"
    elif op == "purge":
        keys = ("p", "y") if model.added else ("p",)
    elif op == "remove":
        keys = ("r", "y") if model.added else ("r",)
        model.top, model.added = "page", False
    elif op == "cancel-remove":
        keys = ("r", "n")
    elif op == "help":
        keys = ("question_mark", "escape")
    elif op == "reveal":
        keys = ("s",)
    elif op == "q":
        keys = ("q",)
        model.top = "page"
    elif op == "esc":
        keys = ("escape",)
        model.top = {"manage": "page", "view": "page", "view-over-manage": "manage"}[model.top]
    elif op == "purge-query":
        keys = ("p", "y")
    elif op == "purge-all":
        keys = ("P", "y")
    elif op == "sort":
        keys = ("s",)
    else:  # pragma: no cover - a typo in choices()
        raise AssertionError(op)
    await press(pilot, *keys)
    expected = {
        "page": IntegrationsScreen,
        "manage": ManagePolyScaleDrawer,
        "view": CacheViewScreen,
        "view-over-manage": CacheViewScreen,
    }[model.top]
    assert isinstance(app.screen, expected), (op, model, app.screen_stack)
    assert bool(app.control.integrations()) == model.added, (op, model)
    depth = {"page": 1, "manage": 2, "view": 2, "view-over-manage": 3}[model.top]
    assert len(app.screen_stack) == depth, (op, model, app.screen_stack)
    assert not isinstance(app.screen, (ConfirmModal, AddPolyScaleDrawer))


@pytest.mark.parametrize("seed", range(4))
async def test_random_walks_stay_up_and_show_the_right_screen(seed: int) -> None:
    rng = random.Random(seed)
    control = DemoControl()
    app = app_for(control, ticker=seed % 2 == 1)
    model = Model()
    walked: list[str] = []
    async with app.run_test(size=(120, 40) if seed % 3 else (80, 24)) as pilot:
        await pilot.pause()
        for _ in range(18):  # four seeds x 18 steps: every screen and both sizes, in under a minute
            op = rng.choice(choices(model))
            walked.append(op)
            try:
                await step(pilot, model, op)
            except AssertionError as error:
                raise AssertionError(f"after {walked}: {error}") from error

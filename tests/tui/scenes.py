"""Every screen and drawer state of the console, as a deterministic app plus the keys that
reach it. Shared by the snapshot tests and `scripts/screenshots.py`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from textual.pilot import Pilot
from textual.widgets import Button, Input

from neonpoly.tui.app import ConsoleApp
from tests.tui.fakes import DemoControl

Steps = Callable[[Pilot[None]], Awaitable[None]]
SIZES: tuple[tuple[int, int], ...] = ((80, 24), (120, 40))


@dataclass(frozen=True)
class Scene:
    name: str
    what: str
    control: Callable[[], DemoControl] = DemoControl
    keys: tuple[str, ...] = ()
    extra: Steps | None = field(default=None)

    def app(self) -> ConsoleApp:
        # No ticker: the picture is taken at a known moment, not whenever a timer fires.
        return ConsoleApp(self.control(), refresh_seconds=None)

    async def run(self, pilot: Pilot[None]) -> None:
        await pilot.pause()
        for key in self.keys:
            await pilot.press(key)
            await settle(pilot)
        if self.extra is not None:
            await self.extra(pilot)
            await settle(pilot)
        if "enter" in self.keys:
            # A pressed Button keeps its "-active" look for 0.2 s: wait it out, or the
            # picture depends on how fast this machine is.
            await buttons_at_rest(pilot)
        # A focused Input's cursor blinks on a timer: freeze it (shown) so the picture does
        # not depend on when it is taken.
        for box in pilot.app.screen.query(Input):
            box.cursor_blink = False
        await pilot.pause()


async def buttons_at_rest(pilot: Pilot[None], timeout: float = 10.0) -> None:
    """Until no button on the screen shows its pressed look (polled, not a fixed wait)."""
    deadline = time.monotonic() + timeout
    while any(button.has_class("-active") for button in pilot.app.screen.query(Button)):
        assert time.monotonic() < deadline, "a button kept its pressed look"
        await pilot.pause(0.02)


async def settle(pilot: Pilot[None]) -> None:
    """Let workers finish and the screen catch up (workers await a few event-loop turns)."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def configured() -> DemoControl:
    return DemoControl(configured=True)


def configured_local() -> DemoControl:
    return DemoControl(configured=True, local=True)


def local() -> DemoControl:
    return DemoControl(local=True)


def failing_add() -> DemoControl:
    return DemoControl(add_failures=1)


def failing_sign_in() -> DemoControl:
    return DemoControl(sign_in_error="401 Unauthorized: the Neon API rejected this key")


def quiet() -> DemoControl:
    return DemoControl(configured=True, traffic=False)


async def choose_reporter(pilot: Pilot[None]) -> None:
    from textual.widgets import Select

    pilot.app.screen.query_one("#role", Select).value = "reporter"
    pilot.app.screen.query_one("#database", Select).value = "analytics"


SCENES: tuple[Scene, ...] = (
    Scene("integrations-available", "Integrations page before adding PolyScale"),
    Scene("integrations-configured", "PolyScale under CONFIGURED with hit rate", configured),
    Scene("integrations-local", "Header on a local origin", configured_local),
    Scene("add-drawer", "Add PolyScale drawer: How to add", keys=("a",)),
    Scene("add-signed-in", "Signed in, choose a workspace", keys=("a", "enter")),
    Scene("add-sign-in-error", "Sign in failed inline", failing_sign_in, keys=("a", "enter")),
    Scene("add-authorize-error", "Authorize failed inline with Retry", failing_add,
          keys=("a", "enter", "enter")),
    Scene("manage-drawer", "Manage PolyScale drawer", configured, keys=("m",)),
    Scene("manage-revealed", "Password revealed", configured, keys=("m", "s")),
    Scene("manage-database-role", "Database and Role rewrite the string", configured,
          keys=("m",), extra=choose_reporter),
    Scene("confirm-purge", "Purge confirmation", configured, keys=("m", "p")),
    Scene("confirm-remove", "Remove confirmation", configured, keys=("m", "r")),
    Scene("cache-view", "Cache view: live totals, series, templates", configured, keys=("v",)),
    Scene("cache-view-sorted", "Cache view sorted by time saved", configured,
          keys=("v", "s", "s")),
    Scene("cache-view-filtered", "Cache view filtered", configured,
          keys=("v", "slash", "p", "r", "o", "d")),
    Scene("cache-view-empty", "Cache view before any query", quiet, keys=("v",)),
    Scene("cache-view-details", "Details of the highlighted query", configured, keys=("v", "down", "enter")),
    Scene("help", "Help screen", configured, keys=("question_mark",)),
    # A local origin (embedded or --upstream URL) as a local user sees it: no Neon wording,
    # no project or branch, savings in ms.
    Scene("local-add-signed-in", "Local origin: signed in without Neon", local, keys=("a", "enter")),
    Scene("local-manage-revealed", "Local origin: Manage drawer, string shown", configured_local,
          keys=("m", "s")),
    Scene("local-cache-view", "Local origin: cache view, savings in ms", configured_local, keys=("v",)),
)

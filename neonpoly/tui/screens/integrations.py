"""The Integrations page: PolyScale under AVAILABLE (Add) or CONFIGURED (Manage)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import Button, Footer, Label

from neonpoly.control.interface import Control
from neonpoly.tui import format as fmt
from neonpoly.tui.widgets.cards import OTHER_INTEGRATIONS, PolyScaleCard, UnavailableCard
from neonpoly.tui.widgets.header import ConsoleHeader
from neonpoly.tui.widgets.scroll import Scroll

CARD_SPARK_SECONDS = 120  # the card shows the last two minutes; the cache view shows 15


class IntegrationsScreen(Screen[None]):
    BINDINGS = [
        Binding("a", "app.add", "Add"),
        Binding("m", "app.manage", "Manage"),
        Binding("v", "app.view_cache", "View cache"),
        Binding("p", "app.purge", "Purge", show=False),
        Binding("r", "app.remove", "Remove", show=False),
        Binding("c", "app.copy", "Copy", show=False),
    ]

    def __init__(self, control: Control) -> None:
        super().__init__(id="integrations")
        self.control = control

    def compose(self) -> ComposeResult:
        yield ConsoleHeader("Integrations")
        with Scroll(id="page"):
            yield Label(
                "[b]Integrations[/b] — a hub for managing third-party integrations with your project",
                id="page-title",
            )
            yield Label("CONFIGURED", classes="section-title")
            yield Label(
                "Nothing configured yet. Press [b]a[/b] to add PolyScale.", id="none-configured"
            )
            with Grid(id="configured", classes="cards"):
                yield PolyScaleCard(configured=True)
            yield Label("AVAILABLE", classes="section-title")
            with Grid(id="available", classes="cards"):
                yield PolyScaleCard(configured=False)
                for title, description in OTHER_INTEGRATIONS:
                    yield UnavailableCard(title, description)
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_data()

    def refresh_data(self) -> None:
        """Cheap reads only: called every second by the app's ticker."""
        self.query_one(ConsoleHeader).show(self.control.header())
        views = self.control.integrations()
        # Both cards exist; a class on the screen picks which one is displayed, so moving the
        # card between sections is a style change rather than a remount (no flicker).
        self.set_class(bool(views), "-configured")
        if views:
            view = views[0]
            status = self.control.status(view.cache_id)
            hits = self.control.stats(view.cache_id).series.hits
            card = self.query_one("#polyscale-configured", PolyScaleCard)
            card.show(status, fmt.tail(hits, CARD_SPARK_SECONDS))

    @on(Button.Pressed, "#add-polyscale")
    async def _add_pressed(self) -> None:
        await self.app.run_action("add")

    @on(Button.Pressed, "#manage-polyscale")
    async def _manage_pressed(self) -> None:
        await self.app.run_action("manage")

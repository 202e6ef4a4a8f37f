"""Integration cards: a title, a one-line description and one action, as on Neon's page."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Label, Sparkline

from neonpoly.control.interface import CacheStatus
from neonpoly.tui import format as fmt
from neonpoly.tui.widgets import set_text

POLYSCALE_BLURB = "Global cache for your database"

# The other integrations Neon's page listed in 2023-24; neonpoly only recreates PolyScale.
OTHER_INTEGRATIONS: tuple[tuple[str, str], ...] = (
    ("Vercel", "Preview branches for deployments"),
    ("GitHub", "A database branch per pull request"),
    ("Outerbase", "Spreadsheet-like view of your data"),
    ("Grafbase", "GraphQL API at the edge"),
    ("Datadog", "Metrics and logs of your project"),
)


class PolyScaleCard(Vertical):
    """The PolyScale card; one instance per section, the screen shows the right one."""

    def __init__(self, *, configured: bool) -> None:
        super().__init__(
            id="polyscale-configured" if configured else "polyscale-available",
            classes="card polyscale",
        )
        self.configured = configured
        self.border_title = "PolyScale"

    def compose(self) -> ComposeResult:
        yield Label(POLYSCALE_BLURB, classes="description")
        with Horizontal(classes="card-action"):
            if self.configured:
                yield Label("hit rate —", classes="hit-rate")
                yield Sparkline([], classes="card-spark")
                yield Button("Manage", id="manage-polyscale", compact=True, variant="primary")
            else:
                yield Label("No code changes", classes="muted grow")
                yield Button("Add", id="add-polyscale", compact=True, variant="primary")

    def show(self, status: CacheStatus, hits: Sequence[float]) -> None:
        """Refresh the live figures of a configured card (entries, hit rate, hits sparkline)."""
        if not self.configured:
            return
        set_text(
            self.query_one(".description", Label),
            f"Global database cache · {fmt.plural(status.entries, 'entry', 'entries')}",
        )
        set_text(self.query_one(".hit-rate", Label), f"hit rate {fmt.percent(status.hit_rate)}")
        spark = self.query_one(Sparkline)
        if list(spark.data or []) != list(hits):
            spark.data = list(hits)


class UnavailableCard(Vertical):
    """An integration of the time that neonpoly does not recreate."""

    def __init__(self, title: str, description: str) -> None:
        super().__init__(classes="card unavailable")
        self.border_title = title
        self.description = description

    def compose(self) -> ComposeResult:
        yield Label(self.description, classes="description")
        yield Label("not available in neonpoly", classes="muted")

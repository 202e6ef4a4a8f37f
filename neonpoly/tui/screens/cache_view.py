"""The cache view (PolyScale's Observability tab): live totals, 15-minute series, templates."""

from __future__ import annotations

import time

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, Sparkline

from neonpoly.control.interface import Control, ControlError
from neonpoly.stats import SERIES_SECONDS, StatsSnapshot, TemplateStats
from neonpoly.tui import format as fmt
from neonpoly.tui.widgets import set_text
from neonpoly.tui.widgets.header import ConsoleHeader
from neonpoly.tui.widgets.template_table import SORTS, TemplateTable

SERIES = (("hits", "hits"), ("misses", "misses"), ("passthrough", "pass-through"))


class CacheViewScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        # The sketch's `p purge template`: the highlighted row; the whole cache moves to shift+p.
        Binding("p", "app.purge_template", "Purge query"),
        Binding("P", "app.purge", "Purge all"),
        Binding("m", "app.manage", "Manage", show=False),
    ]

    def __init__(self, control: Control, cache_id: str, name: str) -> None:
        # No fixed id: a kept screen of a removed cache may still be mounted while the
        # next one is built (it is removed once off the stack).
        super().__init__()
        self.control = control
        self.cache_id = cache_id
        self.cache_name = name
        self.sort_index = 0
        self.needle = ""
        self._last: StatsSnapshot | None = None

    def compose(self) -> ComposeResult:
        yield ConsoleHeader(f"Integrations ▸ PolyScale ▸ {self.cache_name}")
        with Horizontal(id="cv-summary"):
            yield Label(f"PolyScale cache · {self.cache_name}", id="cv-title")
            yield Label(id="cv-hit-rate")
            yield Label(id="cv-saved")
            yield Label(id="cv-calls")
        yield Label(id="cv-fresh")
        with Vertical(id="cv-series"):
            for key, label in SERIES:
                with Horizontal(classes="series-row"):
                    yield Label(label, classes="series-label")
                    yield Sparkline([], id=f"spark-{key}", classes=f"spark-{key}")
                    yield Label(id=f"total-{key}", classes="series-total")
        with Horizontal(id="cv-table-bar"):
            yield Label(id="cv-sort")
            yield Label("last 15 min", id="cv-window")
        yield Input(placeholder="filter templates (esc clears)", id="filter", compact=True)
        yield TemplateTable()
        yield Label(
            "No queries yet. Connect with the PolyScale connection string (c copies it).",
            id="cv-empty",
        )
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one(TemplateTable).focus()
        self.refresh_data()

    def on_screen_resume(self) -> None:
        # Shown again (kept installed): catch up at once rather than at the next tick.
        self.refresh_data()

    def on_resize(self) -> None:
        self.refresh_data()

    def refresh_data(self) -> None:
        self.query_one(ConsoleHeader).show(self.control.header())
        snap = self.control.stats(self.cache_id)
        self._last = snap
        totals = snap.totals
        # The snapshot's rate is the one definition (neonpoly.stats.hit_rate); a dash rather
        # than 0% until a cacheable lookup has happened.
        rate = totals.hit_rate if totals.hits + totals.misses else None
        set_text(self.query_one("#cv-hit-rate", Label), f"hit rate {fmt.percent(rate)}")
        saved = fmt.duration(totals.time_saved_s) if rate is not None else fmt.DASH  # as hit rate
        set_text(self.query_one("#cv-saved", Label), f"saved {saved}")
        set_text(self.query_one("#cv-calls", Label), fmt.plural(totals.calls, "query", "queries"))
        try:
            fresh = self.control.status(self.cache_id).freshness
        except ControlError:  # removed meanwhile: the screen closes on its own
            fresh = None
        set_text(self.query_one("#cv-fresh", Label), f"fresh    {fmt.freshness(fresh, time.time())}")
        for key, _ in SERIES:
            values: tuple[int, ...] = getattr(snap.series, key)
            spark = self.query_one(f"#spark-{key}", Sparkline)
            data = fmt.tail(values, SERIES_SECONDS)
            if list(spark.data or []) != data:
                spark.data = data
            total = {"hits": totals.hits, "misses": totals.misses, "passthrough": totals.passthrough}[key]
            set_text(self.query_one(f"#total-{key}", Label), fmt.count(total))
        self._show_table()

    def _show_table(self) -> None:
        if self._last is None:
            return
        sort = SORTS[self.sort_index]
        table = self.query_one(TemplateTable)
        shown = table.show(self._last.templates, self.needle, sort, self.size.width)
        arrow = "▼" if sort.descending else "▲"
        found = f" · {shown} of {len(self._last.templates)} match “{self.needle}”" if self.needle else ""
        set_text(self.query_one("#cv-sort", Label), f"sorted by {sort.label} {arrow}{found}")
        self.query_one("#cv-empty", Label).display = not self._last.templates

    def highlighted(self) -> TemplateStats | None:
        """The template under the table's cursor, as of the last refresh (None: no rows)."""
        table = self.query_one(TemplateTable)
        if self._last is None or not table.row_count:
            return None
        key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
        return next((t for t in self._last.templates if t.template_id == key), None)

    @on(DataTable.RowSelected, "#templates")
    async def _row_selected(self) -> None:
        # enter on the table (its own binding, shown as "Details") and a click on a row.
        await self.run_action("app.template_details")

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        self._show_table()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_back(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display:
            # esc first clears the filter; a second esc leaves the view.
            box.value = ""
            box.display = False
            self.needle = ""
            self.query_one(TemplateTable).focus()
            self._show_table()
            return
        self.dismiss(None)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.needle = event.value.strip()
        self._show_table()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one(TemplateTable).focus()

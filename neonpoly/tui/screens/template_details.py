"""One query template in full: what the cache view's row has to clip, and the figures it has no
column for (p95s, statuses, reason)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label

from neonpoly.stats import TemplateStats
from neonpoly.tui import format as fmt


def detail_rows(stats: TemplateStats) -> list[tuple[str, str]]:
    """(label, value) pairs, in the order the card shows them."""
    statuses = " · ".join(f"{status} {fmt.count(n)}" for status, n in stats.by_status) or fmt.DASH
    return [
        ("template id", stats.template_id),
        ("tables", ", ".join(stats.tables) or fmt.DASH),
        ("calls", f"{fmt.count(stats.calls)} · {fmt.plural(stats.hits, 'hit', 'hits')} · "
                  f"{fmt.plural(stats.misses, 'miss', 'misses')}"),
        ("by status", statuses),
        ("hit rate", fmt.percent(stats.hit_rate if stats.hits + stats.misses else None)),
        ("hit latency", f"p50 {fmt.millis(stats.hit_p50_s)} · p95 {fmt.millis(stats.hit_p95_s)}"),
        ("miss latency", f"p50 {fmt.millis(stats.miss_p50_s)} · p95 {fmt.millis(stats.miss_p95_s)}"),
        ("time saved", fmt.duration(stats.time_saved_s)),
        ("TTL", fmt.ttl(stats.ttl)),
        # One row, word and explanation: "not cacheable — writes table products", never the
        # status twice ("uncacheable" / "not cacheable (uncacheable)").
        ("status", f"{fmt.status_word(stats.last_status)} — "
                   f"{fmt.status_explanation(stats.last_status, stats.last_reason)}"),
    ]


class TemplateDetailsModal(ModalScreen[None]):
    """A snapshot taken when opened: the figures hold still while being read."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, stats: TemplateStats) -> None:
        super().__init__(classes="details-screen")
        self.stats = stats

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="details"):
            yield Label("Query template", classes="title")
            # Template text is SQL: brackets in it ("LIMIT [?]") must not read as markup.
            yield Label(self.stats.template, id="details-template", markup=False)
            for label, value in detail_rows(self.stats):
                with Horizontal(classes="detail-row"):
                    yield Label(label, classes="detail-label")
                    yield Label(value, classes="detail-value", markup=False)
            yield Label("esc close", classes="hint")
        yield Footer()

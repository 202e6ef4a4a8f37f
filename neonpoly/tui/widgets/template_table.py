"""The per-template table of the cache view, updated cell by cell so it never flickers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from neonpoly.stats import TemplateStats
from neonpoly.tui import format as fmt


class Cell(Text):
    """Rendered text plus the raw value the table sorts by (so "1,204" sorts as 1204)."""

    def __init__(self, text: str, sort_value: Any, *, right: bool = True) -> None:
        super().__init__(text, justify="right" if right else "left", no_wrap=True,
                         overflow="ellipsis")
        self.sort_value = sort_value


@dataclass(frozen=True, slots=True)
class SortOrder:
    label: str
    column: str
    value: Callable[[TemplateStats], Any]
    descending: bool


SORTS: tuple[SortOrder, ...] = (
    SortOrder("calls", "calls", lambda t: t.calls, True),
    SortOrder("hit %", "hit", lambda t: t.hit_rate, True),
    SortOrder("time saved", "saved", lambda t: t.time_saved_s, True),
    SortOrder("p50 miss", "p50", lambda t: t.miss_p50_s or 0.0, True),
    SortOrder("template", "template", lambda t: t.template.lower(), False),
)

COLUMNS: tuple[tuple[str, str], ...] = (
    ("template", "query template"),
    ("calls", "calls"),
    ("hit", "hit %"),
    ("p50", "p50 hit / miss"),
    ("saved", "saved"),
    ("ttl", "TTL"),
    ("status", "status"),
)
STATUS_WIDTH = 15  # the longest status word, "multi-statement"
PADDING = 2  # the table's one cell of padding on each side of every column
SCROLLBAR = 2
MIN_TEMPLATE_WIDTH = 16


def matches(stats: TemplateStats, needle: str) -> bool:
    if not needle:
        return True
    needle = needle.lower()
    status = fmt.status_word(stats.last_status)
    reason = fmt.status_explanation(stats.last_status, stats.last_reason)
    return needle in stats.template.lower() or needle in status.lower() or needle in reason.lower()


def template_cell(stats: TemplateStats, width: int) -> Cell:
    return Cell(fmt.clip(stats.template, width), (stats.template.lower(), stats.template_id),
                right=False)


def figure_cells(stats: TemplateStats) -> tuple[Cell, ...]:
    """Every cell but the template's, whose width depends on what these leave."""
    status = fmt.status_word(stats.last_status)
    cacheable = bool(stats.hits + stats.misses)
    p50_key = stats.miss_p50_s or 0.0
    return (
        Cell(fmt.count(stats.calls), stats.calls),
        Cell(fmt.percent(stats.hit_rate if stats.hits + stats.misses else None), stats.hit_rate),
        Cell(fmt.ms_pair(stats.hit_p50_s, stats.miss_p50_s), p50_key),
        # A template never looked up in the cache saved nothing: a dash, as for hit %.
        Cell(fmt.duration(stats.time_saved_s) if cacheable else fmt.DASH, stats.time_saved_s),
        Cell(fmt.ttl(stats.ttl), stats.ttl or 0.0),
        Cell(fmt.clip(status, STATUS_WIDTH), status, right=False),
    )


class TemplateTable(DataTable[Cell]):
    """Rows are keyed by template id; refresh() adds, removes and updates only what changed."""

    # DataTable's own enter is hidden; the table has the focus, so its binding is the one the
    # footer would show: name what selecting a row does in the cache view.
    BINDINGS = [Binding("enter", "select_cursor", "Details")]

    def __init__(self) -> None:
        super().__init__(id="templates", cursor_type="row", zebra_stripes=True)
        self._shown: dict[str, tuple[str, ...]] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, templates: Sequence[TemplateStats], needle: str, sort: SortOrder,
             width: int) -> int:
        """Bring the table in line with `templates`; returns how many rows are shown."""
        wanted = {t.template_id: t for t in templates if matches(t, needle)}
        figures = {key: figure_cells(stats) for key, stats in wanted.items()}
        # The template column gets what the figures leave, so 80 columns need no h-scroll.
        used = sum(
            max([len(label)] + [len(cells[i].plain) for cells in figures.values()]) + PADDING
            for i, (_, label) in enumerate(COLUMNS[1:])
        )
        template_width = max(MIN_TEMPLATE_WIDTH, width - used - PADDING - SCROLLBAR)
        for gone in [key for key in self._shown if key not in wanted]:
            self.remove_row(gone)
            del self._shown[gone]
        for key, stats in wanted.items():
            cells = (template_cell(stats, template_width), *figures[key])
            plain = tuple(cell.plain for cell in cells)
            previous = self._shown.get(key)
            if previous is None:
                self.add_row(*cells, key=key)
            else:
                for (column, _), cell, old, new in zip(COLUMNS, cells, previous, plain,
                                                       strict=True):
                    if old != new:
                        self.update_cell(key, column, cell, update_width=True)
            self._shown[key] = plain
        self._apply_order(wanted, sort)
        return len(wanted)

    def _apply_order(self, wanted: dict[str, TemplateStats], sort: SortOrder) -> None:
        # Re-sort only when the order really changed, so the cursor does not wander.
        def order_key(stats: TemplateStats) -> tuple[Any, str]:
            return (sort.value(stats), stats.template_id)

        desired = [t.template_id for t in sorted(wanted.values(), key=order_key,
                                                   reverse=sort.descending)]
        current = [row.key.value for row in self.ordered_rows]
        if desired != current:
            rank = {key: i for i, key in enumerate(desired)}
            self.sort("template", key=lambda cell: rank[cell.sort_value[1]])

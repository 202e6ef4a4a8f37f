"""Plain aligned tables for people: rounded numbers, right-aligned, fitted to a width."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

ELLIPSIS = "…"
MIN_FLEX = 12  # a truncated column keeps at least this many characters


def number(value: float) -> str:
    """A float as people read it: whole numbers without decimals, then fewer decimals the
    larger it is (1234.5678 → 1235, 12.345 → 12.3, 1.2345 → 1.23, 0.12345 → 0.123)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
    text = f"{value:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("0", "-0") and value != 0:
        return "<0.001" if value > 0 else ">-0.001"
    return text


def cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return number(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


# A number that has no meaning for its row (a hit rate with no cacheable read): aligned as one.
NOT_APPLICABLE = "-"


def render_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    width: int | None = None,
    flex: str | None = None,
) -> str:
    """Columns separated by two spaces, numbers right-aligned, a row count at the end.

    With `width`, the `flex` column (a long text such as a query template) is cut with "…" so
    that each line fits, down to MIN_FLEX characters.
    """
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if width is not None and flex is not None and flex in columns:
        i = list(columns).index(flex)
        others = sum(w for j, w in enumerate(widths) if j != i) + 2 * (len(columns) - 1)
        widths[i] = min(widths[i], max(width - others, MIN_FLEX, len(flex)))
        for r in cells:
            r[i] = _clip(r[i], widths[i])
    numeric = [
        bool(rows) and all((isinstance(row[i], int | float) and not isinstance(row[i], bool))
                           or row[i] is None or row[i] == NOT_APPLICABLE for row in rows)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)

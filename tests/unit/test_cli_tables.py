"""The CLI's text tables: numbers people can read, lines that fit."""

from __future__ import annotations

import pytest

from neonpoly.cli.tables import number, render_table


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1234.5678, "1235"),
        (300.0, "300"),
        (12.345, "12.3"),
        (1.2345, "1.23"),
        (0.6666666, "0.667"),
        (0.5, "0.5"),
        (0.0, "0"),
        (0.0004, "<0.001"),
        (-2.5, "-2.5"),
        (float("nan"), "NaN"),
    ],
)
def test_numbers_are_rounded(value: float, text: str) -> None:
    assert number(value) == text


def test_a_table_fits_by_cutting_its_flexible_column() -> None:
    rows = [["a1", 3, 0.333333, "SELECT " + "x, " * 60 + "y FROM t"], ["b2", 12, None, "SELECT 1"]]
    table = render_table(["id", "calls", "rate", "template"], rows, width=60, flex="template")
    lines = table.splitlines()
    assert max(len(line) for line in lines) == 60
    assert lines[2].endswith("…") and "0.333" in lines[2] and lines[3].endswith("SELECT 1")
    assert lines[-1] == "(2 rows)"
    assert "x, y FROM t" in render_table(["id", "calls", "rate", "template"], rows)  # unfitted: whole

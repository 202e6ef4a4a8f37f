"""Texts that differ only in numbers share a classification (policy.classify), but never when a
"number" may be part of a name to PostgreSQL's lexer, which takes any non-ASCII character for
a letter."""

from __future__ import annotations

import pytest

from neonpoly.cache.policy import classify


@pytest.mark.parametrize(
    ("first", "second", "table", "not_table"),
    [
        ("SELECT v FROM na_t€1", "SELECT v FROM na_t€2", "na_t€2", "na_t€1"),
        ("UPDATE na_u€1 SET v = 1", "UPDATE na_u€2 SET v = 1", "na_u€2", "na_u€1"),
        ("SELECT v FROM na_v, ٣", "SELECT v FROM na_v, ٤", "٤", "٣"),  # Arabic-Indic digits are \d too
    ],
)
def test_non_ascii_names_differing_in_digits_are_other_tables(
    first: str, second: str, table: str, not_table: str
) -> None:
    classify(first)
    info = classify(second)
    assert table in info.tables_read | info.tables_written
    assert not_table not in info.tables_read | info.tables_written

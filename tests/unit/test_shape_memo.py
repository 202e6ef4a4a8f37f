"""Texts that differ only in numbers share one classification (one parse for pgbench -S's
stream of new texts), but never texts that differ in anything a classification reads: the
numbers inside strings are values, quoted names are names."""

from __future__ import annotations

import pytest

from neonpoly.cache.policy import Status, classify

F = frozenset


@pytest.mark.parametrize(
    ("first", "then"),
    [
        # An escape spells a clock word: 'nox' and then 'now' (\167 is w, \0077 too).
        (r"SELECT E'no\170'::timestamptz FROM shape_e", r"SELECT E'no\167'::timestamptz FROM shape_e"),
        ("SELECT U&'no!0078' UESCAPE '!' FROM shape_u", "SELECT U&'no!0077' UESCAPE '!' FROM shape_u"),
        ("SELECT $q$no 1$q$::date FROM shape_d", "SELECT $q$no 2$q$::date FROM shape_d"),
    ],
)
def test_numbers_inside_strings_never_share_a_classification(first: str, then: str) -> None:
    # A number in a string is part of a value: two texts differing there are parsed apart.
    assert classify(first) is not classify(then)
    assert classify(r"SELECT E'no\167'::timestamptz FROM shape_e").status is Status.VOLATILE


def test_numbers_outside_strings_still_share_one_parse() -> None:
    first = classify("SELECT * FROM shape_s WHERE a = 'x 1' AND b = 17 LIMIT 5")
    assert classify("SELECT * FROM shape_s WHERE a = 'x 1' AND b = 18 LIMIT 6") is first
    assert classify("SELECT * FROM shape_s WHERE a = 'x 2' AND b = 17 LIMIT 5") is not first
    assert classify("SELECT * FROM shape_s WHERE a = 'it''s 1' AND b = 17") is classify(
        "SELECT * FROM shape_s WHERE a = 'it''s 1' AND b = 99"
    )
    # Comments change nothing, unless one may hide a quote from the counting.
    commented = classify("SELECT * FROM shape_c /* 1 */ WHERE b = 1")
    assert classify("SELECT * FROM shape_c /* 2 */ WHERE b = 2") is commented
    assert classify("SELECT 'a' FROM shape_c -- it's 1") is not classify("SELECT 'a' FROM shape_c -- it's 2")


def test_a_text_found_by_its_shape_is_not_kept_by_its_text() -> None:
    from neonpoly.cache import policy

    classify("SELECT * FROM shape_k WHERE id = 1")
    before = len(policy._exact)
    for i in range(2, 50):
        assert classify(f"SELECT * FROM shape_k WHERE id = {i}").tables_read == F({"shape_k"})
    assert len(policy._exact) == before  # a stream of new texts does not churn the memo

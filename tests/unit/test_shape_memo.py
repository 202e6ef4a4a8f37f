"""Texts that differ only in numbers share one classification (one parse for pgbench -S's
stream of new texts), but never texts that differ in anything a classification reads: the
numbers inside strings are values, quoted names are names."""

from __future__ import annotations

import random

import pytest

from neonpoly.cache.policy import _NUMBER, Status, _shape, classify

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


@pytest.mark.parametrize(
    ("first", "then", "shared"),
    [
        # ORM tags (sqlcommenter) holding quotes: still one parse for texts differing in numbers.
        ("SELECT * FROM shape_o WHERE a = 'x 1' AND b = 2 /*controller='i 1'*/",
         "SELECT * FROM shape_o WHERE a = 'x 1' AND b = 3 /*controller='i 1'*/", True),
        ("SELECT * FROM shape_o WHERE a = 'x 1' /*controller='i 1'*/",
         "SELECT * FROM shape_o WHERE a = 'x 2' /*controller='i 1'*/", False),
        ("SELECT 'a' FROM shape_o -- it's 1\nWHERE b = 'c 1'",
         "SELECT 'a' FROM shape_o -- it's 1\nWHERE b = 'c 2'", False),
        # A nested comment is not read as tokens: not shared at all.
        ("SELECT 'a' FROM shape_n /* x /* y */ 1 */ WHERE b = 1",
         "SELECT 'a' FROM shape_n /* x /* y */ 1 */ WHERE b = 2", False),
    ],
)  # fmt: skip
def test_comments_with_quotes_are_read_as_tokens(first: str, then: str, shared: bool) -> None:
    assert (classify(first) is classify(then)) == shared


def _reference(sql: str) -> str | None:
    """Numbers outside strings and (nested) comments as 0, as PostgreSQL's lexer splits the
    text; None when a string or comment never ends."""
    out: list[str] = []
    code_from = at = 0

    def code(end: int) -> None:
        # The characters around it are context (a number's neighbours), never part of it.
        before, after = sql[code_from - 1 : code_from], sql[end : end + 1]
        done = _NUMBER.sub("0", before + sql[code_from:end] + after)
        out.append(done[len(before) : len(done) - len(after)])

    while at < len(sql):
        if sql[at] == "'":
            end = at + 1
            while True:
                end = sql.find("'", end)
                if end < 0:
                    return None
                if sql[end + 1 : end + 2] == "'":
                    end += 2
                    continue
                break
            code(at)
            out.append(sql[at : end + 1])
            at = code_from = end + 1
        elif sql.startswith("--", at):
            end = sql.find("\n", at)
            end = len(sql) if end < 0 else end
            code(at)
            out.append(sql[at:end])
            at = code_from = end
        elif sql.startswith("/*", at):
            depth, end = 1, at + 2
            while depth:
                if end >= len(sql):
                    return None
                if sql.startswith("/*", end):
                    depth, end = depth + 1, end + 2
                elif sql.startswith("*/", end):
                    depth, end = depth - 1, end + 2
                else:
                    end += 1
            code(at)
            out.append(sql[at:end])
            at = code_from = end
        else:
            at += 1
    code(len(sql))
    return "".join(out)


def test_a_shape_never_normalises_inside_a_string_or_comment() -> None:
    rng = random.Random(12)
    alphabet = "0123456789ab '-/*\n.e"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        if "'" not in text:
            continue
        shape = _shape(text)
        reference = _reference(text)
        # Either not shared at all, or exactly the lexer's numbers replaced.
        assert shape in (text, reference), (text, shape, reference)


def test_a_number_at_the_end_is_zeroed_as_the_regex_zeroes_it() -> None:
    # _numbers_zeroed skips the regex for texts whose only number ends them (pgbench -S): it
    # must give exactly the regex's shape for every text, taking the shortcut or not.
    from neonpoly.cache.policy import _numbers_zeroed

    rng = random.Random(13)
    alphabet = "0123456789abE_.$'@ -=(é٣\t;"
    ends = ["", "7", " 42", "=0099", "x1", ".5", "1.5", "1e5", "-3", "@4", "$2", "é9", "٣", " 12 ;", "8;\n"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) + rng.choice(ends)
        assert _numbers_zeroed(text) == _NUMBER.sub("0", text), text
    pgbench = "SELECT abalance FROM pgbench_accounts WHERE aid = 512;"
    assert _numbers_zeroed(pgbench) == "SELECT abalance FROM pgbench_accounts WHERE aid = 0;"


@pytest.mark.parametrize(
    ("sql", "slot"),
    [
        ("SELECT a FROM pgbench_accounts WHERE aid = 12;", ("SELECT a FROM pgbench_accounts WHERE aid = ", ";")),
        ("SELECT v FROM slot_t1 WHERE id=7", ("SELECT v FROM slot_t1 WHERE id=", "")),
        # Not such a text: a number elsewhere (`1e-`+digits is one number), quotes, dollars.
        ("SELECT 1e-5", None),
        ("SELECT v FROM slot_t WHERE a = 1 AND id = 7", None),
        ("SELECT v FROM slot_t WHERE a = 'x' AND id = 7", None),
        ('SELECT v FROM "slot t" WHERE id = 7', None),
        ("SELECT v FROM slot_t WHERE id = $1", None),
        ("SELECT v FROM slot_t WHERE id = 7.5", None),
        ("SELECT v FROM slot_t WHERE id = x7", None),
        ("SET work_mem = 64", None),  # not shared by shape
    ],
)
def test_a_number_slot_is_a_text_whose_digits_alone_may_change_and_keep_its_classification(
    sql: str, slot: tuple[str, str] | None
) -> None:
    from neonpoly.cache.policy import number_slot

    assert number_slot(sql) == slot
    if slot is not None:
        rng = random.Random(sql)
        for _ in range(50):
            other = slot[0] + str(rng.randrange(1, 10 ** rng.randint(1, 18))) + slot[1]
            assert _shape(other) == _shape(sql) == slot[0] + "0" + slot[1]
            assert classify(other) is classify(sql)  # (a 0 is its own shape: parsed, alike)

"""Key values read from a text's digits once its shape is known (cache/key_shapes.py): always
what the parser finds in that very text."""

from __future__ import annotations

import random

import pytest

from neonpoly.cache import key_shapes, policy, queries
from neonpoly.cache.policy import classify, keys_for


def keys(sql: str) -> set[tuple[bool, str, str, tuple[int, ...], tuple[int, ...]]]:
    return {(r.write, r.table, r.column, r.literals, r.params) for r in keys_for(sql, classify(sql))}


def parsed(sql: str) -> set[tuple[bool, str, str, tuple[int, ...], tuple[int, ...]]]:
    return {(r.write, r.table, r.column, r.literals, r.params) for r in policy._parsed_keys(sql) or ()}


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (
            [
                "UPDATE ks_parse SET v = v + 3 WHERE id = 1",
                "UPDATE ks_parse SET v = v + 4 WHERE id = 2",
                "UPDATE ks_parse SET v = v + 71 WHERE id = 4242",
            ],
            {(True, "ks_parse", "id", (4242,), ())},
        ),
        (
            [
                "DELETE FROM ks_neg WHERE id = -1",
                "DELETE FROM ks_neg WHERE id = -2",
                "DELETE FROM ks_neg WHERE id = -30",
            ],
            {(True, "ks_neg", "id", (-30,), ())},
        ),
        (
            [
                "INSERT INTO ks_rows (id, v) VALUES (1, 2), (-3, $1)",
                "INSERT INTO ks_rows (id, v) VALUES (4, 5), (-6, $1)",
                "INSERT INTO ks_rows (id, v) VALUES (7, 8), (-9, $1)",
            ],
            {(True, "ks_rows", "id", (7, -9), ()), (True, "ks_rows", "v", (8,), (1,))},
        ),
    ],
)
def test_a_new_text_of_a_known_shape_is_not_parsed(
    texts: list[str], expected: set[tuple[object, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    *first, last = texts
    for sql in first:
        keys(sql)
    parses: list[str] = []
    real = queries.parse

    def counting(sql: str) -> list[tuple[str, queries.Node]]:
        parses.append(sql)
        return real(sql)

    monkeypatch.setattr(queries, "parse", counting)
    assert keys(last) == expected
    assert parses == []


# (the first texts, each teaching its shape; then texts that share a classification with them
# and must get the parser's answer for themselves)
@pytest.mark.parametrize(
    ("first", "then"),
    [
        (
            "UPDATE ks_a SET v = 1 WHERE id = 2",
            ["UPDATE ks_a SET v = 3 WHERE id = 4", "UPDATE ks_a SET v = 3 WHERE id = 007"],
        ),
        # another shape, not a stretched one: no key, or not the same one
        (
            "UPDATE ks_b SET v = 1 WHERE id = 2",
            [
                "UPDATE ks_b SET v = 1 WHERE id = 1 OR id = 2",
                "UPDATE ks_b SET v = 1 WHERE id = 1 + 1",
                "UPDATE ks_b SET v = 1 WHERE id = 2 AND id = 3",
            ],
        ),
        # numbers the lexer does not make an int4 of: the parser answers
        (
            "UPDATE ks_c SET v = 1 WHERE id = 2",
            [
                "UPDATE ks_c SET v = 1 WHERE id = 1.5",
                "UPDATE ks_c SET v = 1 WHERE id = 2e0",
                "UPDATE ks_c SET v = 1 WHERE id = 9999999999",
                "UPDATE ks_c SET v = 1 WHERE id = 900000001",
            ],
        ),
        # a minus folded into the constant
        (
            "UPDATE ks_d SET v = 1 WHERE id = -2",
            ["UPDATE ks_d SET v = 1 WHERE id = -8", "UPDATE ks_d SET v = 1 WHERE id = -0"],
        ),
        ("UPDATE ks_e SET v = 1 WHERE id = - -2", ["UPDATE ks_e SET v = 1 WHERE id = - -8"]),
        # digits in comments and strings are no key value, wherever they stand
        (
            "UPDATE ks_f SET v = 1 WHERE id = 2 /* 3 */",
            ["UPDATE ks_f SET v = 1 WHERE id = 5 /* 6 */", "UPDATE ks_f SET v = 1 WHERE id = 5 /* 6 */ AND id = 7"],
        ),
        ("UPDATE ks_g SET v = 1 -- id = 5\nWHERE id = 2", ["UPDATE ks_g SET v = 1 -- id = 9\nWHERE id = 3"]),
        ("UPDATE ks_h SET v = ' 1' WHERE id = 2", ["UPDATE ks_h SET v = ' 4' WHERE id = 3"]),
        ("UPDATE ks_i SET v = $x$ 1 $x$ WHERE id = 2", ["UPDATE ks_i SET v = $x$ 9 $x$ WHERE id = 3"]),
        # a key value that is no digit run of the text: never read from digits
        ("UPDATE ks_j SET v = 1 WHERE id = 0x10", ["UPDATE ks_j SET v = 2 WHERE id = 0x10"]),
        ("UPDATE ks_k SET v = 1 WHERE id = 1_000", ["UPDATE ks_k SET v = 2 WHERE id = 1_000"]),
        # one that is the probe's sentinel for a run (900000001): the first text's value shows it
        (
            "UPDATE ks_w SET v = 5 WHERE id = 0x35A4E901",
            ["UPDATE ks_w SET v = 7 WHERE id = 0x35A4E901", "UPDATE ks_w SET v = 8 WHERE id = 0x35A4E901"],
        ),
        # quoted names and non-ASCII names may hold digits the lexer keeps in the name
        ('UPDATE "ks l1" SET v = 1 WHERE id = 2', ['UPDATE "ks l2" SET v = 1 WHERE id = 3']),
        ("UPDATE ks_m€1 SET v = 1 WHERE id = 2", ["UPDATE ks_m€2 SET v = 1 WHERE id = 3"]),
        # the same column names in another table; a key set by the write itself
        ("UPDATE ks_n SET v = 1 WHERE id = 2", ["UPDATE ks_o SET v = 1 WHERE id = 3"]),
        ("UPDATE ks_p SET v = 1 WHERE id = 2", ["UPDATE ks_p SET id = 1 WHERE id = 2"]),
        # parameters beside literals; several keys; rows of an INSERT
        ("UPDATE ks_q SET v = $1 WHERE id = $2 AND k = 3", ["UPDATE ks_q SET v = $1 WHERE id = $2 AND k = 4"]),
        ("UPDATE ks_r SET v = 1 WHERE k = 5 AND 6 = id", ["UPDATE ks_r SET v = 1 WHERE k = 7 AND 8 = id"]),
        (
            "INSERT INTO ks_s (id, v) VALUES (1, 2), (-3, 4)",
            ["INSERT INTO ks_s (id, v) VALUES (5, 6), (-7, 8)", "INSERT INTO ks_s (v, id) VALUES (5, 6), (-7, 8)"],
        ),
        ("SELECT v FROM ks_t WHERE id = 1 LIMIT 2", ["SELECT v FROM ks_t WHERE id = 3 LIMIT 4"]),
    ],
)
def test_texts_of_a_shape_get_the_parsers_key_values(first: str, then: list[str]) -> None:
    assert keys(first) == parsed(first)
    keys(first.replace("1", "4"))  # a second text of the shape, if there is one
    for sql in then:
        assert keys(sql) == parsed(sql), sql


def test_the_digits_read_are_the_ones_the_parser_showed() -> None:
    keys("UPDATE ks_u SET v = v + 10 WHERE id = 20")
    keys("UPDATE ks_u SET v = v + 11 WHERE id = 21")
    assert keys("UPDATE ks_u SET v = v + 12 WHERE id = 22") == {(True, "ks_u", "id", (22,), ())}
    assert keys("UPDATE ks_u SET v = v + 0 WHERE id = 0") == {(True, "ks_u", "id", (0,), ())}


def test_a_shape_whose_key_follows_no_digits_is_left_to_the_parser() -> None:
    sql = "UPDATE ks_v SET v = 1 WHERE id = 0x10"
    keys(sql)
    keys(sql.replace("v = 1", "v = 2"))
    assert key_shapes.known(sql.replace("v = 1", "v = 3")) is None


def test_random_texts_of_hostile_shapes_get_the_parsers_key_values() -> None:
    rng = random.Random(10)
    shapes = [
        "UPDATE ks_x SET v = v + {} WHERE id = {}",
        "UPDATE ks_x SET v = v + -{} WHERE id = -{} AND k = {}",
        "UPDATE ks_x SET v = {} WHERE id = {} OR id = {}",
        "UPDATE ks_x SET v = {} WHERE id = {} + {}",
        "UPDATE ks_x SET v = {} WHERE id = {} /* {} */",
        "UPDATE ks_x SET v = '{}' WHERE {} = id -- {}\n",
        "UPDATE ks_x SET v = {}::numeric({}, 2) WHERE id = {}",
        "DELETE FROM ks_x WHERE id = {} RETURNING {}",
        "INSERT INTO ks_x (k, id) VALUES ({}, {}), ({}, -{})",
    ]
    numbers = ["0", "7", "007", "42", "999999999", "1000000000", "900000001", "1.5", "3e2"]
    for _ in range(600):
        shape = rng.choice(shapes)
        sql = shape.format(*(rng.choice(numbers) for _ in range(shape.count("{}"))))
        # (a text sharing the classification of one without a key, `id = 1.5`, has none)
        assert keys(sql) == parsed(sql) or not classify(sql).keys, sql


def test_a_shape_a_write_memo_is_kept_by_is_the_shape_classify_shares_by() -> None:
    """A session remembers a keyed write by `shape_of` (proxy/writes.py) and takes its
    classification for every text of that shape: exactly the texts `classify` answers from
    one shape, or a text classify keeps to itself (strings, quoted names, `$`, `@`) is refused."""
    rng = random.Random(11)
    pieces = [
        "UPDATE t SET v = v + ", "WHERE id = ", " @", "'", "'a 1'", '"t 1"', "$", "$1", "\\", "--", "/*", "*/",
        "\n", " ", "x", "1", "42", "1.5", "3e2", "1000000000", "-", ".", "é", ";",
    ]  # fmt: skip
    shared = 0
    for _ in range(3000):
        sql = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        found = key_shapes.shape_of(sql)
        if found is None:
            continue
        shape, runs = found
        shared += 1
        assert "0".join(shape) == policy._shape(sql), sql
        assert all(run.isdigit() and len(run) <= 9 for run in runs), sql
    assert shared > 300
    for refused in ("'", "\\", "$", "@", '"', "é"):
        assert key_shapes.shape_of(f"UPDATE t SET v = {refused} WHERE id = 1") is None


def test_a_shapes_pattern_reads_the_runs_of_exactly_the_texts_of_that_shape() -> None:
    """`matcher(shape)` stands in for `shape_of` when a session tries the write shapes it
    used last (proxy/writes.py): on texts of the shape with other digits (longer, shorter,
    too long, not ASCII) and on texts of other shapes, `runs_by` answers as `shape_of` does."""
    rng = random.Random(12)
    pieces = [
        "UPDATE t SET v = v + ", "WHERE id = ", " @", "'", "$1", "--", "/*", "*/", "\n", " ", "x", "x1", "_",
        "1", "42", "1.5", "3e2", "1000000000", "-", "+", ".", "e", ";", "(", ")",
    ]  # fmt: skip
    digits = ["0", "7", "0042", "123456789", "1234567890", "\u0663", "12\u0663", "1.5", "1e5", "x"]
    matched = 0
    for _ in range(3000):
        sql = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        found = key_shapes.shape_of(sql)
        if found is None:
            continue
        shape, _ = found
        pattern = key_shapes.matcher(shape)
        others = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(2)]
        others.append(
            "".join(p if k % 2 == 0 else rng.choice(digits) for k, p in enumerate(key_shapes._split(sql) or []))
        )
        for text in [sql, *others]:
            expected = key_shapes.shape_of(text)
            runs = key_shapes.runs_by(pattern, text)
            if expected is not None and expected[0] == shape:
                assert runs == tuple(expected[1]), (sql, text)
                matched += 1
            else:
                assert runs is None, (sql, text)
    assert matched > 1000
    long = "UPDATE t SET v = 1 WHERE id = 2" + " " * key_shapes.MAX_CHARS
    assert key_shapes.shape_of(long) is None
    assert (
        key_shapes.runs_by(key_shapes.matcher(("UPDATE t SET v = ", " WHERE id = ", " " * key_shapes.MAX_CHARS)), long)
        is None
    )

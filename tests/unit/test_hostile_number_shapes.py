"""Hostile review of the two number-shape shortcuts against the parser, text by text:
classify's shape memo (texts differing only in numbers share one classification) and key
values read from digits (key_shapes.py, through policy.keys_for).

Each base text is sent with other numbers first (so the shape is learnt, or the digit plan
made), then with the numbers under test; the answer must be the parser's own for that text.
Key values may only be fewer than the parser's (less precision), never other ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import pytest

from neonpoly.cache import policy
from neonpoly.cache.policy import Status, classify, keys_for

_SKIP = {"reason", "keys", "keys_sql", "template", "template_id"}
FIELDS = [f.name for f in dataclasses.fields(policy.Classification) if f.name not in _SKIP]

BASES = [
    "SELECT v FROM {t} WHERE aid = {} AND b = {}",
    "SELECT v FROM {t} WHERE aid = -{} OR aid = - -{}",
    "SELECT v FROM {t} WHERE aid = {}::int2 AND aid = {}",
    "SELECT v FROM {t} WHERE (aid) = ({}) LIMIT {} OFFSET {}",
    "SELECT v FROM {t} WHERE aid IN ({}, {}) ORDER BY {}",
    "SELECT a[{}] FROM {t} WHERE aid = {}",
    "SELECT x::float({}) FROM {t}",
    "SELECT x::numeric({},{}) FROM {t} WHERE aid = {}",
    "SELECT generate_series({}, {}) FROM {t}",
    "SELECT {}::regclass::text FROM {t}",
    "SELECT * FROM {t} WHERE aid = {} -- {}\n",
    "SELECT * FROM {t} /* {} */ WHERE aid = {}",
    "SELECT $1::int + {} FROM {t} WHERE aid = $2 AND b = {}",
    "SELECT x FROM {t} WHERE aid = {}e{} AND b = {}.{}",
    "SELECT x FROM {t} WHERE aid=+{} AND b=!{}",
    "SELECT x FROM {t} WHERE aid = {}_000 AND b = 0x{}",
    "SELECT x FROM {t} TABLESAMPLE SYSTEM ({}) REPEATABLE ({})",
    "SELECT x FROM {t} WHERE aid = {} AND c = 'it''s {}' AND d = {}",
    "SELECT now() - interval '{} day' FROM {t} WHERE aid = {}",
    "SELECT current_setting('my.a{}') FROM {t} WHERE aid = {}",
    "UPDATE {t} SET v = {} WHERE aid = {}",
    "UPDATE {t} SET v = v + {} WHERE aid = {} AND aid = {} RETURNING v",
    "UPDATE {t} SET aid = {} WHERE aid = {}",
    "DELETE FROM {t} WHERE aid = {} OR aid = {}",
    "DELETE FROM {t} USING u WHERE {t}.aid = u.aid AND {t}.aid = {}",
    "INSERT INTO {t} VALUES ({}, {}), ({}, {})",
    "INSERT INTO {t} VALUES ({}, {}) ON CONFLICT (aid) DO UPDATE SET aid = {}",
    "WITH d AS (DELETE FROM {t} WHERE aid = {} RETURNING *) SELECT * FROM d WHERE aid = {}",
    "UPDATE {t} SET v = {} FROM u WHERE {t}.aid = u.aid AND u.aid = {}",
]
NUMBERS = ["1", "0", "007", "1.5", "1e5", "2147483648", "99999999999999999999", "000000001", "900000001"]


def _texts(base: str) -> list[str]:
    table = f"hs_{uuid.uuid4().hex[:8]}"
    n = base.count("{}")
    numbers = itertools.islice(itertools.cycle(NUMBERS), 7 * n + 3)
    pool = list(numbers)
    return [base.replace("{t}", table).format(*pool[k : k + n]) for k in range(0, 7 * n, max(1, n - 1) or 1)][:12]


@pytest.mark.parametrize("base", BASES)
def test_a_shared_shape_answers_what_the_parser_says(base: str) -> None:
    texts = [*_texts(base), base.replace("{t}", "x").format(*(["2"] * base.count("{}")))]
    for sql in texts:  # every order: each text after the ones before it
        got, own = classify(sql), policy._classify(sql)
        if own.status is Status.PARSEERROR:
            continue  # the server rejects it: nothing runs, no answer is stored
        for name in FIELDS:
            assert getattr(got, name) == getattr(own, name), f"{name} of {sql!r}"
        keys, parsed = keys_for(sql, got), tuple(policy._parsed_keys(sql) or ())
        assert keys in (parsed, ()), f"key values of {sql!r}: {keys!r}, the parser says {parsed!r}"


@pytest.mark.parametrize(
    "form",
    [
        "UPDATE {t} SET v = 1 WHERE aid = {a} AND aid = {b}",
        "UPDATE {t} SET v = 1 WHERE aid IN ({a}, {b})",
        "UPDATE {t} SET v = 1 WHERE aid = -{a} AND b = {b}",
        "UPDATE {t} SET v = {b} WHERE aid = {a} /* {b} */",
        "DELETE FROM {t} WHERE aid = {a} AND b = '{b}'",
        "INSERT INTO {t} VALUES ({a}, {b}), ({b}, {a})",
        "SELECT v FROM {t} WHERE aid = {a} AND aid = {b}",
        "SELECT v FROM {t} WHERE aid = {a} AND {b} = {b}",
    ],
)
def test_key_values_read_from_digits_after_the_shape_is_learnt(form: str) -> None:
    table = f"hk_{uuid.uuid4().hex[:8]}"
    pairs = [(1, 2), (3, 3), (5, 6), (900000001, 7), (7, 900000003), (123456789, 0), (0, 0), (8, 999999999)]
    for a, b in pairs:
        sql = form.format(t=table, a=a, b=b)
        keys, parsed = keys_for(sql, classify(sql)), tuple(policy._parsed_keys(sql) or ())
        assert keys in (parsed, ()), f"{sql!r}: {keys!r}, the parser says {parsed!r}"
    # Learnt by now: the digits answer, and exactly as the parser does.
    sql = form.format(t=table, a=41, b=42)
    assert keys_for(sql, classify(sql)) == tuple(policy._parsed_keys(sql) or ())


def test_shared_shape_keeps_each_texts_template_id() -> None:
    """`@n` (prefix abs) is a placeholder to the template tokenizer: `... = @1` and `... = @3`
    must not share one classification, or a rule by template id misses one of them."""
    table = f"ht_{uuid.uuid4().hex[:8]}"
    classify(f"SELECT v FROM {table} WHERE aid = @1")
    sql = f"SELECT v FROM {table} WHERE aid = @3"
    assert classify(sql).template_id == policy._classify(sql).template_id

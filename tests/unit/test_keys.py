"""Primary-key precision in the parse tree and in Bind values (cache/keys.py)."""

from __future__ import annotations

import struct

import pytest

from neonpoly.cache.invalidation import TableGenerations
from neonpoly.cache.keys import KEY_BUCKETS, KeyRef, bound_integers, param_types, read_names, write_names
from neonpoly.cache.policy import classify, keys_for


def refs(sql: str) -> set[tuple[bool, str, str, tuple[int, ...], tuple[int, ...]]]:
    return {(r.write, r.table, r.column, r.literals, r.params) for r in keys_for(sql, classify(sql))}


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT v FROM t WHERE id = 5", {(False, "t", "id", (5,), ())}),
        ("SELECT v FROM t x WHERE x.id = $1 AND v > 2", {(False, "t", "id", (), (1,))}),
        ("SELECT count(*) FROM t WHERE 7 = id", {(False, "t", "id", (7,), ())}),
        ("SELECT v FROM t WHERE id = -3 ORDER BY v LIMIT 1", {(False, "t", "id", (-3,), ())}),
        ("SELECT v FROM t WHERE id = 9999999999", {(False, "t", "id", (9999999999,), ())}),
        ("UPDATE t SET v = v + $2 WHERE id = $1", {(True, "t", "id", (), (1,))}),
        ("DELETE FROM t WHERE id = 4 RETURNING *", {(True, "t", "id", (4,), ())}),
        ("INSERT INTO t (id, v) VALUES (1, 'a'), ($1, 'b')", {(True, "t", "id", (1,), (1,))}),
        ("INSERT INTO t (id, v) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET v = 'b'", {(True, "t", "id", (1,), ())}),
        ("INSERT INTO t (id, v) VALUES (1, 'a') ON CONFLICT DO NOTHING", {(True, "t", "id", (1,), ())}),
    ],
)
def test_statements_confined_to_a_key(sql: str, expected: set[tuple[object, ...]]) -> None:
    assert refs(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT v FROM t WHERE id = 1 OR id = 2",
        "SELECT v FROM t WHERE id IN (1)",
        "SELECT v FROM t WHERE id = '1'",
        "SELECT v FROM t WHERE id = 1.0",
        "SELECT v FROM t WHERE id = 1::int8",
        "SELECT v FROM t WHERE id = $1 AND $1 > 0",  # the parameter's type is not the key's alone
        "SELECT v FROM t WHERE id = NULL",
        "SELECT (SELECT max(v) FROM t) FROM t WHERE id = 1",
        "SELECT v FROM t JOIN u USING (id) WHERE id = 1",
        "SELECT v FROM t, u WHERE t.id = 1",
        "SELECT v FROM t WHERE u.id = 1",
        "WITH c AS (SELECT 1) SELECT v FROM t WHERE id = 1",
        "SELECT v FROM t WHERE id = 1 UNION SELECT v FROM t WHERE id = 2",
        "SELECT v FROM t WHERE id = 1 FOR UPDATE",
        "UPDATE t SET id = 2 WHERE id = 1",
        "UPDATE t SET (id, v) = (2, 'x') WHERE id = 1",
        "UPDATE t SET v = u.v FROM u WHERE t.id = 1",
        "DELETE FROM t USING u WHERE t.id = 1",
        "WITH d AS (DELETE FROM u RETURNING 1) UPDATE t SET v = 1 WHERE id = 1",
        "INSERT INTO t VALUES (1, 'a')",  # which column is which is the catalog's
        "INSERT INTO t (id, v) SELECT 1, 'a'",
        "INSERT INTO t (id, v) VALUES (1, 'a') ON CONFLICT (v) DO UPDATE SET v = 'b'",
        "INSERT INTO t (id, v) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET id = 2",
        "UPDATE t SET v = 1 WHERE id = 1; UPDATE t SET v = 1 WHERE id = 2",
        "EXPLAIN ANALYZE UPDATE t SET v = 1 WHERE id = 1",
    ],
)
def test_statements_not_confined_to_the_key_they_name(sql: str) -> None:
    assert {r for r in refs(sql) if r[2] == "id"} == set()


def test_texts_sharing_a_classification_read_their_own_key_values() -> None:
    first = "UPDATE t_shape SET v = v + 1 WHERE id = 1"
    other = "UPDATE t_shape SET v = v + 5 WHERE id = 2"
    assert classify(first) is classify(other)  # shared: they differ only in numbers
    assert refs(other) == {(True, "t_shape", "id", (2,), ())}


def bind_tail(formats: list[int], values: list[bytes | None]) -> bytes:
    out = struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    out += struct.pack("!h", len(values))
    for value in values:
        out += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return out + struct.pack("!h", 0)


@pytest.mark.parametrize(
    ("formats", "values", "declared", "expected"),
    [
        ([], [b"42"], (), [42]),
        ([0], [b" +0042\n"], (23,), [42]),
        ([1], [struct.pack("!i", -7)], (0,), [-7]),
        ([1], [struct.pack("!q", 2**40)], (20,), [2**40]),
        ([1], [struct.pack("!h", 3)], (21,), [3]),
        ([0, 1], [b"x", struct.pack("!i", 9)], (), None),  # $1 is not an integer
        ([], [b"1_000"], (), None),
        ([], [b"0x10"], (), None),
        ([], [b"1.0"], (), None),
        ([], [None], (), None),
        ([], [b"1"], (1700,), None),  # declared numeric
        ([], [b"1"], (701,), None),  # declared float8
        ([1], [b"\x00\x00\x01"], (), None),
    ],
)
def test_bound_integers(
    formats: list[int], values: list[bytes | None], declared: tuple[int, ...], expected: list[int] | None
) -> None:
    assert bound_integers(bind_tail(formats, values), (1,), declared) == expected


def test_param_types_of_a_parse() -> None:
    assert param_types(struct.pack("!hII", 2, 23, 0)) == (23, 0)
    assert param_types(b"\x00\x00") == ()


def test_point_reads_survive_other_keys_writes_and_not_whole_table_ones() -> None:
    gens = TableGenerations()
    t = frozenset({"t"})
    point = gens.stamp("db", read_names(t, ("t", 1)))
    other = gens.stamp("db", read_names(t, ("t", 2)))
    scan = gens.stamp("db", read_names(t, None))
    joined = gens.stamp("db", read_names(frozenset({"t", "u"}), ("t", 1)))  # not a point read
    gens.bump_tables("db", write_names("t", [2]))
    assert gens.is_current(point)
    assert not gens.is_current(other)
    assert not gens.is_current(scan)
    assert not gens.is_current(joined)
    gens.bump_tables("db", ["t"])
    assert not gens.is_current(point)


def test_keyref_is_plain_data() -> None:
    assert KeyRef(True, "t", "id", (1,)) == KeyRef(True, "t", "id", (1,), ())


def test_per_key_generations_stay_bounded_per_table() -> None:
    gens = TableGenerations()
    for key in range(-20_000, 20_000, 3):
        gens.bump_tables("db", write_names("t", [key]))
    names = {name for _, name, _ in gens.to_state()["tables"]}
    assert len(names) == KEY_BUCKETS + 1  # every bucket, and t#rows

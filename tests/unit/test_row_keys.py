"""The key values a change's rows carry (freshness/rowkeys.py), read from a real walsender's
bytes (tests/unit/stream_capture.py) for both output plugins and from the edge cases real
captures rarely show; the proof of a replica identity; what the caches bump for them."""

from __future__ import annotations

import pytest

from neonpoly.cache.keys import bucket_name, feed_names, rows_name
from neonpoly.freshness import pgoutput, textdecoding
from neonpoly.freshness.replica_identity import IdentityBook, Known, identity_sql, parse_rows
from neonpoly.freshness.rowkeys import (
    MAX_KEYS_PER_TABLE,
    KeyAccumulator,
    integer,
    integer_columns,
    pgoutput_row,
    restrict,
)
from neonpoly.freshness.stream import RowChange
from tests.unit.stream_capture import PGOUTPUT, TEST_DECODING
from tests.unit.test_stream import MIXED, _changes

# Per committed transaction of the capture's SCRIPT: table -> column -> values.
EXPECTED_ROWS: list[dict[str, dict[str, set[int]]]] = [
    {"t": {"id": {1, 2}}},  # INSERT two rows
    {"t": {"id": {1}}},  # UPDATE of a non-key column: the key, unchanged
    {MIXED: {"id": {5, 6}}, "t": {"id": {2}}},  # REPLICA IDENTITY FULL: old row and new; a DELETE's key
    {"part_low": {"id": {1}, "k": {50}}},  # every integer column of an INSERT is known
    {"child": {"id": {1}}, "t": {"id": {1}}},  # the cascaded DELETE comes as a row of its own
    {},  # TRUNCATE: whole tables
    {},  # DDL
    {"t": {"id": {9}, "w": {7}}},
    {},
    {"t": {"id": {3}, "w": {7}}},  # a TOASTed text beside the key
]


@pytest.mark.parametrize(
    ("frames", "text"), [(PGOUTPUT, False), (TEST_DECODING, True)], ids=["pgoutput", "test_decoding"]
)
def test_a_real_stream_gives_each_transaction_its_key_values(frames: list[bytes], text: bool) -> None:
    changes, _ = _changes(frames, text)
    got = [{t: {c: set(v) for c, v in keys.items()} for t, keys in change.rows.items()} for change in changes]
    assert got == EXPECTED_ROWS
    # Only test_decoding's UPDATE without old key needs its replica identity proven.
    needs = [dict(change.identity) for change in changes]
    assert needs[1] == ({"t": frozenset({("public", "t")})} if text else {})
    assert all(not n for i, n in enumerate(needs) if i != 1)


def _line(rest: bytes) -> RowChange:
    decoded = textdecoding.decode(b"table public.t: " + rest, 0)
    assert isinstance(decoded, RowChange)
    return decoded


def test_test_decoding_rows_read_only_plain_integers() -> None:
    row = _line(b"""INSERT: id[bigint]:-42 "odd ]: col"[text]:'it''s a new-tuple: x[integer]:7' n[numeric]:1""")
    assert row.keys == {"id": frozenset({-42})} and not row.needs_identity
    update = _line(b"UPDATE: old-key: id[integer]:1 new-tuple: id[integer]:2 v[text]:null")
    assert update.keys == {"id": frozenset({1, 2})} and not update.needs_identity
    plain = _line(b"UPDATE: id[integer]:1 a[integer[]]:'{1,2}' s[smallint]:3 t[text]:unchanged-toast-datum")
    assert plain.keys == {"id": frozenset({1}), "s": frozenset({3})} and plain.needs_identity
    assert _line(b"DELETE: id[integer]:5").keys == {"id": frozenset({5})}
    for unsure in (
        b"DELETE: (no-tuple-data)",
        b"UPDATE: (no-tuple-data)",
        b"INSERT: id[integer]:null",
        b"INSERT: id[integer]:0x1F",
        b"INSERT: id[integer]:'1",  # unterminated
        b"UPDATE: old-key: id[integer]:1",  # no new tuple
    ):
        assert not _line(unsure).keys, unsure


def test_integer_texts() -> None:
    assert [integer(t) for t in (b"0", b"-42", b"9223372036854775807", None)] == [0, -42, 2**63 - 1, None]
    for bad in (b"", b"-", b"+1", b" 1", b"1.0", b"1e3", b"\xd9\xa1", b"12345678901234567890"):
        assert integer(bad) is None, bad


def test_pgoutput_rows_need_the_old_value_of_every_key() -> None:
    names, types = ("id", "v"), integer_columns((23, 25))
    flags = (True, False)
    assert pgoutput_row("update", names, flags, types, "", None, (b"1", b"x")) == {"id": frozenset({1})}
    # The key changed: 'K' holds the old identity, the other columns as NULL.
    assert pgoutput_row("update", names, flags, types, "K", (b"1", None), (b"2", b"x")) == {"id": frozenset({1, 2})}
    # A column not in the identity, without an old row: its old value is unknown.
    assert pgoutput_row("update", names, (False, False), types, "", None, (b"1", b"x")) == {}
    assert pgoutput_row("update", names, flags, types, "", None, (None, b"x")) == {}  # NULL or unchanged
    assert pgoutput_row("delete", names, flags, types, "K", (b"3", None), None) == {"id": frozenset({3})}
    assert pgoutput_row("insert", names, flags, integer_columns((1700, 25)), "", None, (b"1", b"x")) == {}  # numeric


def test_pgoutput_tuples_decode_null_unchanged_and_text() -> None:
    body = b"U" + (7).to_bytes(4, "big") + b"K" + b"\x00\x02" + b"t\x00\x00\x00\x011" + b"n"
    body += b"N" + b"\x00\x02" + b"t\x00\x00\x00\x012" + b"u"
    change = pgoutput.decode(body)
    assert change == RowChange("update", 7, old_kind="K", old=(b"1", None), new=(b"2", None))


def test_a_transaction_keeps_only_columns_known_for_every_row() -> None:
    acc = KeyAccumulator()
    acc.add("t", {"id": frozenset({1}), "w": frozenset({7})})
    acc.add("t", {"id": frozenset({2})})
    acc.add("u", {"id": frozenset({1})}, ("s", "u"))
    acc.add("x", {"id": frozenset({1})})
    acc.add("x", None)
    acc.add("x", {"id": frozenset({2})})  # once whole, whole
    rows, identity = acc.result()
    assert rows == {"t": {"id": frozenset({1, 2})}, "u": {"id": frozenset({1})}}
    assert identity == {"u": frozenset({("s", "u")})}
    assert acc.whole("x") and not acc.whole("t")
    for key in range(MAX_KEYS_PER_TABLE + 1):
        acc.add("big", {"id": frozenset({key})})
    assert acc.whole("big")
    assert restrict(rows, {"u": None}) == {"t": {"id": frozenset({1, 2})}}
    assert restrict(rows, {"t": ["id", "w"]}) == rows


def test_a_replica_identity_is_proven_only_by_reads_around_the_change() -> None:
    book = IdentityBook()
    rel = ("public", "t")
    first = {rel: Known("1:100:d:5:100", frozenset({"id"}), 50)}
    assert book.proven([rel], 60, first) is None  # no earlier read
    book.remember(first, [rel])
    same = {rel: Known("1:100:d:5:100", frozenset({"id"}), 90)}
    assert book.proven([rel], 60, same) == frozenset({"id"})
    assert book.proven([rel], 50, same) is None  # committed before the earlier read
    moved = {rel: Known("1:120:d:5:100", frozenset({"id"}), 90)}  # the pg_class row was rewritten
    assert book.proven([rel], 60, moved) is None
    assert book.proven([rel], 60, {}) is None  # gone
    nothing = {rel: Known("1:100:d:5:100", frozenset(), 90)}
    assert book.proven([rel], 60, nothing) is None
    # A change that committed while a read was on its way (after it began): the next read
    # with the same fingerprint proves it against the earliest read of that fingerprint.
    book.remember(same, [rel])
    later = {rel: Known("1:100:d:5:100", frozenset({"id"}), 120)}
    assert book.proven([rel], 70, later) == frozenset({"id"})
    book.remember(moved, [rel])
    newer = {rel: Known("1:120:d:5:100", frozenset({"id"}), 130)}
    assert book.proven([rel], 85, newer) is None  # the new fingerprint's streak starts at 90
    assert book.proven([rel], 95, newer) == frozenset({"id"})
    book.forget()
    assert book.proven([rel], 60, same) is None


def test_the_identity_read_quotes_names_as_bytes() -> None:
    sql = identity_sql([("s'x", "t\\")])
    assert "s'x" not in sql and "t\\" not in sql
    assert "'732778'" in sql and "'745c'" in sql  # the names' UTF-8 bytes, in hex
    rows = [("s", "t", "f", "id", "0/10"), ("s", "t", "f", "k", "0/10"), ("s", "u", "g", None, "0/10")]
    assert parse_rows(rows) == {
        ("s", "t"): Known("f", frozenset({"id", "k"}), 16),
        ("s", "u"): Known("g", frozenset(), 16),
    }


def test_the_caches_bump_keys_only_where_every_book_names_a_known_column() -> None:
    rows = {"t": {"id": frozenset({1, 4097})}, "u": {"id": frozenset({1})}}
    books: dict[str, list[str | None]] = {"t": ["id", "id"], "u": ["id", None]}
    names = feed_names(frozenset({"t", "u", "w"}), rows, lambda t: books.get(t, [None]))
    assert names == {rows_name("t"), bucket_name("t", 1), "u", "w"}  # 1 and 4097 share a bucket
    assert feed_names(frozenset({"t"}), rows, lambda t: ["v"]) == {"t"}

"""The change feed's codec on bytes a real walsender sent (tests/unit/stream_capture.py), for
both output plugins, and on the edge cases real captures rarely show."""

from __future__ import annotations

import struct

import pytest

from neonpoly.freshness import pgoutput, textdecoding
from neonpoly.freshness.stream import (
    Begin,
    Change,
    Commit,
    Decoded,
    Keepalive,
    Message,
    ProtocolError,
    Relation,
    RowChange,
    TransactionAssembler,
    Truncate,
    XLogData,
    decode_copy,
    format_lsn,
    parse_lsn,
    pg_time_to_unix,
    standby_status,
    unix_to_pg_time,
)
from tests.unit.stream_capture import PGOUTPUT, TEST_DECODING

MIXED = "Mixed: Case."
# What each committed transaction of the capture's SCRIPT touched, in commit order:
# (tables, truncated, DDL).
EXPECTED = [
    ({"t"}, False, False),  # INSERT two rows
    ({"t"}, False, False),  # UPDATE
    ({MIXED, "t"}, False, False),  # INSERT + UPDATE (REPLICA IDENTITY FULL) + DELETE, one transaction
    ({"part_low"}, False, False),  # INSERT into the parent: the partition's name
    ({"child", "t"}, False, False),  # DELETE cascading to child
    ({"t", MIXED, "child"}, True, False),  # TRUNCATE … CASCADE
    (set(), False, True),  # ALTER TABLE: the event trigger's message
    ({"t"}, False, True),  # INSERT + CREATE INDEX, one transaction
    (set(), False, False),  # a non-transactional message of someone else's
    ({"t"}, False, False),  # a TOASTed value
]


def _changes(frames: list[bytes], text: bool) -> tuple[list[Change], int]:
    assembler = TransactionAssembler()
    changes: list[Change] = []
    position = 0
    for raw in frames:
        frame = decode_copy(raw)
        if isinstance(frame, Keepalive):
            if not assembler.in_transaction:
                position = max(position, frame.wal_end)
            continue
        decoded: Decoded = textdecoding.decode(frame.data, frame.start) if text else pgoutput.decode(frame.data)
        change = assembler.feed(decoded)
        if change is not None:
            assert change.end_lsn >= position or change.commit_time == 0, "commits arrive in order"
            position = max(position, change.end_lsn)
            changes.append(change)
    assert not assembler.in_transaction
    return changes, position


@pytest.mark.parametrize(
    ("frames", "text"), [(PGOUTPUT, False), (TEST_DECODING, True)], ids=["pgoutput", "test_decoding"]
)
def test_a_real_stream_gives_each_transaction_its_tables_in_commit_order(frames: list[bytes], text: bool) -> None:
    changes, position = _changes(frames, text)
    got = [(set(c.tables), c.truncated, c.everything) for c in changes]
    assert got == EXPECTED
    assert position == max(decode_copy(f).wal_end for f in frames if f[:1] == b"k")
    ddl = [c for c in changes if c.everything]
    assert [r for c in ddl for r in c.reasons] == ["DDL: ALTER TABLE", "DDL: CREATE INDEX"]
    other = changes[8].messages
    assert [(m.transactional, m.prefix, m.content) for m in other] == [(False, "other", b"not in a transaction")]
    # The commit time is the origin's clock when it committed, within the capture's few seconds.
    times = [pg_time_to_unix(c.commit_time) for c in changes if c.commit_time]
    assert len(times) >= 8 and max(times) - min(times) < 60


def test_pgoutput_relation_messages_name_the_relation() -> None:
    relations = [pgoutput.decode(f[25:]) for f in PGOUTPUT if f[:1] == b"w" and f[25:26] == b"R"]
    named = {(r.namespace, r.name) for r in relations if isinstance(r, Relation)}
    assert {("public", "t"), ("S 2", MIXED), ("public", "part_low"), ("public", "child")} <= named
    t = next(r for r in relations if isinstance(r, Relation) and r.name == "t")
    assert t.columns[:2] == ("id", "v") and t.replica_identity == "d"


def test_xlogdata_and_keepalive_framing() -> None:
    frame = decode_copy(b"w" + struct.pack("!QQq", 10, 20, 30) + b"BEGIN")
    assert frame == XLogData(10, 20, 30, b"BEGIN")
    assert decode_copy(b"k" + struct.pack("!Qq?", 99, 5, True)) == Keepalive(99, 5, True)
    with pytest.raises(ProtocolError):
        decode_copy(b"k\x00")
    with pytest.raises(ProtocolError):
        decode_copy(b"x")
    status = standby_status(1, 2, 3, 4, reply=True)
    assert status[:1] == b"r" and struct.unpack("!QQQq?", status[1:]) == (1, 2, 3, 4, True)


def test_lsn_and_time_conversions() -> None:
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert parse_lsn("0/196ABB8") == 0x196ABB8
    assert pg_time_to_unix(0) == 946_684_800
    assert unix_to_pg_time(946_684_801.5) == 1_500_000


def test_test_decoding_quoted_names_and_odd_prefixes() -> None:
    change = textdecoding.decode(b'table "we""ird"."a, b: c": DELETE: (no-tuple-data)', 5)
    assert change == RowChange("delete", relation=('we"ird', "a, b: c"))
    trunc = textdecoding.decode(b"table public.a, s.b: TRUNCATE: restart_seqs cascade", 5)
    assert trunc == Truncate(relations=(("public", "a"), ("s", "b")), cascade=True, restart_identity=True)
    # A prefix holding the separator: the split whose size matches the content wins.
    message = textdecoding.decode(b"message: transactional: 1 prefix: p, sz: 3 x, sz: 2 content:ab", 7)
    assert message == Message(True, 7, "p, sz: 3 x", b"ab")
    assert textdecoding.decode(b"COMMIT", 42) == Commit(42, 42, 0)
    assert textdecoding.decode(b"BEGIN", 0) == Begin()
    for bad in (b"table t: INSERT: x", b"table public.t INSERT", b"message: nonsense", b"STREAM START"):
        with pytest.raises(ProtocolError):
            textdecoding.decode(bad, 0)


def test_pgoutput_malformed_and_unknown() -> None:
    with pytest.raises(ProtocolError):
        pgoutput.decode(b"C\x00\x00")
    with pytest.raises(ProtocolError):
        pgoutput.decode(b"S\x00\x00\x00\x01")  # a streamed transaction: never asked for
    with pytest.raises(ProtocolError):
        pgoutput.decode(b"M\x01" + struct.pack("!Q", 1) + b"p\x00" + struct.pack("!i", 50) + b"short")


def test_a_change_to_an_undescribed_relation_evicts_the_database() -> None:
    assembler = TransactionAssembler()
    assembler.feed(Begin(1, 2, 3))
    assembler.feed(RowChange("insert", relid=12345))
    change = assembler.feed(Commit(1, 2, 3))
    assert change is not None and change.everything and change.tables == frozenset()
    with pytest.raises(ProtocolError):
        assembler.feed(RowChange("insert", relid=1))  # outside a transaction
    with pytest.raises(ProtocolError):
        assembler.feed(Commit(1, 2, 3))

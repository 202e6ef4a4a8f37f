"""test_decoding, the output plugin shipped with PostgreSQL, decoded as far as invalidation
needs. No I/O.

The feed asks for `include-xids '0'`, `skip-empty-xacts '1'` and `include-timestamp '1'`; each
XLogData then carries one line (contrib/test_decoding/test_decoding.c):

    BEGIN
    table public.t: INSERT: id[integer]:1 v[text]:'a'
    table "S 2"."Odd: name": UPDATE: ...          (names as quote_qualified_identifier prints them)
    table public.t, public.child: TRUNCATE: restart_seqs cascade
    message: transactional: 1 prefix: neonpoly.ddl, sz: 11 content:ALTER TABLE
    COMMIT (at 2024-05-01 12:00:00.123456+00)

A change's relation names are read, and its integer columns' values (rowkeys.py): a row is
` name[type]:value` per column (names as quote_identifier prints them, NULL as `null`, an
unchanged TOASTed value as `unchanged-toast-datum`, integers bare, most other types quoted);
an UPDATE prints `old-key:` (the old identity columns, or the whole old row with REPLICA
IDENTITY FULL) and `new-tuple:` when the identity changed or is FULL, else the new tuple
alone; a DELETE prints the old identity columns (or the old row), `(no-tuple-data)` without
an identity. Anything not read as expected only costs precision (the table is bumped whole).
The commit line's XLogData `start` is the end of the commit record (the position to confirm).
"""

from __future__ import annotations

import re
from datetime import datetime

from neonpoly.freshness.rowkeys import INTEGER_TYPE_NAMES, RowKeys, integer
from neonpoly.freshness.stream import (
    Begin,
    Commit,
    Decoded,
    Message,
    ProtocolError,
    QualifiedName,
    RowChange,
    Truncate,
    unix_to_pg_time,
)

START_OPTIONS = "\"include-xids\" '0', \"skip-empty-xacts\" '1', \"include-timestamp\" '1'"
_ROW_KINDS = {"INSERT": "insert", "UPDATE": "update", "DELETE": "delete"}
_MESSAGE = re.compile(rb"message: transactional: ([01]) prefix: (.*?), sz: (\d+) content:", re.DOTALL)


def decode(data: bytes, start: int, encoding: str = "utf-8") -> Decoded:
    """One test_decoding line; `start` is its XLogData's WAL position. test_decoding prints
    in the database's `encoding` (the walsender converts none of it): names are read in it,
    or a LATIN1 database's `café` would not be the name the cache tagged."""
    if data.startswith(b"table "):
        relations, end = _names(data, len(b"table "), encoding)
        action, _, flags = data[end:].partition(b":")
        kind = action.strip().decode("ascii", "replace")
        if kind in _ROW_KINDS and len(relations) == 1:
            row = _ROW_KINDS[kind]
            keys, needs_identity = _row_keys(row, flags)
            return RowChange(row, relation=relations[0], keys=keys, needs_identity=needs_identity)
        if kind == "TRUNCATE":
            return Truncate(relations=tuple(relations), cascade=b"cascade" in flags,
                            restart_identity=b"restart_seqs" in flags)
        raise ProtocolError(f"unknown test_decoding change {kind!r}")
    if data == b"BEGIN" or data.startswith(b"BEGIN "):
        return Begin()
    if data == b"COMMIT" or data.startswith(b"COMMIT "):
        return Commit(start, start, _commit_time(data))
    if data.startswith(b"message: "):
        return _message(data, start)
    raise ProtocolError(f"unknown test_decoding line {data[:40]!r}")


_OLD = b" old-key:"
_NEW = b" new-tuple:"


def _row_keys(kind: str, rest: bytes) -> tuple[RowKeys | None, bool]:
    """The known key values of one row (None: nothing known) and whether they hold only if
    the columns are in the replica identity (an UPDATE without old key)."""
    try:
        if rest.startswith(_OLD):
            old, pos = _tuple(rest, len(_OLD), _NEW)
            if not rest.startswith(_NEW, pos):
                return None, False
            new, _ = _tuple(rest, pos + len(_NEW), None)
        else:
            old = None
            new, _ = _tuple(rest, 0, None)
    except ValueError:
        return None, False
    if kind == "insert":
        return {c: frozenset((v,)) for c, v in new.items() if v is not None}, False
    if kind == "delete":  # the printed tuple is the old identity (or old row)
        return {c: frozenset((v,)) for c, v in new.items() if v is not None}, False
    if old is None:
        return {c: frozenset((v,)) for c, v in new.items() if v is not None}, True
    return {
        c: frozenset((b, a)) for c, b in old.items() if b is not None and (a := new.get(c)) is not None
    }, False


# One column, ` name[type]:value`, as tuple_to_stringinfo prints it: a quoted or bare name;
# a type that may hold brackets (`integer[]`) or quoted names; a value quoted (doubled
# quotes inside), a bit string (`B'0101'`), or bare up to the next space (numbers, `null`,
# `unchanged-toast-datum`, booleans). Possessive loops never backtrack, so matching is
# linear; the row is decoded on the relay's event loop: one match per column, in C.
_QUOTED_NAME = rb'"[^"]*+(?:""[^"]*+)*+"'
_COLUMN = re.compile(
    rb" (" + _QUOTED_NAME + rb'|[^" \[]++)'  # the name
    rb"\[([^\]\"]*+(?:(?:" + _QUOTED_NAME + rb"|\](?!:))[^\]\"]*+)*+)\]:"  # [type]:
    rb"('[^']*+(?:''[^']*+)*+'|B'[01]*+'|[^ ']*+)"  # the value
)


def _tuple(data: bytes, pos: int, stop: bytes | None) -> tuple[dict[str, int | None], int]:
    """Integer columns from `pos` up to `stop` (or the end): name -> its value, None when
    not one (NULL, unchanged, not a plain integer); raises ValueError when unreadable."""
    out: dict[str, int | None] = {}
    end = len(data)
    match = _COLUMN.match
    while pos < end and not (stop is not None and data.startswith(stop, pos)):
        found = match(data, pos)
        if found is None:
            raise ValueError(f"unreadable column at {pos}")
        pos = found.end()
        raw, typ, value = found.groups()
        if typ not in INTEGER_TYPE_NAMES:
            continue  # only integer columns can hold a key
        name = (raw[1:-1].replace(b'""', b'"') if raw[:1] == b'"' else raw).decode("utf-8", "replace")
        if name in out:
            raise ValueError("a column twice")
        out[name] = integer(value)
    return out, pos


def row_prefix(data: bytes) -> bytes:
    """What every line of the same change to the same relation starts with
    (`table public.t: INSERT:`): the feed skips such lines inside a transaction, decoding
    each relation once, not each of a bulk load's rows."""
    _, end = _names(data, len(b"table "))
    colon = data.index(b":", end)
    return data[: colon + 1]


def _commit_time(data: bytes) -> int:
    text = data.decode("ascii", "replace")
    at = text.find("(at ")
    if at < 0 or not text.endswith(")"):
        return 0
    try:
        return unix_to_pg_time(datetime.fromisoformat(text[at + 4 : -1]).timestamp())
    except ValueError:
        return 0  # only the lag shown in reports needs it


def _message(data: bytes, start: int) -> Message:
    # The prefix may hold ", sz: "; the one split whose size matches the rest is the real one.
    for match in _MESSAGE.finditer(data):
        if match.start() != 0:
            break
        content = data[match.end() :]
        if len(content) == int(match.group(3)):
            return Message(match.group(1) == b"1", start, match.group(2).decode("utf-8", "replace"), content)
    raise ProtocolError(f"malformed test_decoding message {data[:60]!r}")


def _names(data: bytes, pos: int, encoding: str = "utf-8") -> tuple[list[QualifiedName], int]:
    """`schema.name[, schema.name …]: rest` → the names and where `rest` starts. Bytes are
    read as bytes: no byte of a multi-byte UTF-8 character is ASCII, so the quotes, dots and
    separators found are the real ones."""
    names: list[QualifiedName] = []
    while True:
        schema, pos = _identifier(data, pos, encoding)
        if data[pos : pos + 1] != b".":
            raise ProtocolError(f"unqualified relation in {data[:80]!r}")
        name, pos = _identifier(data, pos + 1, encoding)
        names.append((schema, name))
        if data.startswith(b", ", pos):
            pos += 2
            continue
        if data[pos : pos + 1] == b":":
            return names, pos + 1
        raise ProtocolError(f"cannot read relation names in {data[:80]!r}")


def _identifier(data: bytes, pos: int, encoding: str = "utf-8") -> tuple[str, int]:
    """One identifier as quote_identifier prints it: bare, or in double quotes ("" inside)."""
    if data[pos : pos + 1] == b'"':
        out = bytearray()
        i = pos + 1
        while True:
            end = data.find(b'"', i)
            if end < 0:
                raise ProtocolError(f"unterminated quoted name in {data[:80]!r}")
            out += data[i:end]
            if data[end + 1 : end + 2] == b'"':
                out += b'"'
                i = end + 2
                continue
            return out.decode(encoding, "replace"), end + 1
    end = pos
    while end < len(data) and data[end] not in b".:, [":
        end += 1
    if end == pos:
        raise ProtocolError(f"empty name in {data[:80]!r}")
    return data[pos:end].decode(encoding, "replace"), end

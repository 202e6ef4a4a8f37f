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

Only the relation names are read from a change; its values never matter. The commit line's
XLogData `start` is the end of the commit record (the position to confirm).
"""

from __future__ import annotations

import re
from datetime import datetime

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


def decode(data: bytes, start: int) -> Decoded:
    """One test_decoding line; `start` is its XLogData's WAL position."""
    if data.startswith(b"table "):
        text = data.decode("utf-8", "replace")
        relations, rest = _names(text, len("table "))
        action = rest.split(":", 1)[0].strip()
        if action in _ROW_KINDS and len(relations) == 1:
            return RowChange(_ROW_KINDS[action], relation=relations[0])
        if action == "TRUNCATE":
            flags = rest.split(":", 1)[1] if ":" in rest else ""
            return Truncate(relations=tuple(relations), cascade="cascade" in flags,
                            restart_identity="restart_seqs" in flags)
        raise ProtocolError(f"unknown test_decoding change {action!r}")
    if data == b"BEGIN" or data.startswith(b"BEGIN "):
        return Begin()
    if data == b"COMMIT" or data.startswith(b"COMMIT "):
        return Commit(start, start, _commit_time(data))
    if data.startswith(b"message: "):
        return _message(data, start)
    raise ProtocolError(f"unknown test_decoding line {data[:40]!r}")


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


def _names(text: str, pos: int) -> tuple[list[QualifiedName], str]:
    """`schema.name[, schema.name …]: rest` → the names and what follows the colon."""
    names: list[QualifiedName] = []
    while True:
        schema, pos = _identifier(text, pos)
        if text[pos : pos + 1] != ".":
            raise ProtocolError(f"unqualified relation in {text[:80]!r}")
        name, pos = _identifier(text, pos + 1)
        names.append((schema, name))
        if text.startswith(", ", pos):
            pos += 2
            continue
        if text[pos : pos + 1] == ":":
            return names, text[pos + 1 :]
        raise ProtocolError(f"cannot read relation names in {text[:80]!r}")


def _identifier(text: str, pos: int) -> tuple[str, int]:
    """One identifier as quote_identifier prints it: bare, or in double quotes ("" inside)."""
    if text[pos : pos + 1] == '"':
        out = []
        i = pos + 1
        while True:
            end = text.find('"', i)
            if end < 0:
                raise ProtocolError(f"unterminated quoted name in {text[:80]!r}")
            out.append(text[i:end])
            if text[end + 1 : end + 2] == '"':
                out.append('"')
                i = end + 2
                continue
            return "".join(out), end + 1
    end = pos
    while end < len(text) and text[end] not in ".:, ":
        end += 1
    if end == pos:
        raise ProtocolError(f"empty name in {text[:80]!r}")
    return text[pos:end], end

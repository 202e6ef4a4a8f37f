"""pgoutput, PostgreSQL's own output plugin, decoded as far as invalidation needs. No I/O.

"Logical Replication Message Formats", protocol version 1 (no streaming of in-progress
transactions, none of version 2+'s messages): Begin, Commit, Relation (its id, namespace,
name, columns with their key flags and types), Insert, Update and Delete (the relation id and
the tuples' text values: the key values they carry make bumps precise, see `rowkeys.py`),
Truncate (its relation ids), the logical decoding Message (prefix and content), and Origin
and Type (recognised, ignored).
"""

from __future__ import annotations

import struct

from neonpoly.freshness.rowkeys import Tuple, integer_columns
from neonpoly.freshness.stream import (
    Begin,
    Commit,
    Decoded,
    Ignored,
    Message,
    ProtocolError,
    Relation,
    RowChange,
    Truncate,
)

_I8 = struct.Struct("!b")
_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_ROW_KINDS = {b"I": "insert", b"U": "update", b"D": "delete"}


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def num(self, fmt: struct.Struct) -> int:
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(value)

    def cstring(self) -> str:
        end = self.data.index(b"\x00", self.pos)
        text = self.data[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("length runs past the end of the message")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def decode(data: bytes) -> Decoded:
    """One pgoutput message."""
    if not data:
        raise ProtocolError("empty pgoutput message")
    kind = data[:1]
    r = _Reader(data, 1)
    try:
        if kind == b"B":
            final_lsn, commit_time, xid = r.unpack(_BEGIN)
            return Begin(final_lsn, commit_time, xid)
        if kind == b"C":
            _flags, commit_lsn, end_lsn, commit_time = r.unpack(_COMMIT)
            return Commit(commit_lsn, end_lsn, commit_time)
        if kind in _ROW_KINDS:
            return _row(_ROW_KINDS[kind], r)
        if kind == b"R":
            relid = r.num(_U32)
            namespace = r.cstring()
            name = r.cstring()
            identity = chr(r.num(_U8))
            columns: list[str] = []
            key_flags: list[bool] = []
            types: list[int] = []
            for _ in range(r.num(_I16)):
                key_flags.append(bool(r.num(_I8) & 1))  # part of the replica identity
                columns.append(r.cstring())
                types.append(r.num(_U32))
                r.num(_I32)  # type modifier
            return Relation(
                relid, namespace, name, identity, tuple(columns), tuple(key_flags), tuple(types), integer_columns(types)
            )
        if kind == b"T":
            count = r.num(_I32)
            options = r.num(_I8)
            relids = tuple(r.num(_U32) for _ in range(count))
            return Truncate(relids=relids, cascade=bool(options & 1), restart_identity=bool(options & 2))
        if kind == b"M":
            flags = r.num(_I8)
            lsn = r.num(_U64)
            prefix = r.cstring()
            content = r.take(r.num(_I32))
            return Message(bool(flags & 1), lsn, prefix, content)
        if kind in (b"O", b"Y"):
            return Ignored("origin" if kind == b"O" else "type")
    except ProtocolError:
        raise
    except (struct.error, ValueError, IndexError) as exc:
        raise ProtocolError(f"truncated pgoutput message {kind!r}: {exc}") from exc
    raise ProtocolError(f"unknown pgoutput message {kind!r} (streaming or a newer protocol was not asked for)")


def _row(kind: str, r: _Reader) -> RowChange:
    """Insert: 'N' new. Update: optional 'K' (old identity) or 'O' (old row), then 'N' new.
    Delete: 'K' or 'O'."""
    relid = r.num(_U32)
    old_kind = ""
    old: Tuple | None = None
    new: Tuple | None = None
    tag = r.take(1)
    if tag in (b"K", b"O"):
        old_kind, old = tag.decode(), _tuple(r)
        if kind == "update":
            tag = r.take(1)
    if tag == b"N":
        new = _tuple(r)
    elif kind != "delete" or old is None:
        raise ProtocolError(f"unexpected tuple tag {tag!r} in a {kind}")
    return RowChange(kind, relid, old_kind=old_kind, old=old, new=new)


def _tuple(r: _Reader) -> Tuple:
    """TupleData: per column 'n' (NULL), 'u' (unchanged TOASTed value), 't' (text); both of
    the first two read as None ("not known"). Protocol 1 never sends 'b' (binary). Read with
    locals, not the reader's methods: every row of a change passes here on the relay's loop."""
    data, pos = r.data, r.pos
    (count,) = _I16.unpack_from(data, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(count):
        tag = data[pos]
        if tag == 0x74:  # 't'
            (length,) = _I32.unpack_from(data, pos + 1)
            start, pos = pos + 5, pos + 5 + length
            if length < 0 or pos > len(data):
                raise ProtocolError("length runs past the end of the message")
            values.append(data[start:pos])
        elif tag == 0x6E or tag == 0x75:  # 'n', 'u'
            pos += 1
            values.append(None)
        else:
            raise ProtocolError(f"unknown tuple column tag {bytes((tag,))!r}")
    r.pos = pos
    return tuple(values)


def row_prefix(data: bytes) -> bytes:
    """What every Insert (Update, Delete) of the same relation starts with: its kind and
    relation id. The feed skips such messages inside a transaction once the relation is
    known (a Relation message in between resets that)."""
    return data[:5]

"""The logical replication stream as data: CopyData framing and pgoutput messages. No I/O.

A walsender in COPY BOTH mode sends CopyData messages of two kinds (PostgreSQL's docs,
"Streaming Replication Protocol"): XLogData (`w`: where the data starts, the server's WAL
end, its clock, then one pgoutput message) and the primary keepalive (`k`: the WAL end, the
clock, whether a reply is wanted). We answer with the standby status update (`r`).

pgoutput's messages ("Logical Replication Message Formats", protocol version 1) are decoded
as far as invalidation needs: Begin, Commit, Relation (its id, namespace and name), Insert,
Update and Delete (the relation id; the tuples are not decoded, a row's values never matter
here), Truncate (its relation ids), logical decoding Message (prefix and content), and Origin
and Type (recognised, ignored). `TransactionAssembler` turns the messages of one connection
into committed changes: which relations one transaction touched, in commit order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000

_I8 = struct.Struct("!b")
_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")
_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STATUS = struct.Struct("!cQQQq?")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")


class ProtocolError(ValueError):
    """Bytes that are not what the protocol says: the feed cannot be trusted past them."""


def format_lsn(lsn: int) -> str:
    """`0/16B3748`, as PostgreSQL prints a WAL position."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not a WAL position: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def pg_time_to_unix(us: int) -> float:
    """A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as Unix seconds."""
    return (us + PG_EPOCH_OFFSET_US) / 1_000_000


def unix_to_pg_time(seconds: float) -> int:
    return int(seconds * 1_000_000) - PG_EPOCH_OFFSET_US


# --- CopyData of the replication protocol -----------------------------------------------


@dataclass(frozen=True, slots=True)
class XLogData:
    start: int  # where this message's WAL starts (0 for messages outside WAL, e.g. Relation)
    wal_end: int  # the server's current end of WAL
    send_time: int  # server clock, PostgreSQL microseconds
    data: bytes  # one pgoutput message


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int  # everything before it has been decoded and sent
    send_time: int
    reply_requested: bool


def decode_copy(data: bytes) -> XLogData | Keepalive:
    """One CopyData payload from the walsender."""
    kind = data[:1]
    try:
        if kind == b"w":
            start, wal_end, send_time = _XLOGDATA.unpack_from(data, 1)
            return XLogData(start, wal_end, send_time, bytes(data[1 + _XLOGDATA.size :]))
        if kind == b"k":
            wal_end, send_time, reply = _KEEPALIVE.unpack_from(data, 1)
            return Keepalive(wal_end, send_time, reply)
    except struct.error as exc:
        raise ProtocolError(f"truncated replication message {kind!r}: {exc}") from exc
    raise ProtocolError(f"unknown replication message {kind!r}")


def standby_status(written: int, flushed: int, applied: int, now_pg: int, reply: bool = False) -> bytes:
    """The standby status update: everything up to `flushed` may be recycled by the server."""
    return _STATUS.pack(b"r", written, flushed, applied, now_pg, reply)


# --- pgoutput ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the LSN of the transaction's commit record
    commit_time: int  # PostgreSQL microseconds
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int  # the end of the commit record: the position to confirm
    commit_time: int


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str  # "" for pg_catalog
    name: str
    replica_identity: str
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RowChange:
    """Insert, Update or Delete: only which relation; the values are never needed."""

    kind: str  # "insert", "update", "delete"
    relid: int


@dataclass(frozen=True, slots=True)
class Truncate:
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    """pg_logical_emit_message: in the stream of its transaction when `transactional`."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message invalidation does not need (Origin, Type)."""

    kind: str


PgOutput = Begin | Commit | Relation | RowChange | Truncate | Message | Ignored

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


def decode(data: bytes) -> PgOutput:
    """One pgoutput message (protocol version 1, no streaming of in-progress transactions)."""
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
            return RowChange(_ROW_KINDS[kind], r.num(_U32))
        if kind == b"R":
            relid = r.num(_U32)
            namespace = r.cstring()
            name = r.cstring()
            identity = chr(r.num(_U8))
            columns = []
            for _ in range(r.num(_I16)):
                r.num(_I8)  # flags (1: part of the key)
                columns.append(r.cstring())
                r.num(_U32)  # type oid
                r.num(_I32)  # type modifier
            return Relation(relid, namespace, name, identity, tuple(columns))
        if kind == b"T":
            count = r.num(_I32)
            options = r.num(_I8)
            relids = tuple(r.num(_U32) for _ in range(count))
            return Truncate(relids, bool(options & 1), bool(options & 2))
        if kind == b"M":
            flags = r.num(_I8)
            lsn = r.num(_U64)
            prefix = r.cstring()
            content = r.take(r.num(_I32))
            return Message(bool(flags & 1), lsn, prefix, content)
        if kind in (b"O", b"Y"):
            return Ignored("origin" if kind == b"O" else "type")
    except (struct.error, ValueError, IndexError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"truncated pgoutput message {kind!r}: {exc}") from exc
    raise ProtocolError(f"unknown pgoutput message {kind!r} (streaming or a newer protocol was not asked for)")


# --- transactions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One committed transaction as invalidation sees it."""

    commit_lsn: int
    end_lsn: int
    commit_time: int  # PostgreSQL microseconds
    tables: frozenset[str]  # relation names as the cache tags them (see `table_name`)
    truncated: bool  # the transaction truncated some of `tables`
    everything: bool  # evict the database: DDL, or a relation the stream never described
    messages: tuple[Message, ...] = ()
    reasons: tuple[str, ...] = ()  # why `everything`


def table_name(relation: Relation) -> str:
    """The name invalidation bumps for a relation: its bare name, as the cache tags entries.

    The cache names tables as the server's catalogs do for the relation lookup
    (`pg_class.relname`, schema dropped: `cache/relations.py`), so `s1.t` and `s2.t` share
    a generation. Bumping the bare name is exact for the cache's tags and errs only towards
    evicting more."""
    return relation.name


@dataclass(slots=True)
class TransactionAssembler:
    """Feeds on one connection's pgoutput messages; `feed` returns a `Change` at each commit.

    Relation messages describe a relation id before its first change on this connection
    (and again after its definition changed); the map lives as long as the connection.
    `ddl_prefix` names the logical messages that mean "the catalog changed" (the event
    trigger's); a non-transactional one is a change of its own.
    """

    ddl_prefix: str = "neonpoly.ddl"
    relations: dict[int, Relation] = field(default_factory=dict)
    in_transaction: bool = False
    _begin: Begin | None = None
    _tables: set[str] = field(default_factory=set)
    _truncated: bool = False
    _reasons: list[str] = field(default_factory=list)
    _messages: list[Message] = field(default_factory=list)

    def feed(self, message: PgOutput) -> Change | None:
        if isinstance(message, Begin):
            if self.in_transaction:
                raise ProtocolError("Begin inside a transaction")
            self.in_transaction = True
            self._begin = message
            self._tables.clear()
            self._truncated = False
            self._reasons.clear()
            self._messages.clear()
            return None
        if isinstance(message, Relation):
            self.relations[message.relid] = message
            return None
        if isinstance(message, RowChange):
            self._touch(message.relid)
            return None
        if isinstance(message, Truncate):
            self._truncated = True
            for relid in message.relids:
                self._touch(relid)
            return None
        if isinstance(message, Message):
            if not message.transactional:
                ddl = message.prefix == self.ddl_prefix
                reasons = (f"DDL: {message.content.decode('utf-8', 'replace')}",) if ddl else ()
                return Change(message.lsn, message.lsn, 0, frozenset(), False, ddl, (message,), reasons)
            self._messages.append(message)
            if message.prefix == self.ddl_prefix:
                self._reasons.append(f"DDL: {message.content.decode('utf-8', 'replace')}")
            return None
        if isinstance(message, Commit):
            if not self.in_transaction:
                raise ProtocolError("Commit outside a transaction")
            self.in_transaction = False
            change = Change(
                message.commit_lsn,
                message.end_lsn,
                message.commit_time,
                frozenset(self._tables),
                self._truncated,
                bool(self._reasons),
                tuple(self._messages),
                tuple(self._reasons),
            )
            self._begin = None
            return change
        return None  # Ignored

    def _touch(self, relid: int) -> None:
        if not self.in_transaction:
            raise ProtocolError("a row change outside a transaction")
        relation = self.relations.get(relid)
        if relation is None:
            # pgoutput always describes a relation first; if it did not, trust nothing.
            self._reasons.append(f"a change to relation {relid}, which the stream never described")
            return
        self._tables.add(table_name(relation))

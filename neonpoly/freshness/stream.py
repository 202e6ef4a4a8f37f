"""The logical replication stream as data: CopyData framing, the decoded messages, and
transactions assembled from them. No I/O.

A walsender in COPY BOTH mode sends CopyData messages of two kinds (PostgreSQL's docs,
"Streaming Replication Protocol"): XLogData (`w`: where the data starts, the server's WAL
end, its clock, then one message of the output plugin) and the primary keepalive (`k`: the
WAL end, the clock, whether a reply is wanted). We answer with the standby status update (`r`).

Two output plugins are read (`pgoutput`, `textdecoding`); both decode into the messages
here, and `TransactionAssembler` turns one connection's messages into committed changes:
which relations one transaction touched, in commit order, and which key values of them
when the rows say so (`rowkeys.py`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from neonpoly.freshness.rowkeys import KeyAccumulator, RowKeys, Tuple, pgoutput_row

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000

_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STATUS = struct.Struct("!cQQQq?")


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
    start: int  # the WAL position the message stands for (a commit's: the end of its record)
    wal_end: int  # the server's current end of WAL
    send_time: int  # server clock, PostgreSQL microseconds
    data: bytes  # one message of the output plugin


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int  # every commit before it has been decoded and sent
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


# --- what the plugins say ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int = 0  # the LSN of the transaction's commit record (0: not said)
    commit_time: int = 0  # PostgreSQL microseconds (0: not said)
    xid: int = 0


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int  # the end of the commit record: the position to confirm
    commit_time: int  # PostgreSQL microseconds (0: not said)


@dataclass(frozen=True, slots=True)
class Relation:
    """pgoutput describes a relation id before its first change on a connection."""

    relid: int
    namespace: str  # "" for pg_catalog
    name: str
    replica_identity: str = "d"
    columns: tuple[str, ...] = ()
    key_flags: tuple[bool, ...] = ()  # per column: part of the replica identity
    types: tuple[int, ...] = ()  # per column: its type's OID
    integers: tuple[int, ...] = ()  # the positions of its int2/int4/int8 columns


QualifiedName = tuple[str, str]  # (namespace, relation name)


@dataclass(frozen=True, slots=True)
class RowChange:
    """Insert, Update or Delete: which relation, by id (pgoutput) or by name (test_decoding),
    and what its tuples say of key values (rowkeys.py): pgoutput's raw tuples (`old_kind`
    'K' or 'O', `old`, `new`), read with the relation's description; test_decoding's
    `keys` read from the line (None: nothing known), `needs_identity` when they hold only
    if the columns are part of the table's replica identity (an UPDATE without old key)."""

    kind: str  # "insert", "update", "delete"
    relid: int = 0
    relation: QualifiedName | None = None
    old_kind: str = ""
    old: Tuple | None = None
    new: Tuple | None = None
    keys: RowKeys | None = None
    needs_identity: bool = False


@dataclass(frozen=True, slots=True)
class Truncate:
    relids: tuple[int, ...] = ()
    relations: tuple[QualifiedName, ...] = ()
    cascade: bool = False
    restart_identity: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """pg_logical_emit_message: with its transaction, at its commit, when `transactional`."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message invalidation does not need (pgoutput's Origin and Type)."""

    kind: str


Decoded = Begin | Commit | Relation | RowChange | Truncate | Message | Ignored


# --- transactions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One committed transaction (or a message outside one) as invalidation sees it."""

    commit_lsn: int
    end_lsn: int
    commit_time: int  # PostgreSQL microseconds (0: unknown)
    tables: frozenset[str]  # relation names as the cache tags them (see `table_name`)
    truncated: bool  # the transaction truncated some of `tables`
    everything: bool  # evict the database: DDL, or a relation the stream never described
    messages: tuple[Message, ...] = ()
    reasons: tuple[str, ...] = ()  # why `everything`
    # Of `tables`, those whose every changed row's key values are known: column -> values
    # (rowkeys.py); the others are bumped whole.
    rows: dict[str, RowKeys] = field(default_factory=dict)
    # Of `rows`, the tables whose values hold only if those columns are in the replica
    # identity of these relations (test_decoding UPDATEs: replica_identity.py proves it).
    identity: dict[str, frozenset[QualifiedName]] = field(default_factory=dict)


def table_name(namespace: str, name: str) -> str:
    """The name invalidation bumps for a relation: its bare name, as the cache tags entries.

    The cache names tables as the server's catalogs do in its relation lookup
    (`pg_class.relname`, schema dropped: `cache/relations.py`), so `s1.t` and `s2.t` share
    a generation. Bumping the bare name is exact for the cache's tags and errs only towards
    evicting more. A partition's changes come under its own name, which the tags of a read
    of its parent include."""
    return name


@dataclass(slots=True)
class TransactionAssembler:
    """Feeds on one connection's messages; `feed` returns a `Change` at each commit.

    pgoutput describes a relation id (Relation) before its first change on the connection,
    and again after its definition changed; the map lives as long as the connection.
    `ddl_prefix` names the logical messages that mean "the catalog changed" (the event
    trigger's). A message outside a transaction is a change of its own: non-transactional
    ones always are, and test_decoding sends a transaction's messages without BEGIN/COMMIT
    when the transaction changed no rows (it skips empty transactions), at its commit.
    """

    ddl_prefix: str = "neonpoly.ddl"
    relations: dict[int, Relation] = field(default_factory=dict)
    in_transaction: bool = False
    _begin: Begin | None = None
    _tables: set[str] = field(default_factory=set)
    _truncated: bool = False
    _reasons: list[str] = field(default_factory=list)
    _messages: list[Message] = field(default_factory=list)
    _keys: KeyAccumulator = field(default_factory=KeyAccumulator)

    def whole(self, message: RowChange) -> bool:
        """True when the rest of this transaction's rows of `message`'s relation add nothing:
        its table is bumped whole anyway (the feed may skip them undecoded)."""
        return self._keys.whole(self._name(message.relid, message.relation) or "")

    def feed(self, message: Decoded) -> Change | None:
        if isinstance(message, Begin):
            if self.in_transaction:
                raise ProtocolError("Begin inside a transaction")
            self.in_transaction = True
            self._begin = message
            self._tables.clear()
            self._truncated = False
            self._reasons.clear()
            self._messages.clear()
            self._keys.clear()
            return None
        if isinstance(message, Relation):
            self.relations[message.relid] = message
            return None
        if isinstance(message, RowChange):
            table = self._touch(message.relid, message.relation)
            if table is not None:
                self._row_keys(table, message)
            return None
        if isinstance(message, Truncate):
            self._truncated = True
            for relid in message.relids:
                self._keys.add(self._touch(relid, None) or "", None)
            for relation in message.relations:
                self._keys.add(self._touch(0, relation) or "", None)
            return None
        if isinstance(message, Message):
            ddl = message.prefix == self.ddl_prefix
            why = f"DDL: {message.content.decode('utf-8', 'replace')}" if ddl else ""
            if not self.in_transaction:
                return Change(message.lsn, message.lsn, 0, frozenset(), False, ddl, (message,), (why,) if ddl else ())
            self._messages.append(message)
            if ddl:
                self._reasons.append(why)
            return None
        if isinstance(message, Commit):
            if not self.in_transaction:
                raise ProtocolError("Commit outside a transaction")
            self.in_transaction = False
            begin_time = self._begin.commit_time if self._begin is not None else 0
            rows, identity = self._keys.result()
            change = Change(
                message.commit_lsn,
                message.end_lsn,
                message.commit_time or begin_time,
                frozenset(self._tables),
                self._truncated,
                bool(self._reasons),
                tuple(self._messages),
                tuple(self._reasons),
                {} if self._truncated else rows,
                {} if self._truncated else identity,
            )
            self._begin = None
            return change
        return None  # Ignored

    def _name(self, relid: int, relation: QualifiedName | None) -> str | None:
        if relation is not None:
            return table_name(*relation)
        described = self.relations.get(relid)
        return None if described is None else table_name(described.namespace, described.name)

    def _touch(self, relid: int, relation: QualifiedName | None) -> str | None:
        if not self.in_transaction:
            raise ProtocolError("a row change outside a transaction")
        name = self._name(relid, relation)
        if name is None:
            # pgoutput always describes a relation first; if it did not, trust nothing.
            self._reasons.append(f"a change to relation {relid}, which the stream never described")
            return None
        self._tables.add(name)
        return name

    def _row_keys(self, table: str, row: RowChange) -> None:
        if self._keys.whole(table):
            return
        if row.relation is not None:  # test_decoding: read from the line
            self._keys.add(table, row.keys, row.relation if row.needs_identity else None)
            return
        rel = self.relations[row.relid]
        keys = pgoutput_row(row.kind, rel.columns, rel.key_flags, rel.integers, row.old_kind, row.old, row.new)
        self._keys.add(table, keys)

"""Proving, for test_decoding, that an UPDATE without `old-key:` left its key column unchanged.

PostgreSQL logs an UPDATE's old key only when a column of the table's replica identity
changed (or always, with REPLICA IDENTITY FULL). So the missing old key proves the key
column unchanged only if that column was part of the identity *when the row was written*.
pgoutput says so in the stream (its Relation message, as of the change); test_decoding does
not, and the catalog read by the feed on another connection is of another moment: a DDL
between that read and the row (`REPLICA IDENTITY NOTHING`, a new primary key) would make a
precise bump miss the old key's point reads, and the DDL itself is caught only a poll later.

So a decision never rests on one catalog read. For each relation the feed keeps what it last
read (`Known`: a fingerprint, the identity's columns, and `pg_current_wal_insert_lsn()` of
the same statement). When a batch of changes needs it, the feed reads again (after those
changes arrived, so after they committed) and a change is precise only when

* an earlier read came before the change: its LSN is below the change's commit LSN (the
  insert position is past every record inserted before the read, so a commit ending after
  it was inserted after the read's snapshot), and
* the fingerprint did not move between the two reads (the book keeps the earliest read of
  the fingerprint it still sees, so a change that committed while a read was on its way is
  proven by the next one): nothing that decides the identity
  changed in between (whatever changed it and then changed it back still moved it, see
  below), so the identity at the change was the one both reads saw.

The fingerprint is the table's pg_class row (oid, xmin, relreplident) and the identity
index's pg_index row (oid, xmin) with its columns' names: `ALTER TABLE … REPLICA IDENTITY`
rewrites the pg_class row (a new xmin), a new primary key or identity index is a new pg_index
row, a dropped and re-created table a new oid, a renamed column a new name. Identity `d`
means the primary key's index, `i` the index marked `indisreplident`; `f` always logs the old
row (a missing old key is then unexplained) and `n` never does: neither proves anything.

The first change of a table after the feed starts is therefore bumped whole (there is no
earlier read yet), and so is any change whose proof fails. Each read is one indexed catalog
lookup per relation, on the feed's own catalog connection, once per batch of the stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from neonpoly.freshness.rowkeys import restrict
from neonpoly.freshness.stream import Change, QualifiedName, parse_lsn


@dataclass(frozen=True, slots=True)
class Known:
    fingerprint: str
    columns: frozenset[str]  # the replica identity's columns (empty: none that proves anything)
    lsn: int  # pg_current_wal_insert_lsn() of the read


def _text(value: str) -> str:
    """A string as SQL that means the same under any standard_conforming_strings."""
    return f"pg_catalog.convert_from(pg_catalog.decode('{value.encode().hex()}', 'hex'), 'UTF8')"


def identity_sql(relations: Iterable[QualifiedName]) -> str:
    """One row per (relation, identity column): namespace, name, fingerprint, column (NULL
    when none), the insert LSN."""
    wanted = ", ".join(f"({_text(ns)}, {_text(name)})" for ns, name in sorted(set(relations)))
    return f"""\
SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text,
  pg_catalog.concat_ws(':', c.oid, c.xmin, c.relreplident, x.indexrelid, x.xmin), a.attname::pg_catalog.text,
  pg_catalog.pg_current_wal_insert_lsn()::pg_catalog.text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
LEFT JOIN pg_catalog.pg_index x ON x.indrelid OPERATOR(pg_catalog.=) c.oid
  AND ((c.relreplident OPERATOR(pg_catalog.=) 'd' AND x.indisprimary)
       OR (c.relreplident OPERATOR(pg_catalog.=) 'i' AND x.indisreplident))
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
  AND a.attnum OPERATOR(pg_catalog.=) ANY (x.indkey::pg_catalog.int2[]) AND a.attnum OPERATOR(pg_catalog.>) 0
WHERE (n.nspname::pg_catalog.text, c.relname::pg_catalog.text) IN ({wanted})
/* neonpoly: change feed replica identity */"""


def parse_rows(rows: Iterable[tuple[str | None, ...]]) -> dict[QualifiedName, Known]:
    found: dict[QualifiedName, tuple[str, set[str], int]] = {}
    for ns, name, fingerprint, column, lsn in rows:
        if ns is None or name is None or fingerprint is None or lsn is None:
            continue
        entry = found.setdefault((ns, name), (fingerprint, set(), parse_lsn(lsn)))
        if column is not None:
            entry[1].add(column)
    return {rel: Known(f, frozenset(cols), lsn) for rel, (f, cols, lsn) in found.items()}


def wanted(changes: Iterable[Change]) -> frozenset[QualifiedName]:
    """The relations whose replica identity these changes need proven."""
    return frozenset(rel for c in changes for rels in c.identity.values() for rel in rels)


class IdentityBook:
    """What the feed last read of each relation's replica identity (one feed, one database)."""

    def __init__(self) -> None:
        self._known: dict[QualifiedName, Known] = {}

    def proven(
        self, relations: Iterable[QualifiedName], commit_lsn: int, now: Mapping[QualifiedName, Known]
    ) -> frozenset[str] | None:
        """The columns proven to be in the identity of every one of `relations` when a
        change that committed at `commit_lsn` was written (None: not proven)."""
        columns: frozenset[str] | None = None
        for relation in relations:
            before = self._known.get(relation)
            after = now.get(relation)
            if before is None or after is None or before.lsn >= commit_lsn or before.fingerprint != after.fingerprint:
                return None
            columns = after.columns if columns is None else columns & after.columns
        return columns or None

    def settle(
        self, changes: Sequence[Change], now: Mapping[QualifiedName, Known], asked: Iterable[QualifiedName]
    ) -> list[Change]:
        """The changes of one batch, in commit order, keeping key values only where proven
        by the read `now` of `asked` (made after they arrived); then remember that read."""
        out: list[Change] = []
        for change in changes:
            if change.identity:
                proven = {t: self.proven(r, change.commit_lsn, now) for t, r in change.identity.items()}
                change = replace(change, rows=restrict(change.rows, proven))
            if change.everything:
                self.forget()  # no decision rests on a read older than a DDL
            out.append(change)
        self.remember(now, asked)
        return out

    def remember(self, now: Mapping[QualifiedName, Known], asked: Iterable[QualifiedName]) -> None:
        """The read of `asked` answered `now` (a relation missing from it is gone)."""
        for relation in asked:
            known = now.get(relation)
            if known is None:
                self._known.pop(relation, None)
                continue
            earlier = self._known.get(relation)
            if earlier is None or earlier.fingerprint != known.fingerprint or earlier.columns != known.columns:
                self._known[relation] = known
            # else keep the earliest read of this fingerprint: every read since saw the same
            # (an identity changed and changed back moves the fingerprint), so a change that
            # committed after it and before the next read is proven too
        if len(self._known) > 16_384:  # a database of ever new tables: forgetting costs one whole bump
            self._known.clear()

    def forget(self) -> None:
        self._known.clear()

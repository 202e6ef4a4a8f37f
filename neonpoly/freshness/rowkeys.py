"""Which key values a committed transaction's row changes touched, per table. No I/O.

The relay confines a point read of `T` to `T@bucket(v)` and bumps `T@bucket(v)` + `T#rows`
for a write confined to key values (cache/keys.py). The feed can do the same for writes made
anywhere, because the replication stream carries the rows' values: the new tuple of an
INSERT or UPDATE, the old key (or whole old row) of a DELETE, and of an UPDATE that changed
the key or of a table with REPLICA IDENTITY FULL. A change of one row can only change the
answers of reads confined to its old or its new key value, and of reads not confined to one
key (which depend on `T#rows`). Whatever the uniqueness of the column: a read `WHERE c = v`
reads exactly the rows whose `c` is `v`, before and after.

So for each row the feed computes `{column: {old value, new value}}` for every column whose
old AND new integer values it knows (`RowKeys`); over a transaction the per-table maps are
intersected (a column is kept only if known for every row of that table, in every schema of
that bare name, since names are bare, see `stream.table_name`). Which column is the key is
not decided here: the caches' sink keeps the table precise only if the column its relation
book says point reads are keyed on (the relay's own catalog answer: `relations.py` 'k' rows,
`RelationBook.key_column`) is among the known ones, and bumps the whole table otherwise.
So a table is precise under the relay's own conditions (one non-generated integer primary
key, an ordinary table without triggers, rules, row security, children or cascades into
itself, the same key column in every schema), although the feed would not need all of them:
what a trigger or a cascade writes comes in the stream as rows of its own.

What "known" means, per decoder:

* pgoutput describes each relation (columns, types, which columns form its replica
  identity) in the stream itself, as of the change, before the first change after any
  redefinition. An INSERT gives every new value. A DELETE gives the old identity columns
  ('K') or the old row ('O'). An UPDATE gives the new row, and the old identity ('K') only
  when an identity column changed, or the old row ('O') with REPLICA IDENTITY FULL; so with
  no old tuple an identity column's old value is its new one. That is exact: the flags are
  the catalog of the moment the row was written.
* test_decoding prints each row as `name[type]:value`. INSERT, DELETE and an UPDATE with
  `old-key:` are exact as above. An UPDATE without `old-key:` says nothing about which
  columns form the identity; the feed asks the catalog and proves the answer held when the
  row was written (`replica_identity.py`); until proven, `needs_identity` and no precision.

Unsure means no entry for the column (so, for the key column, the whole table): a NULL, an
unchanged TOASTed value ('u', `unchanged-toast-datum`), a type other than int2/int4/int8, a
text that is not a plain integer, a missing old tuple where one is needed. Past
`MAX_KEYS_PER_TABLE` values in one transaction a table goes whole too (a bulk write: one
bump of the table is cheaper than thousands of names, and the feed can skip its rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

RowKeys = dict[str, frozenset[int]]  # column -> the integer values a row (or rows) had in it
TableKeys = Mapping[str, Mapping[str, frozenset[int]]]  # bare table name -> its RowKeys

MAX_KEYS_PER_TABLE = 256
# int2, int4, int8 (pgoutput's type OIDs; a domain over them has its own OID: not a key).
INTEGER_OIDS = frozenset({20, 21, 23})
# test_decoding prints format_type_be's names.
INTEGER_TYPE_NAMES = frozenset({b"smallint", b"integer", b"bigint"})

Tuple = tuple[bytes | None, ...]  # one tuple's text values by column position; None: NULL or unchanged


def integer(text: bytes | None) -> int | None:
    """The integer an int2/int4/int8 output text spells (None: NULL, unchanged or not one):
    an optional minus and 1-19 ASCII digits (bytes.isdigit is ASCII only)."""
    if text is None:
        return None
    digits = text[1:] if text[:1] == b"-" else text
    return int(text) if 0 < len(digits) <= 19 and digits.isdigit() else None


def integer_columns(types: Sequence[int]) -> tuple[int, ...]:
    """The positions of a relation's int2/int4/int8 columns (once per Relation message)."""
    return tuple(i for i, oid in enumerate(types) if oid in INTEGER_OIDS)


def pgoutput_row(
    kind: str,
    names: tuple[str, ...],
    flags: tuple[bool, ...],
    integers: tuple[int, ...],
    old_kind: str,
    old: Tuple | None,
    new: Tuple | None,
) -> RowKeys:
    """The known key values of one pgoutput row change (see the module docstring);
    `integers`: the positions of its integer columns (`integer_columns`)."""
    out: RowKeys = {}
    if len(flags) != len(names):
        return out
    for i in integers:
        name = names[i]
        after = _at(new, i)
        # The old value: from the old tuple ('O': every column; 'K': the identity columns,
        # the others come as NULL), else unchanged if the column is part of the identity.
        before: int | None
        if old is not None and (old_kind == "O" or (old_kind == "K" and flags[i])):
            before = _at(old, i)
        elif old is None and kind == "update" and flags[i]:
            before = after
        else:
            before = None
        if kind == "insert":
            if after is not None:
                out[name] = frozenset((after,))
        elif kind == "delete":
            if before is not None:
                out[name] = frozenset((before,))
        elif before is not None and after is not None:
            out[name] = frozenset((before, after))
    return out


def _at(values: Tuple | None, i: int) -> int | None:
    if values is None or i >= len(values):
        return None
    return integer(values[i])


class KeyAccumulator:
    """One transaction's known key values per bare table name; None once a table is whole."""

    __slots__ = ("identity", "tables")

    def __init__(self) -> None:
        self.tables: dict[str, RowKeys | None] = {}
        # table -> the (namespace, name) relations whose replica identity must be proven
        self.identity: dict[str, set[tuple[str, str]]] = {}

    def clear(self) -> None:
        self.tables.clear()
        self.identity.clear()

    def whole(self, table: str) -> bool:
        return table in self.tables and self.tables[table] is None

    def add(self, table: str, row: RowKeys | None, needs: tuple[str, str] | None = None) -> None:
        """One row of `table`; `row` None: nothing known (the table is whole)."""
        if table in self.tables:
            known = self.tables[table]
            if known is None:
                return
            if row is not None:
                merged = {c: known[c] | row[c] for c in known.keys() & row.keys()}
                row = merged if sum(len(v) for v in merged.values()) <= MAX_KEYS_PER_TABLE else None
        if not row:
            self.tables[table] = None
            self.identity.pop(table, None)
            return
        self.tables[table] = row
        if needs is not None:
            self.identity.setdefault(table, set()).add(needs)

    def result(self) -> tuple[dict[str, RowKeys], dict[str, frozenset[tuple[str, str]]]]:
        rows = {t: dict(k) for t, k in self.tables.items() if k}
        identity = {t: frozenset(r) for t, r in self.identity.items() if t in rows}
        return rows, identity


def restrict(rows: TableKeys, allowed: Mapping[str, Iterable[str] | None]) -> dict[str, RowKeys]:
    """`rows` keeping, for each table in `allowed`, only the columns allowed (None: none)."""
    out: dict[str, RowKeys] = {}
    for table, keys in rows.items():
        if table in allowed:
            columns = allowed[table]
            kept = {} if columns is None else {c: keys[c] for c in columns if c in keys}
            if kept:
                out[table] = kept
        else:
            out[table] = dict(keys)
    return out

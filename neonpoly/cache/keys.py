"""Primary-key precision: which rows a statement provably reads or writes, by key value.

Table generations (invalidation.py) make a write to a table stale every entry that read it.
Under a read/write mix of point lookups (`SELECT … WHERE id = $1` and `UPDATE … WHERE id = $1`)
that evicts everything on every write. A single-row write identified by its primary key can
only change the answers of reads of that key, and of reads that are not confined to one key.
That is modelled with extra generation names, so stamps, persistence and anything that
publishes bumped names need nothing new:

* a *point read* (one table, a top-level AND conjunct `pk = constant or parameter`, nothing
  else it could read) depends on `T` and `T@bucket(v)`;
* every other read of `T` depends on `T` and `T#rows`;
* a *keyed write* (UPDATE/DELETE with such a conjunct, not changing the key; INSERT of VALUES
  rows giving the key) bumps `T@bucket(v)` for each key and `T#rows`;
* every other write bumps `T`, which both kinds of read depend on.

The origin's change feed reports writes made anywhere with the key values its rows carried
(freshness/rowkeys.py); `feed_names` turns them into the same names, precise only where the
catalog answer this module's callers use (the relation book's key column) names a column
whose values the feed knows for every changed row.

Buckets are the value modulo a fixed number, so generations stay bounded per table; two keys
in one bucket only evict each other. This module finds the candidate key conjuncts in the
parse tree and decodes bound values; whether the column really is the table's primary key
(a single integer column, the table free of triggers, rules, row security, children and
cascades into itself) is the catalog's answer (relations.py), and the session combines both
(proxy/decisions.py). Whenever any of it is unsure, the statement is treated as before:
precision may cost a hit, never a stale read.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Node = dict[str, Any]

# Buckets per table: generations stay bounded (a few hundred KB per keyed table at worst).
KEY_BUCKETS = 4096
# Types whose equality with an integer value is integer equality, whatever the format:
# unspecified (the server infers the key column's type from `pk = $n`), int8, int2, int4.
INTEGER_PARAM_TYPES = frozenset({0, 20, 21, 23})
# What int2/int4/int8 input accepts that means the same number everywhere (PostgreSQL's own
# whitespace set, a sign, decimal digits). Underscores, 0x prefixes and the like are
# refused: such values fall back to whole-table invalidation.
_INT_TEXT = re.compile(rb"[ \t\n\r\v\f]*([+-]?[0-9]{1,19})[ \t\n\r\v\f]*")
_DIGITS = re.compile(r"-?[0-9]{1,19}")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
# A point read may contain nothing that reads another relation or another row of its own.
_READS_ELSEWHERE = frozenset(
    {
        "SubLink", "RangeSubselect", "RangeFunction", "RangeTableSample", "RangeTableFunc",
        "JoinExpr", "CommonTableExpr", "IntoClause", "LockingClause",
    }
)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """One way a statement is confined to rows of `table` whose `column` holds given values.

    Values come from the text (`literals`) or from bound parameters (`params`, 1-based).
    A statement may have several (`a = 1 AND b = 2`); the catalog says which column is the key.
    """

    write: bool
    table: str
    column: str
    literals: tuple[int, ...] = ()
    params: tuple[int, ...] = ()


def bucket_name(table: str, value: int) -> str:
    return f"{table}@{value % KEY_BUCKETS}"


def rows_name(table: str) -> str:
    return f"{table}#rows"


def read_names(tags: frozenset[str], point: tuple[str, int] | None) -> frozenset[str]:
    """The generation names a read depends on: a point read of `point` = (table, key) when
    it reads that table alone, otherwise every table and its `#rows`."""
    if point is not None and len(tags) == 1 and point[0] in tags:
        memo_key = (point[0], point[1] % KEY_BUCKETS)  # every miss of a point read asks
        names = _POINT_NAMES.get(memo_key)
        if names is None:
            names = frozenset((point[0], bucket_name(point[0], point[1])))
            if len(_POINT_NAMES) >= 4 * KEY_BUCKETS:
                _POINT_NAMES.clear()
            _POINT_NAMES[memo_key] = names
        return names
    found = _READ_NAMES.get(tags)
    if found is None:
        found = tags | frozenset(rows_name(t) for t in tags)
        if len(_READ_NAMES) >= 4096:
            _READ_NAMES.clear()
        _READ_NAMES[tags] = found
    return found


_READ_NAMES: dict[frozenset[str], frozenset[str]] = {}
_POINT_NAMES: dict[tuple[str, int], frozenset[str]] = {}


def write_names(table: str, values: list[int]) -> frozenset[str]:
    """What a keyed write of these key values bumps."""
    return frozenset({rows_name(table), *(bucket_name(table, v) for v in values)})


def write_pairs(table: str, values: list[int]) -> frozenset[tuple[str, str]]:
    """`write_names` as (table, name) pairs, as sessions collect a transaction's keyed writes.
    A write of one key (the common one) is answered from a bounded memo: at most
    KEY_BUCKETS sets per table, made once instead of at every write."""
    if len(values) != 1:
        return frozenset((table, name) for name in write_names(table, values))
    memo_key = (table, values[0] % KEY_BUCKETS)
    found = _WRITE_PAIRS.get(memo_key)
    if found is None:
        found = frozenset((table, name) for name in write_names(table, values))
        if len(_WRITE_PAIRS) >= 4 * KEY_BUCKETS:
            _WRITE_PAIRS.clear()
        _WRITE_PAIRS[memo_key] = found
    return found


_WRITE_PAIRS: dict[tuple[str, int], frozenset[tuple[str, str]]] = {}


def write_pairs_and_names(table: str, values: list[int]) -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
    """`write_pairs` and `write_names` at once, for a session's remembered keyed write
    (proxy/writes.py), which bumps the names and keeps the pairs; memoised as `write_pairs`."""
    if len(values) != 1:
        return write_pairs(table, values), write_names(table, values)
    memo_key = (table, values[0] % KEY_BUCKETS)
    found = _WRITE_BOTH.get(memo_key)
    if found is None:
        names = write_names(table, values)
        found = (frozenset((table, name) for name in names), names)
        if len(_WRITE_BOTH) >= 4 * KEY_BUCKETS:
            _WRITE_BOTH.clear()
        _WRITE_BOTH[memo_key] = found
    return found


_WRITE_BOTH: dict[tuple[str, int], tuple[frozenset[tuple[str, str]], frozenset[str]]] = {}


def feed_names(
    tables: frozenset[str],
    rows: Mapping[str, Mapping[str, frozenset[int]]],
    key_columns: Callable[[str], Iterable[str | None]],
) -> frozenset[str]:
    """What a committed change the feed reports bumps: for a table whose rows' values of its
    key column are known, those keys and `T#rows` (as a keyed write does); otherwise the
    table. `key_columns(t)`: the key column each cache's relation book has for `t` (None:
    unknown or none); precision needs them all to name the same column."""
    out: set[str] = set()
    for table in tables:
        known = rows.get(table)
        if known:
            columns = set(key_columns(table))
            column = columns.pop() if len(columns) == 1 else None
            if column is not None and column in known:
                out |= write_names(table, list(known[column]))
                continue
        out.add(table)
    return frozenset(out)


# -- from the parse tree ---------------------------------------------------------------


def key_refs(kind: str, f: Node) -> tuple[KeyRef, ...]:
    """The candidate key conjuncts of one statement (empty: no precision possible)."""
    try:
        if kind == "SelectStmt":
            return _point_reads(f)
        if kind in ("UpdateStmt", "DeleteStmt"):
            return _keyed_changes(kind, f)
        if kind == "InsertStmt":
            return _keyed_inserts(f)
    except (AttributeError, TypeError, ValueError, KeyError):
        pass  # a tree shape not foreseen: no precision
    return ()


def _point_reads(f: Node) -> tuple[KeyRef, ...]:
    if f.get("withClause") or f.get("intoClause") or f.get("lockingClause") or f.get("valuesLists"):
        return ()
    if f.get("op", "SETOP_NONE") != "SETOP_NONE" or f.get("larg") or f.get("rarg"):
        return ()
    sources = f.get("fromClause") or []
    if len(sources) != 1 or "RangeVar" not in sources[0]:
        return ()
    rv = sources[0]["RangeVar"]
    counts = _Census(f)
    if counts.get("RangeVar") != 1 or any(counts.get(k) for k in _READS_ELSEWHERE):
        return ()
    return _conjunct_refs(False, rv, f.get("whereClause"), counts)


def _keyed_changes(kind: str, f: Node) -> tuple[KeyRef, ...]:
    # FROM/USING could bind the key column's name elsewhere and join rows in; a WITH may write.
    if f.get("withClause") or f.get("fromClause") or f.get("usingClause"):
        return ()
    rv = f.get("relation")
    if not isinstance(rv, dict):
        return ()
    counts = _Census(f)
    refs = _conjunct_refs(True, rv, f.get("whereClause"), counts)
    changed = {str(t.get("ResTarget", {}).get("name", "")) for t in f.get("targetList") or ()}
    # An UPDATE that sets the key moves the row to another key.
    return tuple(r for r in refs if r.column not in changed)


def _keyed_inserts(f: Node) -> tuple[KeyRef, ...]:
    if f.get("withClause"):
        return ()
    # OVERRIDING USER VALUE discards the values given for identity columns: the key written
    # is the sequence's next value, not the one in VALUES. (OVERRIDING SYSTEM VALUE writes
    # the given value, as does a plain INSERT into a BY DEFAULT identity column.)
    if f.get("override", "OVERRIDING_NOT_SET") not in ("OVERRIDING_NOT_SET", "OVERRIDING_SYSTEM_VALUE"):
        return ()
    rv = f.get("relation")
    select = (f.get("selectStmt") or {}).get("SelectStmt")
    cols = [str(c.get("ResTarget", {}).get("name", "")) for c in f.get("cols") or ()]
    if not isinstance(rv, dict) or not isinstance(select, dict) or not cols:
        return ()
    if any(k in select for k in ("fromClause", "whereClause", "withClause", "targetList", "larg", "rarg")):
        return ()
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        return ()
    rows = [item.get("List", {}).get("items") or [] for item in select.get("valuesLists") or ()]
    if not rows or any(len(row) != len(cols) for row in rows):
        return ()
    if any(c.get("ResTarget", {}).get("indirection") for c in f.get("cols") or ()):
        return ()
    conflict = f.get("onConflictClause")
    arbiter: str | None = None
    if conflict:
        action = conflict.get("action")
        if action == "ONCONFLICT_UPDATE":
            # Only a conflict on the key itself updates the row of that key; any other
            # arbiter updates some other row.
            infer = conflict.get("infer") or {}
            elems = [e.get("IndexElem", {}) for e in infer.get("indexElems") or ()]
            if infer.get("conname") or infer.get("whereClause") or len(elems) != 1:
                return ()
            elem = elems[0]
            if set(elem) - {"name", "ordering", "nulls_ordering"} or not elem.get("name"):
                return ()
            arbiter = str(elem["name"])
            changed = {str(t.get("ResTarget", {}).get("name", "")) for t in conflict.get("targetList") or ()}
            if arbiter in changed:
                return ()
        elif action != "ONCONFLICT_NOTHING":
            return ()
    counts = _Census(f)
    out: list[KeyRef] = []
    for i, column in enumerate(cols):
        if cols.count(column) != 1 or (arbiter is not None and column != arbiter):
            continue
        literals: list[int] = []
        params: list[int] = []
        for row in rows:
            if not _value(row[i], counts, literals, params):
                break
        else:
            out.append(KeyRef(True, str(rv.get("relname", "")), column, tuple(literals), tuple(params)))
    return tuple(out)


def _conjunct_refs(write: bool, rv: Node, where: Any, counts: _Census) -> tuple[KeyRef, ...]:
    table = str(rv.get("relname", ""))
    if (rv.get("alias") or {}).get("colnames"):
        # `t AS x(k, aid)` renames t's columns by position: a name in the WHERE clause may
        # be another column's alias, and which column is at which position is not in the text.
        return ()
    alias = (rv.get("alias") or {}).get("aliasname")
    qualifier = str(alias) if alias else table
    out: list[KeyRef] = []
    for conjunct in _conjuncts(where):
        expr = conjunct.get("A_Expr") if isinstance(conjunct, dict) else None
        if not isinstance(expr, dict) or expr.get("kind") != "AEXPR_OP":
            continue
        names = [n.get("String", {}).get("sval") for n in expr.get("name") or ()]
        if names not in (["="], ["pg_catalog", "="]):
            continue
        for col_side, value_side in (("lexpr", "rexpr"), ("rexpr", "lexpr")):
            column = _column(expr.get(col_side), qualifier)
            literals: list[int] = []
            params: list[int] = []
            if column is not None and _value(expr.get(value_side), counts, literals, params):
                out.append(KeyRef(write, table, column, tuple(literals), tuple(params)))
                break
    return tuple(out)


def _conjuncts(where: Any) -> list[Any]:
    if not isinstance(where, dict):
        return []
    boolean = where.get("BoolExpr")
    if isinstance(boolean, dict):
        if boolean.get("boolop") != "AND_EXPR":
            return []
        return [c for arg in boolean.get("args") or () for c in _conjuncts(arg)]
    return [where]


def _column(node: Any, qualifier: str) -> str | None:
    ref = node.get("ColumnRef") if isinstance(node, dict) else None
    if not isinstance(ref, dict):
        return None
    fields = ref.get("fields") or []
    if not all(isinstance(x, dict) and "String" in x for x in fields):
        return None  # t.* and the like
    parts = [str(x["String"].get("sval", "")) for x in fields]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2 and parts[0] == qualifier:
        return parts[1]
    return None


def _value(node: Any, counts: _Census, literals: list[int], params: list[int]) -> bool:
    """An integer constant or a parameter used nowhere else (so its type is the one the key
    column gives it): where the value comes from, appended to `literals` or `params`."""
    if not isinstance(node, dict):
        return False
    const = node.get("A_Const")
    if isinstance(const, dict):
        if "ival" in const:
            literals.append(int((const["ival"] or {}).get("ival", 0)))
            return True
        fval = (const.get("fval") or {}).get("fval")
        if isinstance(fval, str) and _DIGITS.fullmatch(fval):  # beyond int4, still an integer
            literals.append(int(fval))
            return True
        return False  # 1.0, '1', NULL, TRUE: not an integer the text spells exactly
    param = node.get("ParamRef")
    if isinstance(param, dict):
        number = int(param.get("number", 0))
        if number <= 0 or counts.get(f"${number}") != 1:
            return False
        params.append(number)
        return True
    return False


class _Census:
    """How often each node type (and each parameter, as "$n") occurs in a statement, counted
    on first use: a write keyed by literals never needs it (its walk is most of the cost)."""

    __slots__ = ("_counts", "_tree")

    def __init__(self, tree: Any) -> None:
        self._tree = tree
        self._counts: dict[str, int] | None = None

    def get(self, key: str) -> int:
        if self._counts is None:
            self._counts = _census(self._tree)
        return self._counts.get(key, 0)


def _census(tree: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key[:1].isupper() and isinstance(value, dict):
                    counts[key] = counts.get(key, 0) + 1
                    if key == "ParamRef":
                        name = f"${value.get('number', 0)}"
                        counts[name] = counts.get(name, 0) + 1
                elif key == "relation" and isinstance(value, dict) and "relname" in value:
                    counts["RangeVar"] = counts.get("RangeVar", 0) + 1  # a bare target RangeVar
                stack.append(value)
    return counts


# -- from a Bind -------------------------------------------------------------------------


def param_types(raw: bytes) -> tuple[int, ...]:
    """The OIDs of a Parse message's declared parameter types (its bytes after the query)."""
    if len(raw) < 2:
        return ()
    (count,) = _I16.unpack_from(raw, 0)
    if count <= 0 or len(raw) < 2 + 4 * count:
        return ()
    return tuple(_U32.unpack_from(raw, 2 + 4 * i)[0] for i in range(count))


def bound_integers(tail: bytes, numbers: tuple[int, ...], declared: tuple[int, ...]) -> list[int] | None:
    """The integer values bound to parameters `numbers` (1-based) by a Bind (`tail`: its bytes
    after the statement name), or None when any is not provably an integer the server
    compares as such (a NULL, a declared non-integer type, text int input would not read
    the same way, a binary value of another width)."""
    try:
        (nformats,) = _I16.unpack_from(tail, 0)
        pos = 2
        formats = [_I16.unpack_from(tail, pos + 2 * i)[0] for i in range(nformats)]
        pos += 2 * nformats
        (nparams,) = _I16.unpack_from(tail, pos)
        pos += 2
        values: list[bytes | None] = []
        for _ in range(nparams):
            (length,) = _I32.unpack_from(tail, pos)
            pos += 4
            if length < 0:
                values.append(None)
                continue
            if pos + length > len(tail):
                return None
            values.append(tail[pos : pos + length])
            pos += length
    except struct.error:
        return None
    out: list[int] = []
    for number in numbers:
        i = number - 1
        if i >= nparams:
            return None
        oid = declared[i] if i < len(declared) else 0
        if oid not in INTEGER_PARAM_TYPES:
            return None
        fmt = formats[0] if nformats == 1 else formats[i] if nformats > i else 0
        value = values[i]
        if value is None:
            return None
        if fmt == 0:
            match = _INT_TEXT.fullmatch(value)
            if match is None:
                return None
            out.append(int(match.group(1)))
        elif fmt == 1 and len(value) in (2, 4, 8):
            out.append(int.from_bytes(value, "big", signed=True))
        else:
            return None
    return out

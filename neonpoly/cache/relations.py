"""What the relations a query touches really are, as far as staleness goes.

A write names the tables it changes; a read names the relations in its FROM clause. Both
can reach further than they say:

* a read of a view depends on the view's base tables, and a read of a partitioned (or
  inherited) table on every partition;
* a write cascades through foreign keys (ON DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT)
  into other tables, reaches partitions when it names the parent, reaches a view's base
  tables when it names an (automatically) updatable view, and may run triggers or rules
  that write anything at all.

An entry tagged only with the names in the SQL would then survive a write to the tables it
really read: stale data. So the first time a relation is seen, neonpoly asks the origin (in
the client's own idle session; the answer is swallowed) for both closures, and from then on
tags reads with every table they read and widens writes to every table they reach. A write
with triggers or rules, or to a relation not yet looked up, evicts the whole database.
Views over non-immutable functions, and the system catalogs and statistics views (whose
contents change without any write, and whose dependencies PostgreSQL does not record),
are never cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

# Rows: ('r', asked, relation it reads, volatile) and ('w', asked, table a write reaches, opaque).
_LOOKUP = """\
WITH RECURSIVE asked(oid, root) AS (
  SELECT c.oid, c.relname::text FROM pg_catalog.pg_class c WHERE c.relname = ANY ('{{{names}}}'::text[])
), read_edges(parent, child) AS (
  SELECT x.ev_class, d.refobjid FROM pg_catalog.pg_rewrite x
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
   AND d.objid = x.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
   AND d.refobjid <> x.ev_class
  UNION ALL
  SELECT i.inhparent, i.inhrelid FROM pg_catalog.pg_inherits i
), write_edges(parent, child) AS (
  SELECT k.confrelid, k.conrelid FROM pg_catalog.pg_constraint k WHERE k.contype = 'f'
   AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
  UNION ALL
  SELECT parent, child FROM read_edges  -- partitions, and a view's base tables (updatable views)
), r(oid, root) AS (
  SELECT oid, root FROM asked
  UNION
  SELECT e.child, r.root FROM r JOIN read_edges e ON e.parent = r.oid
), w(oid, root) AS (
  SELECT oid, root FROM asked
  UNION
  SELECT e.child, w.root FROM w JOIN write_edges e ON e.parent = w.oid
)
SELECT 'r', r.root, c.relname::text, EXISTS (
  SELECT 1 FROM pg_catalog.pg_rewrite x
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
   AND d.objid = x.oid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
  WHERE x.ev_class = r.oid AND p.provolatile <> 'i')
  OR n.nspname IN ('pg_catalog', 'information_schema')
FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT 'w', w.root, c.relname::text,
  EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = w.oid AND NOT t.tgisinternal)
  OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite x WHERE x.ev_class = w.oid AND x.ev_type <> '1')
FROM w JOIN pg_catalog.pg_class c ON c.oid = w.oid /* neonpoly: relation lookup */"""


@dataclass(frozen=True, slots=True)
class Relation:
    tags: frozenset[str]  # what a read of it depends on: itself, base tables, partitions
    volatile: bool  # built on something that changes without a write
    reach: frozenset[str]  # what a write to it changes: itself, cascades, partitions
    opaque: bool  # a write to it runs triggers or rules: it may change anything


def lookup_sql(names: Iterable[str]) -> str:
    """The catalog query for `names` (all plain identifiers, see `askable`)."""
    return _LOOKUP.format(names=",".join(sorted(set(names))))


def askable(name: str) -> bool:
    """Names we can put in the lookup's array literal without any quoting question."""
    return bool(_PLAIN_NAME.match(name))


class RelationBook:
    """Per cache: what each (database, relation name) was found to be."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], Relation] = {}

    def resolve(self, database: str, names: Iterable[str]) -> tuple[frozenset[str], bool] | None:
        """(tags, volatile) for a query's relations, or None while any of them is unknown."""
        tags: set[str] = set()
        volatile = False
        for name in names:
            rel = self._known.get((database, name))
            if rel is None:
                return None
            tags |= rel.tags
            volatile = volatile or rel.volatile
        return frozenset(tags), volatile

    def reach(self, database: str, names: Iterable[str]) -> frozenset[str] | None:
        """Every table a write to `names` may change, or None: evict the whole database
        (a relation not looked up yet, or one with triggers or rules)."""
        out: set[str] = set()
        for name in names:
            rel = self._known.get((database, name))
            if rel is None or rel.opaque:
                return None
            out |= rel.reach
        return frozenset(out)

    def volatile(self, database: str, names: Iterable[str]) -> bool:
        for name in names:
            rel = self._known.get((database, name))
            if rel is not None and rel.volatile:
                return True
        return False

    def unknown(self, database: str, names: Iterable[str]) -> list[str]:
        return [n for n in names if (database, n) not in self._known]

    def learn(self, database: str, asked: Iterable[str], rows: Iterable[tuple[str, str, str, bool]]) -> None:
        reads: dict[str, tuple[set[str], bool]] = {}
        writes: dict[str, tuple[set[str], bool]] = {}
        for kind, root, relname, flag in rows:
            table = reads if kind == "r" else writes
            names, seen = table.setdefault(root, ({root}, False))
            names.add(relname)
            table[root] = (names, seen or flag)
        for name in asked:
            # Not in the catalog (yet): a plain name; creating it is DDL, which evicts anyway.
            tags, volatile = reads.get(name, ({name}, False))
            reach, opaque = writes.get(name, ({name}, False))
            self._known[(database, name)] = Relation(frozenset(tags), volatile, frozenset(reach), opaque)

    def refuse(self, database: str, names: Iterable[str]) -> None:
        """Relations we could not ask about: never cached, writes to them evict everything."""
        for name in names:
            self._known[(database, name)] = Relation(frozenset({name}), True, frozenset({name}), True)

    def forget(self, database: str | None = None) -> None:
        """DDL may have redefined views, keys or triggers: learn again."""
        if database is None:
            self._known.clear()
        else:
            for key in [k for k in self._known if k[0] == database]:
                del self._known[key]

"""What the relations a query reads really are: plain tables, or views over other tables.

A write names the tables it changes; a read names the relations in its FROM clause. When
one of those is a view, the read depends on the view's base tables, and an entry tagged
only with the view's name would survive a write to them: stale data. So before the first
read of a relation is stored, neonpoly asks the origin (in the client's own session, the
answer swallowed) what the relation is built from, and tags entries with the closure.
Views over non-immutable functions, and the system catalogs and statistics views (whose
contents change without any write, and whose dependencies PostgreSQL does not record),
are never cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

# One row per (relation asked about, relation in its closure, built on a non-immutable function).
_LOOKUP = """\
WITH RECURSIVE r(oid, root) AS (
  SELECT c.oid, c.relname::text FROM pg_catalog.pg_class c WHERE c.relname = ANY ('{{{names}}}'::text[])
  UNION
  SELECT d.refobjid, r.root FROM r
  JOIN pg_catalog.pg_rewrite w ON w.ev_class = r.oid
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
   AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
   AND d.refobjid <> r.oid
)
SELECT r.root, c.relname::text, EXISTS (
  SELECT 1 FROM pg_catalog.pg_rewrite w
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
   AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
  WHERE w.ev_class = r.oid AND p.provolatile <> 'i')
  OR n.nspname IN ('pg_catalog', 'information_schema')
FROM r JOIN pg_catalog.pg_class c ON c.oid = r.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace /* neonpoly: relation lookup */"""


@dataclass(frozen=True, slots=True)
class Relation:
    tags: frozenset[str]  # the relation and every relation it is built from
    volatile: bool  # built on a function whose result can change without a write


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

    def volatile(self, database: str, names: Iterable[str]) -> bool:
        for name in names:
            rel = self._known.get((database, name))
            if rel is not None and rel.volatile:
                return True
        return False

    def unknown(self, database: str, names: Iterable[str]) -> list[str]:
        return [n for n in names if (database, n) not in self._known]

    def learn(self, database: str, asked: Iterable[str], rows: Iterable[tuple[str, str, bool]]) -> None:
        found: dict[str, tuple[set[str], bool]] = {}
        for root, relname, volatile in rows:
            tags, vol = found.setdefault(root, ({root}, False))
            tags.add(relname)
            found[root] = (tags, vol or volatile)
        for name in asked:
            tags, vol = found.get(name, ({name}, False))
            # Not in the catalog (yet): a plain name; creating it is DDL, which evicts anyway.
            self._known[(database, name)] = Relation(frozenset(tags), vol)

    def refuse(self, database: str, names: Iterable[str]) -> None:
        """Relations we could not ask about: treat as never cacheable."""
        for name in names:
            self._known[(database, name)] = Relation(frozenset({name}), True)

    def forget(self, database: str | None = None) -> None:
        """DDL may have redefined views: learn again."""
        if database is None:
            self._known.clear()
        else:
            for key in [k for k in self._known if k[0] == database]:
                del self._known[key]

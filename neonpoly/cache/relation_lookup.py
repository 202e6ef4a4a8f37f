"""The one catalog lookup behind `relations.RelationBook`: what each relation a query names
really is, what reading and writing it reach and run, and (once per database) which builtins
the database's own objects may stand in for. See relations.py for what each row kind means.

Immune to what the client's session can change, since it runs there: every function,
operator and type is qualified with pg_catalog, catalogs are named by their fixed OIDs, and
the names travel as a bound parameter, never as SQL text.
"""

from __future__ import annotations

from collections.abc import Iterable

from neonpoly import pgwire

_CATALOG = "OPERATOR(pg_catalog.=)"
_NOT = "OPERATOR(pg_catalog.<>)"
# An operator class `oc` whose support functions or operators are not written in C (internal
# 12, c 13): the user's code.
_OPCLASS_CODE = f"""(EXISTS (SELECT 1 FROM pg_catalog.pg_amproc ap
  JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} ap.amproc::pg_catalog.oid
  WHERE ap.amprocfamily {_CATALOG} oc.opcfamily AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]))
 OR EXISTS (SELECT 1 FROM pg_catalog.pg_amop ao JOIN pg_catalog.pg_operator o ON o.oid {_CATALOG} ao.amopopr
  JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} o.oprcode::pg_catalog.oid
  WHERE ao.amopfamily {_CATALOG} oc.opcfamily AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[])))"""
# pg_class 1259, pg_rewrite 2618, pg_policy 3256; pg_catalog's namespace is 11.
LOOKUP_SQL = f"""\
WITH RECURSIVE asked(oid, root) AS (
  SELECT c.oid, c.relname::pg_catalog.text FROM pg_catalog.pg_class c
  WHERE c.relname {_CATALOG} ANY ($1::pg_catalog.name[])
), view_edges(parent, child) AS (
  SELECT x.ev_class, d.refobjid FROM pg_catalog.pg_rewrite x
  JOIN pg_catalog.pg_depend d ON d.classid {_CATALOG} 2618::pg_catalog.oid
   AND d.objid {_CATALOG} x.oid AND d.refclassid {_CATALOG} 1259::pg_catalog.oid
   AND d.refobjid {_NOT} x.ev_class
  UNION ALL
  SELECT i.inhparent, i.inhrelid FROM pg_catalog.pg_inherits i
), read_edges(parent, child) AS (
  SELECT parent, child FROM view_edges
  UNION ALL
  SELECT p.polrelid, d.refobjid FROM pg_catalog.pg_policy p
  JOIN pg_catalog.pg_depend d ON d.classid {_CATALOG} 3256::pg_catalog.oid
   AND d.objid {_CATALOG} p.oid AND d.refclassid {_CATALOG} 1259::pg_catalog.oid
   AND d.refobjid {_NOT} p.polrelid
), write_edges(parent, child) AS (
  SELECT k.confrelid, k.conrelid FROM pg_catalog.pg_constraint k WHERE k.contype {_CATALOG} 'f'
   AND (k.confdeltype {_CATALOG} ANY ('{{c,n,d}}'::pg_catalog."char"[])
        OR k.confupdtype {_CATALOG} ANY ('{{c,n,d}}'::pg_catalog."char"[]))
  UNION ALL
  SELECT parent, child FROM view_edges  -- partitions, and a view's base tables (updatable views)
), holds(child, parent) AS (  -- values of type `parent` hold values of type `child`
  SELECT t.typbasetype, t.oid FROM pg_catalog.pg_type t WHERE t.typtype {_CATALOG} 'd'  -- domains
  UNION ALL
  SELECT t.typelem, t.oid FROM pg_catalog.pg_type t WHERE t.typelem {_NOT} 0::pg_catalog.oid  -- arrays
  UNION ALL
  SELECT f.atttypid, t.oid FROM pg_catalog.pg_attribute f  -- composites: their fields
  JOIN pg_catalog.pg_type t ON t.typrelid {_CATALOG} f.attrelid
  WHERE f.attnum OPERATOR(pg_catalog.>) 0 AND NOT f.attisdropped
  UNION ALL
  SELECT g.rngsubtype, g.rngtypid FROM pg_catalog.pg_range g  -- ranges and multiranges: bounds
  UNION ALL
  SELECT g.rngsubtype, g.rngmultitypid FROM pg_catalog.pg_range g
), checked(typ, dom) AS (  -- every type whose values hold a domain with a CHECK (run on input)
  SELECT k.contypid, k.contypid FROM pg_catalog.pg_constraint k
  WHERE k.contype {_CATALOG} 'c' AND k.contypid {_NOT} 0::pg_catalog.oid
  UNION
  SELECT h.parent, c.dom FROM checked c JOIN holds h ON h.child {_CATALOG} c.typ
), r(oid, root) AS (
  SELECT oid, root FROM asked
  UNION
  SELECT e.child, r.root FROM r JOIN read_edges e ON e.parent {_CATALOG} r.oid
), w(oid, root) AS (
  SELECT oid, root FROM asked
  UNION
  SELECT e.child, w.root FROM w JOIN write_edges e ON e.parent {_CATALOG} w.oid
)
SELECT 'r', r.root, c.relname::pg_catalog.text,
  (c.relkind {_CATALOG} ANY ('{{S,f}}'::pg_catalog."char"[])
   OR n.nspname {_CATALOG} ANY ('{{pg_catalog,information_schema,pg_toast}}'::pg_catalog.name[]))::pg_catalog.text,
  CASE WHEN c.relkind {_CATALOG} 'v' THEN pg_catalog.pg_get_viewdef(c.oid) END
FROM r JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} r.oid
JOIN pg_catalog.pg_namespace n ON n.oid {_CATALOG} c.relnamespace
UNION ALL
SELECT 'p', r.root, c.relname::pg_catalog.text, 'false',
  pg_catalog.concat('SELECT ', pg_catalog.pg_get_expr(p.polqual, p.polrelid))
FROM r JOIN pg_catalog.pg_policy p ON p.polrelid {_CATALOG} r.oid
JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} r.oid
WHERE p.polqual IS NOT NULL
UNION ALL
SELECT 'w', w.root, c.relname::pg_catalog.text,
  (c.relkind {_CATALOG} 'f'  -- a foreign table's rows live elsewhere (postgres_fdw: maybe here)
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid {_CATALOG} w.oid AND NOT t.tgisinternal)
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite x WHERE x.ev_class {_CATALOG} w.oid
              AND x.ev_type {_NOT} '1')
   -- an index's operator classes and an exclusion constraint's operators run their support
   -- functions for the rows a write meets: any not in C (internal 12, c 13) is the user's code
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i
              JOIN pg_catalog.pg_opclass oc ON oc.oid {_CATALOG} ANY (i.indclass::pg_catalog.oid[])
              JOIN pg_catalog.pg_amproc ap ON ap.amprocfamily {_CATALOG} oc.opcfamily
              JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} ap.amproc::pg_catalog.oid
              WHERE i.indrelid {_CATALOG} w.oid AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]))
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
              JOIN pg_catalog.pg_operator o ON o.oid {_CATALOG} ANY (k.conexclop)
              JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} o.oprcode::pg_catalog.oid
              WHERE k.conrelid {_CATALOG} w.oid AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]))
   -- a partition key's operator classes (of it or a partitioned table above it) compare every
   -- row routed through it, or checked against its partition's bounds
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_partition_ancestors(w.oid::pg_catalog.regclass) a(relid)
              JOIN pg_catalog.pg_partitioned_table pt ON pt.partrelid {_CATALOG} a.relid::pg_catalog.oid
              JOIN pg_catalog.pg_opclass oc ON oc.oid {_CATALOG} ANY (pt.partclass::pg_catalog.oid[])
              WHERE {_OPCLASS_CODE})
   -- a foreign key's checks compare with the equality of its parent's index's operator class,
   -- on either side: a write to the child looks its parent's row up, one to the parent its children
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
              JOIN pg_catalog.pg_operator o ON o.oid {_CATALOG} ANY (k.conpfeqop)
               OR o.oid {_CATALOG} ANY (k.conppeqop) OR o.oid {_CATALOG} ANY (k.conffeqop)
              JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} o.oprcode::pg_catalog.oid
              WHERE k.contype {_CATALOG} 'f' AND (k.conrelid {_CATALOG} w.oid OR k.confrelid {_CATALOG} w.oid)
               AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]))
  )::pg_catalog.text, NULL
FROM w JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} w.oid
UNION ALL
SELECT 'd', w.root, c.relname::pg_catalog.text, 'false', pg_catalog.concat('SELECT ', x.expr)
FROM w JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} w.oid
JOIN LATERAL (  -- code a write to it runs: defaults, generated columns, checks, policies, indexes
  SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d WHERE d.adrelid {_CATALOG} w.oid
  UNION ALL
  SELECT pg_catalog.pg_get_expr(k.conbin, k.conrelid) FROM pg_catalog.pg_constraint k
  WHERE k.conrelid {_CATALOG} w.oid AND k.contype {_CATALOG} 'c'
  UNION ALL
  SELECT pg_catalog.pg_get_expr(p.polqual, p.polrelid) FROM pg_catalog.pg_policy p
  WHERE p.polrelid {_CATALOG} w.oid AND p.polqual IS NOT NULL
  UNION ALL
  SELECT pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) FROM pg_catalog.pg_policy p
  WHERE p.polrelid {_CATALOG} w.oid AND p.polwithcheck IS NOT NULL
  UNION ALL  -- an index's expressions and predicate are computed for every row written
  SELECT pg_catalog.pg_get_expr(i.indexprs, i.indrelid) FROM pg_catalog.pg_index i
  WHERE i.indrelid {_CATALOG} w.oid AND i.indexprs IS NOT NULL
  UNION ALL
  SELECT pg_catalog.pg_get_expr(i.indpred, i.indrelid) FROM pg_catalog.pg_index i
  WHERE i.indrelid {_CATALOG} w.oid AND i.indpred IS NOT NULL
  UNION ALL  -- extended statistics' expressions: ANALYZE (and VACUUM ANALYZE) computes them
  SELECT pg_catalog.pg_get_expr(s.stxexprs, s.stxrelid) FROM pg_catalog.pg_statistic_ext s
  WHERE s.stxrelid {_CATALOG} w.oid AND s.stxexprs IS NOT NULL
  UNION ALL  -- the key expressions of it and the partitioned tables above it: computed for every
  -- row routed through it, or checked against its partition's bounds when it is named
  SELECT pg_catalog.pg_get_expr(pt.partexprs, pt.partrelid)
  FROM pg_catalog.pg_partition_ancestors(w.oid::pg_catalog.regclass) a(relid)
  JOIN pg_catalog.pg_partitioned_table pt ON pt.partrelid {_CATALOG} a.relid::pg_catalog.oid
  WHERE pt.partexprs IS NOT NULL
) x(expr) ON true
UNION ALL  -- the checks of the domains its columns' values hold (arrays, composites, ranges too)
SELECT 'd', w.root, c.relname::pg_catalog.text, 'false',
  pg_catalog.concat('SELECT ', pg_catalog.pg_get_expr(k.conbin, 0::pg_catalog.oid))
FROM w JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} w.oid
JOIN pg_catalog.pg_attribute a ON a.attrelid {_CATALOG} w.oid
 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
JOIN checked ck ON ck.typ {_CATALOG} a.atttypid
JOIN pg_catalog.pg_constraint k ON k.contypid {_CATALOG} ck.dom AND k.contype {_CATALOG} 'c'
UNION ALL
SELECT 'k', a.root, pg_catalog.concat(pk.typ), (  -- the key a write may be confined to (keys.py)
  c.relkind {_CATALOG} 'r' AND NOT c.relrowsecurity
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent {_CATALOG} c.oid)
  AND NOT EXISTS (SELECT 1 FROM w JOIN write_edges e ON e.parent {_CATALOG} w.oid  -- cascades into itself
                  WHERE w.root {_CATALOG} a.root AND e.child {_CATALOG} c.oid))::pg_catalog.text, pk.col
FROM asked a JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} a.oid
LEFT JOIN LATERAL (
  SELECT att.atttypid::pg_catalog.text, att.attname::pg_catalog.text
  FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_attribute att ON att.attrelid {_CATALOG} k.conrelid
   AND att.attnum {_CATALOG} k.conkey[1]
   AND att.attgenerated {_CATALOG} ''  -- a generated key moves when the columns it is computed from change
  WHERE k.conrelid {_CATALOG} c.oid AND k.contype {_CATALOG} 'p' AND NOT k.condeferrable
   AND pg_catalog.cardinality(k.conkey) {_CATALOG} 1
) pk(typ, col) ON true
UNION ALL  -- an index whose operator class (support functions or operators) is not in C: a read
-- the planner answers by that index runs it for the keys it meets
SELECT 'i', r.root, c.relname::pg_catalog.text, 'false', NULL
FROM r JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} r.oid
WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_index i
              JOIN pg_catalog.pg_opclass oc ON oc.oid {_CATALOG} ANY (i.indclass::pg_catalog.oid[])
              JOIN pg_catalog.pg_amproc ap ON ap.amprocfamily {_CATALOG} oc.opcfamily
              JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} ap.amproc::pg_catalog.oid
              WHERE i.indrelid {_CATALOG} r.oid AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]))
 OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i
            JOIN pg_catalog.pg_opclass oc ON oc.oid {_CATALOG} ANY (i.indclass::pg_catalog.oid[])
            JOIN pg_catalog.pg_amop ao ON ao.amopfamily {_CATALOG} oc.opcfamily
            JOIN pg_catalog.pg_operator o ON o.oid {_CATALOG} ao.amopopr
            JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} o.oprcode::pg_catalog.oid
            WHERE i.indrelid {_CATALOG} r.oid AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]))
 OR EXISTS (SELECT 1 FROM pg_catalog.pg_partitioned_table pt  -- pruning compares by its key's classes
            JOIN pg_catalog.pg_opclass oc ON oc.oid {_CATALOG} ANY (pt.partclass::pg_catalog.oid[])
            WHERE pt.partrelid {_CATALOG} r.oid AND {_OPCLASS_CODE})
UNION ALL  -- its indexes' expressions and predicates: planning folds their calls of constants
SELECT 'j', r.root, c.relname::pg_catalog.text, 'false', pg_catalog.concat('SELECT ', x.expr)
FROM r JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} r.oid
JOIN LATERAL (
  SELECT pg_catalog.pg_get_expr(i.indexprs, i.indrelid) FROM pg_catalog.pg_index i
  WHERE i.indrelid {_CATALOG} r.oid AND i.indexprs IS NOT NULL
  UNION ALL
  SELECT pg_catalog.pg_get_expr(i.indpred, i.indrelid) FROM pg_catalog.pg_index i
  WHERE i.indrelid {_CATALOG} r.oid AND i.indpred IS NOT NULL
  UNION ALL  -- so do its extended statistics' expressions (plancat.c, at every plan of a read)
  SELECT pg_catalog.pg_get_expr(s.stxexprs, s.stxrelid) FROM pg_catalog.pg_statistic_ext s
  WHERE s.stxrelid {_CATALOG} r.oid AND s.stxexprs IS NOT NULL
  UNION ALL  -- and a partitioned table's key expressions (partcache.c, when a session loads it)
  SELECT pg_catalog.pg_get_expr(pt.partexprs, pt.partrelid) FROM pg_catalog.pg_partitioned_table pt
  WHERE pt.partrelid {_CATALOG} r.oid AND pt.partexprs IS NOT NULL
) x(expr) ON true
UNION ALL
SELECT 'u', r.root, c.relname::pg_catalog.text, 'false', NULL  -- what a change feed cannot follow
FROM r JOIN pg_catalog.pg_class c ON c.oid {_CATALOG} r.oid
WHERE c.relpersistence {_NOT} 'p' OR c.relkind {_NOT} ALL ('{{r,p,v}}'::pg_catalog."char"[])
UNION ALL  -- the types whose values hold a domain's CHECK, with it: a view or policy making one runs it
SELECT 'c', '*', pg_catalog.concat('type ', t.typname), 'false',
  pg_catalog.concat('SELECT ', pg_catalog.pg_get_expr(k.conbin, 0::pg_catalog.oid))
FROM checked ck JOIN pg_catalog.pg_type t ON t.oid {_CATALOG} ck.typ
JOIN pg_catalog.pg_constraint k ON k.contypid {_CATALOG} ck.dom AND k.contype {_CATALOG} 'c'
WHERE $2::pg_catalog.bool
UNION ALL  -- the rivals and the types above were listed (even when there are none)
SELECT 'x', '*', '', 'false', NULL WHERE $2::pg_catalog.bool
UNION ALL
SELECT 's', '*', pg_catalog.concat('cast ', t.typname), 'false', NULL
FROM pg_catalog.pg_cast k JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} k.castfunc
JOIN pg_catalog.pg_type t ON t.oid {_CATALOG} k.casttarget
WHERE $2::pg_catalog.bool AND p.pronamespace {_NOT} 11::pg_catalog.oid
UNION ALL  -- a type's cast to json, which the json builders call for it (json.c), in SQL or plpgsql
SELECT 's', '*', 'json cast', 'false', NULL
FROM pg_catalog.pg_cast k JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} k.castfunc
WHERE $2::pg_catalog.bool AND k.casttarget {_CATALOG} ANY ('{{114,3802}}'::pg_catalog.oid[])
 AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]) AND p.pronamespace {_NOT} 11::pg_catalog.oid
UNION ALL  -- a default operator class a sort, a grouping or DISTINCT uses with no operator named
SELECT 's', '*', 'operator class', 'false', NULL
FROM pg_catalog.pg_opclass oc
JOIN pg_catalog.pg_amproc ap ON ap.amprocfamily {_CATALOG} oc.opcfamily
JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} ap.amproc::pg_catalog.oid
WHERE $2::pg_catalog.bool AND oc.opcdefault AND p.pronamespace {_NOT} 11::pg_catalog.oid
 AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[])
UNION ALL
SELECT 's', '*', 'operator class', 'false', NULL
FROM pg_catalog.pg_opclass oc
JOIN pg_catalog.pg_amop ao ON ao.amopfamily {_CATALOG} oc.opcfamily
JOIN pg_catalog.pg_operator o ON o.oid {_CATALOG} ao.amopopr
JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} o.oprcode::pg_catalog.oid
WHERE $2::pg_catalog.bool AND oc.opcdefault AND p.pronamespace {_NOT} 11::pg_catalog.oid
 AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[])
UNION ALL  -- a range type compares its bounds with the operator class it names, default or not,
-- and calls its canonical and subtype_diff functions: a sort, DISTINCT or `@>` of a range runs them
SELECT 's', '*', 'operator class', 'false', NULL
FROM pg_catalog.pg_range g
JOIN pg_catalog.pg_opclass oc ON oc.oid {_CATALOG} g.rngsubopc
JOIN pg_catalog.pg_amproc ap ON ap.amprocfamily {_CATALOG} oc.opcfamily
JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} ANY (ARRAY[ap.amproc::pg_catalog.oid, g.rngcanonical::pg_catalog.oid,
 g.rngsubdiff::pg_catalog.oid])
WHERE $2::pg_catalog.bool AND p.pronamespace {_NOT} 11::pg_catalog.oid
 AND p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[])
UNION ALL
SELECT 's', '*', 'implicit cast', 'false', NULL
FROM pg_catalog.pg_cast k JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} k.castfunc
WHERE $2::pg_catalog.bool AND p.pronamespace {_NOT} 11::pg_catalog.oid
 AND k.castcontext {_NOT} 'e'
UNION ALL
SELECT 's', ns.schema, s.name, 'false', NULL FROM (
  SELECT p.pronamespace, pg_catalog.concat(p.proname, '()') FROM pg_catalog.pg_proc p
  WHERE $2::pg_catalog.bool AND p.pronamespace {_NOT} 11::pg_catalog.oid
   AND (p.provolatile {_NOT} 'i' OR p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]) OR NOT EXISTS (
     SELECT 1 FROM pg_catalog.unnest(p.proargtypes::pg_catalog.oid[]) a(oid)
     JOIN pg_catalog.pg_type t ON t.oid {_CATALOG} a.oid
     WHERE t.typnamespace {_NOT} 11::pg_catalog.oid AND t.typtype {_NOT} 'd'))  -- a domain is its base type
  UNION
  SELECT o.oprnamespace, pg_catalog.concat('operator ', o.oprname) FROM pg_catalog.pg_operator o
  JOIN pg_catalog.pg_proc p ON p.oid {_CATALOG} o.oprcode::pg_catalog.oid
  WHERE $2::pg_catalog.bool AND o.oprnamespace {_NOT} 11::pg_catalog.oid
   AND (p.provolatile {_NOT} 'i' OR p.prolang {_NOT} ALL ('{{12,13}}'::pg_catalog.oid[]) OR NOT EXISTS (
     SELECT 1 FROM pg_catalog.pg_type t WHERE t.oid {_CATALOG} ANY (ARRAY[o.oprleft, o.oprright])
     AND t.typnamespace {_NOT} 11::pg_catalog.oid AND t.typtype {_NOT} 'd'))
  UNION
  SELECT t.typnamespace, pg_catalog.concat('type ', t.typname) FROM pg_catalog.pg_type t
  WHERE $2::pg_catalog.bool AND t.typnamespace {_NOT} 11::pg_catalog.oid AND (t.typrelid {_CATALOG} 0::pg_catalog.oid
   OR t.oid {_CATALOG} ANY (SELECT typ FROM checked)  -- a table's row type: a cast to it runs its domains' checks
   OR t.typnamespace {_CATALOG} ANY (SELECT n.oid FROM pg_catalog.pg_namespace n  -- a temporary table's row type
     WHERE pg_catalog.left(n.nspname::pg_catalog.text, 7) {_CATALOG} 'pg_temp'))
-- A session's temporary schema comes first on its path for types (never for functions and
-- operators): its types are the rivals of the schema "pg_temp", on the path of every session
-- with temporary objects (identity.py), since which session owns which does not matter here.
) s(nsp, name) JOIN LATERAL (SELECT CASE WHEN pg_catalog.left(n.nspname::pg_catalog.text, 7) {_CATALOG} 'pg_temp'
  THEN 'pg_temp' ELSE n.nspname::pg_catalog.text END AS schema FROM pg_catalog.pg_namespace n
  WHERE n.oid {_CATALOG} s.nsp AND pg_catalog.left(n.nspname::pg_catalog.text, 13) {_NOT} 'pg_toast_temp'
  AND (pg_catalog.left(n.nspname::pg_catalog.text, 7) {_NOT} 'pg_temp' OR pg_catalog.left(s.name, 5) {_CATALOG} 'type ')
) ns ON true
/* neonpoly: relation lookup */"""


def lookup_params(names: Iterable[str], with_shadows: bool) -> list[str]:
    """The lookup's two parameters, in text format: the names as an array, and whether to
    list the database's rivals of builtins."""
    return [pgwire.text_array(sorted(set(names))), "true" if with_shadows else "false"]

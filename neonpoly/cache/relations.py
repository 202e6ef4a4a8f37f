"""What the relations a query touches really are, as the server's catalogs say.

A write names the tables it changes; a read names the relations in its FROM clause. Both can
reach further than they say:

* a read of a view depends on the view's base tables, of a partitioned (or inherited) table on
  every partition, and of a table with row-level security on whatever its policies read;
* a view's definition or a policy may call the clock or code of the user's (which may write
  anything or change the session): such relations are never cached, and reading one is
  treated like calling unknown code;
* a sequence, a foreign table and the system catalogs change without any write neonpoly sees;
* a write cascades through foreign keys (ON DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT),
  reaches partitions when it names the parent, reaches a view's base tables when it names an
  updatable view, and may run triggers or rules that write anything at all, or code of the
  user's that may write or SET: in the definition of a view it is written through (the
  rewriter adds its quals), in defaults, checks, policies, the CHECKs of domains its values
  hold (in arrays, composites, ranges), index expressions and predicates, partition keys
  (a row's partition is computed, or checked when a partition is named), and the support
  functions of its indexes' operator classes and exclusion operators; a write to a
  foreign table writes wherever its server points (postgres_fdw: maybe a table of this very
  origin, in this or another database);
* a builtin trusted by name (`lower()`, `=`, `text`) in a client's query is the builtin only
  if no function, operator or type of that name that could be picked instead lives in a schema
  on that session's search_path (one declared IMMUTABLE over types of its own, such as an
  extension's `=` for its type, cannot be picked for builtin types). View definitions and
  policies are bound to OIDs when created, and `pg_get_viewdef` qualifies any name that would
  resolve differently, so their names are taken as printed.

The origin's change feed (freshness/) sees changes only of tables in the WAL's logical
stream: an unlogged or temporary table, a materialized view (pgoutput publishes none), a
foreign table never appear there. Each lookup also lists the relations a read reaches that
are not ordinary or partitioned permanent tables (or views over them), so the TTL policy
lengthens TTLs under a live feed only for reads it follows (`RelationBook.followed`).

So the first time a relation is seen, neonpoly asks the origin (in the client's own idle
session; the answer is swallowed) and from then on tags reads with every table they read and
widens writes to every table they reach. View definitions and policy expressions come back as
SQL (`pg_get_viewdef`, `pg_get_expr`) and are judged by the same classifier as the client's
queries. The lookup itself (relation_lookup.py) is immune to what the client's session can
change: every function, operator and type in it is qualified with pg_catalog, catalogs are
named by their fixed OIDs, and the names travel as a bound parameter, never as SQL text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from neonpoly.cache.policy import Classification, classify

# Relations remembered per cache; past this the book starts over (a stream of queries naming
# ever new relations must not grow it). Forgetting is safe: a relation not known is looked
# up again, and a write to it evicts its database meanwhile.
MAX_RELATIONS = 16_384


@dataclass(frozen=True, slots=True)
class Relation:
    tags: frozenset[str]  # what a read of it depends on: itself, base tables, partitions, policies
    volatile: str | None  # why it changes without a write neonpoly sees (never cached)
    runs_code: str | None  # why reading it may run the user's code (it may write or SET)
    settings: frozenset[str]  # read by its view definition or policies (current_setting)
    reach: frozenset[str]  # what a write to it changes: itself, cascades, partitions
    opaque: bool  # a write to it runs triggers or rules: it may change anything
    # Its single-column integer primary key, when a write naming one key value changes only
    # that row (keys.py): an ordinary table without row security, children or cascades into
    # itself, a key that is not a generated column, and so is every relation of that name.
    # None: no key precision.
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the catalog says about one query's relations and builtins."""

    tags: frozenset[str]
    volatile: str | None
    runs_code: str | None
    settings: frozenset[str] = frozenset()  # current_setting() names its definitions read


class RelationBook:
    """Per cache: what each (database, relation name) was found to be, and which builtin
    names each database shadows with objects of its own."""

    def __init__(self, max_relations: int = MAX_RELATIONS) -> None:
        self.max_relations = max_relations  # a parameter so a test proves the bound with a few
        self._known: dict[tuple[str, str], Relation] = {}
        # database -> builtin name ("lower()", "operator =") -> schemas holding a rival
        self._shadowed: dict[str, dict[str, frozenset[str]]] = {}
        # database -> "type X" labels of the types whose values hold a domain whose CHECK runs
        # code of the user's: a view or policy making one (a cast) runs that code. Learned with
        # the shadows; None (absent): not known, any type a definition names may be one.
        self._code_types: dict[str, frozenset[str]] = {}
        # database -> relation name -> whether the change feed follows every relation a read
        # of it reaches (its own name as a base table or partition, or as the name read).
        self._followed: dict[str, dict[str, bool]] = {}
        self._followed_memo: dict[frozenset[str], bool] = {}  # asked at every TTL decision
        # Every request asks, hits included: answers are kept until the book learns or forgets.
        self._resolved: dict[tuple[str, frozenset[str], frozenset[str], frozenset[str] | None], Resolution] = {}
        # Moves whenever anything the book answers may have changed (learn, refuse, forget):
        # a session's write memo (proxy/writes.py) holds answers only while it stands still.
        self.version = 0

    def knows_shadows(self, database: str) -> bool:
        return database in self._shadowed

    def knows_code_types(self, database: str) -> bool:
        """False after a lookup that failed (`refuse`): the next one lists them again."""
        return database in self._code_types

    def resolve(
        self,
        database: str,
        names: Iterable[str],
        trusted: Iterable[str] = (),
        schemas: frozenset[str] | None = None,
    ) -> Resolution | None:
        """Tags and verdicts for a query's relations and the builtins it trusts by name (in a
        session whose search_path holds `schemas`; None: any schema), or None while any of
        them is unknown (ask the origin first)."""
        if not isinstance(names, frozenset):
            names = frozenset(names)
        if not isinstance(trusted, frozenset):
            trusted = frozenset(trusted)
        memo_key = (database, names, trusted, schemas)
        found = self._resolved.get(memo_key)
        if found is not None:
            return found
        shadowed = self._shadowed.get(database)
        if shadowed is None:
            return None
        tags: set[str] = set()
        settings: set[str] = set()
        volatile: str | None = None
        runs_code: str | None = None
        for name in names:
            rel = self._known.get((database, name))
            if rel is None:
                return None
            tags |= rel.tags
            settings |= rel.settings
            volatile = volatile or rel.volatile
            runs_code = runs_code or rel.runs_code
        if runs_code is None and shadowed:
            for label in sorted(trusted):
                rivals = shadowed.get(label)
                if rivals and (
                    schemas is None or "*" in rivals or not rivals.isdisjoint(schemas)
                    or any("\x01" in r for r in rivals)
                ):
                    runs_code = f"{label} may resolve to an object of the user's on the search_path"
                    break
        found = Resolution(frozenset(tags), volatile, runs_code, frozenset(settings))
        if len(self._resolved) >= 4096:
            self._resolved.clear()
        self._resolved[memo_key] = found
        return found

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

    def followed(self, names: Iterable[str]) -> bool:
        """True when every name was looked up (in some database) and, in every database
        that knows it, reading it reaches only tables the origin's logical replication
        stream carries (see the module docstring). Names as the cache tags entries."""
        if not isinstance(names, frozenset):
            names = frozenset(names)
        memo = self._followed_memo.get(names)
        if memo is None:
            if len(self._followed_memo) >= 4096:
                self._followed_memo.clear()
            memo = self._followed_memo[names] = all(self._followed_one(name) for name in names)
        return memo

    def _followed_one(self, name: str) -> bool:
        found = False
        for seen in self._followed.values():
            state = seen.get(name)
            if state is False:
                return False
            found = found or state is not None
        return found

    def key_column(self, database: str, name: str) -> str | None:
        """The column whose value confines reads and writes of `name` to one row (None: none)."""
        rel = self._known.get((database, name))
        return None if rel is None or rel.opaque else rel.key

    def unknown(self, database: str, names: Iterable[str]) -> list[str]:
        return [n for n in names if (database, n) not in self._known]

    def learn(
        self, database: str, asked: Iterable[str], rows: Iterable[tuple[str, str, str, bool, str | None]]
    ) -> None:
        self.version += 1
        self._resolved.clear()
        self._followed_memo.clear()
        self._bound()
        reads: dict[str, tuple[set[str], bool]] = {}
        writes: dict[str, tuple[set[str], bool]] = {}
        code: dict[str, list[str]] = {}
        write_code: dict[str, list[str]] = {}
        shadows: dict[str, set[str]] = {}
        code_types: set[str] = set()
        listed = False  # this lookup listed the rivals and code types (relation_lookup.py)
        keyed: dict[str, list[tuple[bool, str, str | None]]] = {}
        index_code: dict[str, str] = {}  # root -> a relation it reads with an index running user code
        index_sql: dict[str, list[tuple[str, str]]] = {}  # root -> (relation, an index's expression)
        followed = self._followed.setdefault(database, {})
        unfollowed_roots: set[str] = set()
        for kind, root, relname, flag, definition in rows:
            if kind == "u":
                followed[relname] = False
                unfollowed_roots.add(root)
                continue
            if kind == "r":
                followed.setdefault(relname, True)
            if kind == "k":
                keyed.setdefault(root, []).append((flag, relname, definition))
                continue
            if kind == "i":
                index_code.setdefault(root, relname)
                continue
            if kind == "j":
                index_sql.setdefault(root, []).append((relname, definition or ""))
                continue
            if kind == "s":
                shadows.setdefault(relname, set()).add(root)
                continue
            if kind == "c":
                if _runs_code(definition or "", frozenset()):
                    code_types.add(relname)
                continue
            if kind == "x":
                listed = True
                continue
            if kind == "d":
                write_code.setdefault(root, []).append(definition or "")
                continue
            if kind == "p" or definition is not None:
                code.setdefault(root, []).append(definition or "")
                if kind == "p":
                    continue
            table = reads if kind == "r" else writes
            names, seen = table.setdefault(root, ({root}, False))
            names.add(relname)
            table[root] = (names, seen or flag)
        if listed or shadows or not self.knows_shadows(database):
            self._shadowed[database] = {label: frozenset(schemas) for label, schemas in shadows.items()}
            self._code_types[database] = frozenset(code_types)
        known_code_types = self._code_types.get(database)
        rivals = _definition_rivals(self._shadowed.get(database))
        for root, exprs in index_sql.items():
            for relname, sql in exprs:
                if root not in index_code and _runs_code(sql, known_code_types, rivals):
                    index_code[root] = relname
        for name in asked:
            # Not in the catalog (yet): a plain name; creating it is DDL, which evicts anyway.
            tags, volatile = reads.get(name, ({name}, False))
            reach, opaque = writes.get(name, ({name}, False))
            # A write reaching a system catalog (an updatable view over pg_description) is DDL
            # by hand, as one naming it is (statements.py): trusted builtins read catalogs. A
            # view's dependency on a catalog is not recorded (pinned objects have none), so its
            # definition is read for one.
            opaque = opaque or any(n.startswith("pg_") for n in reach) or _reads_a_catalog(code.get(name, ()))
            # A default, check, policy or domain that runs code of the user's (or SETs):
            # a write to it may change anything.
            opaque = opaque or any(_runs_code(sql, known_code_types, rivals) for sql in write_code.get(name, ()))
            why_volatile = _changes_unseen(name) if volatile else None
            runs_code, settings, clock = _judge_definitions(name, code.get(name, ()), known_code_types, rivals)
            if runs_code is None and name in index_code:
                owner = index_code[name]
                runs_code = (f"reading {name} may run code: an index, extended statistics or partition key of "
                             f"{owner} calls code of the user's")  # fmt: skip
            # A write runs what a read of it runs: the rewriter adds an updatable view's quals
            # (and RETURNING its select list) to a write through it, and a policy's subquery
            # reads what it names. Code there may write anything or SET.
            opaque = opaque or runs_code is not None
            self._known[(database, name)] = Relation(
                frozenset(tags), why_volatile or clock, runs_code, settings, frozenset(reach), opaque,
                _key_column(keyed.get(name, ())),
            )
            if name in unfollowed_roots or name not in followed:
                followed[name] = False

    def refuse(self, database: str, names: Iterable[str]) -> None:
        """Relations we could not ask about: never cached, reads and writes evict everything."""
        self.version += 1
        self._resolved.clear()
        self._followed_memo.clear()
        self._bound()
        followed = self._followed.setdefault(database, {})
        for name in names:
            followed[name] = False
            why = f"neonpoly could not look up {name}"
            self._known[(database, name)] = Relation(frozenset({name}), why, why, frozenset(), frozenset({name}), True)
        self._shadowed.setdefault(database, {})

    def _bound(self) -> None:
        if len(self._known) >= self.max_relations:
            self._known.clear()
            self._followed.clear()

    def known_relations(self) -> int:
        return len(self._known)

    def forget(self, database: str | None = None) -> None:
        """DDL may have redefined views, keys, triggers, policies or functions: learn again."""
        self.version += 1
        self._resolved.clear()
        self._followed_memo.clear()
        if database is None:
            self._known.clear()
            self._shadowed.clear()
            self._code_types.clear()
            self._followed.clear()
        else:
            self._followed.pop(database, None)
            for key in [k for k in self._known if k[0] == database]:
                del self._known[key]
            self._shadowed.pop(database, None)
            self._code_types.pop(database, None)


# int8, int2, int4: equality is integer equality, whatever the format or collation.
_INTEGER_TYPES = frozenset({"20", "21", "23"})


def _key_column(found: Iterable[tuple[bool, str, str | None]]) -> str | None:
    """The key column, if every relation of this name has the same eligible one (names are
    bare: a write to a.t and a read of b.t share generations)."""
    columns = {col if eligible and typ in _INTEGER_TYPES else None for eligible, typ, col in found}
    if len(columns) != 1:
        return None
    return columns.pop()


def _runs_code(sql: str, code_types: frozenset[str] | None, rivals: frozenset[str] | None = frozenset()) -> bool:
    info = classify(sql)
    if info.is_write or info.invalidate_all or info.changes_session:
        return True
    return _makes_code_type(info, code_types) is not None or _trusts_a_rival(info, rivals)


def _definition_rivals(shadowed: dict[str, frozenset[str]] | None) -> frozenset[str] | None:
    """The builtin names a definition (a view's, a policy's, a default's) must not trust: a
    function or operator of that name is the user's somewhere in the database, a cast to json
    or a default operator class is (names are printed as they resolve in the lookup's session:
    a bare `upper(m)` may be the user's upper(their type)). Casts and types keep their own
    judgement (`_makes_code_type`). None: not known, every such name may be one."""
    if shadowed is None:
        return None
    return frozenset(label for label in shadowed if _rivalled(label))


def _trusts_a_rival(info: Classification, rivals: frozenset[str] | None) -> bool:
    if rivals is None:
        return any(_rivalled(label) for label in info.shadowable)
    return not rivals.isdisjoint(info.shadowable)


def _rivalled(label: str) -> bool:
    return label.endswith("()") or label.startswith("operator ") or label == "json cast"


def _makes_code_type(info: Classification, code_types: frozenset[str] | None) -> str | None:
    """A type the definition makes values of (a cast) whose domain CHECK runs code of the
    user's (its name as printed: definitions are bound to OIDs, so no rival can stand in for
    it); with `code_types` unknown, any type it names may be one."""
    for label in sorted(info.shadowable):
        if label.startswith("type ") and (code_types is None or label in code_types):
            return label
    return None


def _judge_definitions(
    name: str,
    definitions: Iterable[str],
    code_types: frozenset[str] | None = frozenset(),
    rivals: frozenset[str] | None = frozenset(),
) -> tuple[str | None, frozenset[str], str | None]:
    """(runs_code, settings read, volatile) for the view definitions and policies of a
    relation, judged by the classifier that judges client queries."""
    runs_code: str | None = None
    volatile: str | None = None
    settings: set[str] = set()
    for sql in definitions:
        info = classify(sql)
        settings |= info.settings_read
        if info.invalidate_all or info.changes_session or info.is_write:
            runs_code = runs_code or f"reading {name} runs code: {info.reason}"
        elif made := _makes_code_type(info, code_types):
            runs_code = runs_code or f"reading {name} runs code: it makes {made}, whose domain CHECK runs code"
        elif _trusts_a_rival(info, rivals):
            runs_code = runs_code or f"reading {name} runs code: its definition names a builtin the user has a rival of"
        elif not info.cacheable:
            volatile = volatile or f"{name} is defined with something that changes without writes: {info.reason}"
    return runs_code, frozenset(settings), volatile


def _reads_a_catalog(definitions: Iterable[str]) -> bool:
    """A view definition or policy that reads a relation named pg_… (a catalog, maybe)."""
    return any(t.rpartition(".")[2].startswith("pg_") for sql in definitions for t in classify(sql).tables_read)


def _changes_unseen(name: str) -> str:
    """Why a read of a relation that changes without writes neonpoly sees is not cached."""
    if name.partition(".")[0] in ("pg_catalog", "information_schema", "pg_toast") or name.startswith("pg_"):
        return f"reads the system catalog {name}, which changes without writes neonpoly sees"
    return f"reads {name}, a sequence or foreign table, which changes without writes neonpoly sees"

"""What one query or DML statement reads, writes and calls, from PostgreSQL's own parse tree.

The tree comes from libpg_query (through pglast): the server's own grammar and lexer, so
statement boundaries, quoting, comments, dollar quotes, CTE scoping and the functions that
syntax turns into (``EXTRACT``, ``AT TIME ZONE`` …) are what the server will see, not a
guess. The tree is pglast's JSON form: nodes are ``{"NodeType": {fields}}``; fields typed as
one specific struct (a statement's target ``relation``, a cast's ``typeName``) are bare.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pglast import parser as _pg

from neonpoly.cache import keys
from neonpoly.cache.classification import Status, Verdict
from neonpoly.cache.volatility import JSON_BUILDERS, RELOADS_SETTINGS, UNKNOWN_VOLATILITY, call_reason

Node = dict[str, Any]

_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# Builtin types whose input never reads the clock: a cast of run-time text to any other type
# (a date, a range or array of them, a composite or domain that may hold one) may meet 'now'.
_CLOCK_FREE_TYPES = frozenset(
    {
        "int2", "int4", "int8", "smallint", "integer", "int", "bigint", "numeric", "decimal",
        "float4", "float8", "real", "double precision", "text", "varchar", "bpchar", "char",
        "name", "bool", "boolean", "uuid", "json", "jsonb", "bytea", "oid", "regclass",
        "regtype", "regproc", "regprocedure", "interval", "inet", "cidr", "macaddr", "macaddr8",
        "money", "bit", "varbit", "xml", "tsvector", "tsquery", "int4range", "int8range",
        "numrange", "citext",
    }
)
# Datetime input reads the clock for these words, wherever the text came from.
TIME_WORDS = re.compile(r"(?i)(?<![a-z])(now|today|tomorrow|yesterday)(?![a-z])")
_TIME_SQLVALUES = frozenset(
    {
        "SVFOP_CURRENT_DATE", "SVFOP_CURRENT_TIME", "SVFOP_CURRENT_TIME_N",
        "SVFOP_CURRENT_TIMESTAMP", "SVFOP_CURRENT_TIMESTAMP_N", "SVFOP_LOCALTIME",
        "SVFOP_LOCALTIME_N", "SVFOP_LOCALTIMESTAMP", "SVFOP_LOCALTIMESTAMP_N",
    }
)
# What current_setting() may name: a settings name, possibly with a dot (custom settings).
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*$")
# The SQL/JSON syntax that builds json from values as the json builder functions do (with a
# type's own cast to json: volatility.JSON_BUILDERS).
_JSON_SYNTAX = frozenset(
    {"JsonObjectConstructor", "JsonArrayConstructor", "JsonArrayQueryConstructor", "JsonObjectAgg",
     "JsonArrayAgg", "JsonScalarExpr"}
)
# Only casts in SQL or plpgsql: an extension's in C (PostGIS, hstore) are trusted as builtins.
_JSON_CASTS = ("json cast",)
# Syntax that compares with an operator found by name, outside an A_Expr (`implied_operator`).
_IMPLIED_BY_SYNTAX = frozenset({"SubLink", "SortBy", "CaseExpr", "JoinExpr"})
# System columns that row locks (not only writes) change.
_LOCK_STAMPED = frozenset({"xmax", "cmax"})
# BETWEEN and friends name a keyword; the operators they run are these.
_IMPLIED_OPERATORS = {"BETWEEN": ("<=", ">="), "NOT BETWEEN": ("<", ">"),
                      "BETWEEN SYMMETRIC": ("<=", ">="), "NOT BETWEEN SYMMETRIC": ("<", ">")}


class ParseError(Exception):
    """The server's grammar rejects the text (so would the server)."""


def parse(sql: str) -> list[tuple[str, Node]]:
    """The statements of `sql` as (node type, fields), as the server will split them."""
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except _pg.ParseError as exc:
        raise ParseError(str(exc)) from exc
    out: list[tuple[str, Node]] = []
    for raw in tree.get("stmts") or ():
        stmt = raw.get("stmt")
        if stmt:
            ((kind, fields),) = stmt.items()
            out.append((kind, fields))
    return out


def _names(items: Iterable[Node] | None) -> list[str]:
    return [str(item.get("String", {}).get("sval", "")) for item in items or ()]


def qualified(schema: str | None, name: str) -> str:
    return f"{schema}.{name}" if schema else name


@dataclass(slots=True)
class Facts:
    """What the walk found in one statement."""

    reads: list[tuple[str | None, str]] = field(default_factory=list)
    writes: list[tuple[str | None, str]] = field(default_factory=list)
    volatile: list[str] = field(default_factory=list)  # reasons
    unknown_code: list[str] = field(default_factory=list)  # reasons: code that may write
    session_code: list[str] = field(default_factory=list)  # reasons: calls that change settings
    shadowable: set[str] = field(default_factory=set)
    locks: list[str] = field(default_factory=list)
    into: bool = False
    settings: set[str] = field(default_factory=set)  # read with current_setting('name')


class _Walk:
    """One pass over a statement's tree, tracking which WITH names are visible where."""

    def __init__(self) -> None:
        self.facts = Facts()

    def node(self, node: Any, scope: frozenset[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self.node(item, scope)
            return
        if not isinstance(node, dict) or not node:
            return
        if len(node) == 1:
            ((kind, fields),) = node.items()
            if kind[:1].isupper() and isinstance(fields, dict):
                self.visit(kind, fields, scope)
                return
        if "relname" in node:  # a bare RangeVar
            self.relation(node, scope, write=False)
            return
        if "typemod" in node and "names" in node:  # a bare TypeName outside a cast (cast() has its own)
            self.typed_output(node)
            return
        for value in node.values():
            self.node(value, scope)

    def relation(self, rv: Node, scope: frozenset[str], *, write: bool) -> None:
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        if not write and schema is None and name in scope:
            return  # a WITH query of this statement, not a relation
        (self.facts.writes if write else self.facts.reads).append((schema, name))

    def with_clause(self, with_: Node, scope: frozenset[str]) -> frozenset[str]:
        ctes = [c.get("CommonTableExpr", {}) for c in with_.get("ctes") or ()]
        names = [str(c.get("ctename", "")) for c in ctes]
        recursive = bool(with_.get("recursive"))
        for i, cte in enumerate(ctes):
            # A non-recursive WITH query sees only the ones before it: in
            # `WITH t AS (SELECT * FROM t)` the inner t is the table.
            visible = scope | frozenset(names if recursive else names[:i])
            self.node(cte.get("ctequery"), visible)
        return scope | frozenset(names)

    def visit(self, kind: str, f: Node, scope: frozenset[str]) -> None:
        facts = self.facts
        if "withClause" in f and isinstance(f["withClause"], dict):
            scope = self.with_clause(f["withClause"], scope)
        if kind == "RangeVar":
            self.relation(f, scope, write=False)
            return
        if kind in _DML:
            target = f.get("relation")
            if isinstance(target, dict):
                self.relation(target, scope, write=True)
            self.rest(f, scope, skip=("relation", "withClause"))
            return
        if kind == "SelectStmt":
            into = f.get("intoClause")
            if isinstance(into, dict) and isinstance(into.get("rel"), dict):
                self.relation(into["rel"], scope, write=True)
                facts.into = True
            if f.get("lockingClause"):
                facts.locks.append("SELECT ... FOR UPDATE/SHARE takes row locks")
            self.rest(f, scope, skip=("intoClause", "withClause"))
            return
        if kind == "FuncCall":
            self.call(f)
            self.rest(f, scope, skip=("funcname",))
            return
        if kind == "SQLValueFunction":
            op = str(f.get("op", ""))
            if op in _TIME_SQLVALUES:
                word = op.removeprefix("SVFOP_").removesuffix("_N").lower()
                facts.volatile.append(f"calls time-dependent function {word}")
            return
        if kind == "A_Expr":
            self.operator(f)
            self.rest(f, scope, skip=("name",))
            return
        if kind == "TypeCast":
            self.cast(f, scope)
            return
        if kind == "A_Const":
            text = f.get("sval", {}).get("sval") if isinstance(f.get("sval"), dict) else None
            found = TIME_WORDS.search(text) if isinstance(text, str) else None
            if found is None and isinstance(text, str) and ('"' in text or "\\" in text):
                # Array, range and record input drop quotes and backslashes inside an element.
                found = TIME_WORDS.search(text.replace('"', "").replace("\\", ""))
            if found is not None:
                facts.volatile.append(f"the literal '{found.group(0)}' reads the clock")
            return
        if kind == "RangeTableSample":
            if not f.get("repeatable"):
                facts.volatile.append("TABLESAMPLE without REPEATABLE returns random rows")
            self.rest(f, scope, skip=("method",))
            return
        if kind == "ColumnRef":
            self.column(f)
            return
        if kind in _JSON_SYNTAX:
            facts.shadowable.update(_JSON_CASTS)
        if kind in _IMPLIED_BY_SYNTAX:
            self.implied_operator(kind, f)
        self.rest(f, scope, skip=("withClause",))

    def column(self, f: Node) -> None:
        """A row's xmax (and cmax, in the same header field) is stamped by row locks, which
        write no row: `SELECT … FOR UPDATE` and a foreign-key check leave the locker's id
        behind with no write to evict the read. Any column of that name (a user's alias
        too: never the system column's, but cheap to refuse) is treated as volatile."""
        fields = f.get("fields") or ()
        last = fields[-1].get("String", {}).get("sval") if fields and isinstance(fields[-1], dict) else None
        if last in _LOCK_STAMPED:
            self.facts.volatile.append(f"reads {last}, which row locks change without a write")

    def rest(self, f: Node, scope: frozenset[str], skip: tuple[str, ...]) -> None:
        for key, value in f.items():
            if key not in skip:
                self.node(value, scope)

    def call(self, f: Node) -> None:
        names = _names(f.get("funcname"))
        schema, name = (names[-2] if len(names) > 1 else None), names[-1] if names else ""
        reason = call_reason(schema, name, len(f.get("args") or ()))
        if reason is None and name == "current_setting":
            reason = self.setting_read(list(f.get("args") or ()))
        if schema is None and (reason is None or UNKNOWN_VOLATILITY not in reason):
            # A builtin trusted by name, volatile or not: a user's function of that name on
            # the search_path may be what runs (and may write or SET).
            self.facts.shadowable.add(f"{name}()")
        if name in JSON_BUILDERS and schema in (None, "pg_catalog"):
            # A value of a type of the user's becomes json through its cast to json, if it
            # has one: the database's catalog says whether any cast to json runs their code.
            self.facts.shadowable.update(_JSON_CASTS)
        if reason is None:
            pass
        elif UNKNOWN_VOLATILITY in reason or name in RELOADS_SETTINGS:
            # A reload changes every session's settings: as code of the user's, it evicts
            # everything when sent and again when it completes, and moves the DDL epoch, so
            # every session learns its identity again before its next cached answer.
            self.facts.unknown_code.append(reason)
        else:
            if name == "set_config":
                self.facts.session_code.append(reason)
            self.facts.volatile.append(reason)

    def setting_read(self, args: list[Node]) -> str | None:
        """current_setting('name'): the name joins the session identity (custom settings are
        not in pg_settings); a computed name could be anything."""
        node = args[0] if args else {}
        while "TypeCast" in node:  # 'app.tenant'::text, as pg_get_expr prints it
            node = node["TypeCast"].get("arg") or {}
        first = node.get("A_Const", {}).get("sval", {}).get("sval")
        if isinstance(first, str) and SETTING_NAME.match(first):
            self.facts.settings.add(first.lower())
            return None
        return "calls current_setting() with a name computed at run time"

    def implied_operator(self, kind: str, f: Node) -> None:
        """Syntax that compares with an operator resolved by name, where no A_Expr names it:
        `CASE x WHEN v`, `x IN (SELECT …)` and `x op ANY/ALL (SELECT …)`, `JOIN … USING` and
        NATURAL JOIN (`=`), `ORDER BY x USING op`."""
        if kind == "SubLink":
            if f.get("subLinkType") not in ("ANY_SUBLINK", "ALL_SUBLINK", "ROWCOMPARE_SUBLINK"):
                return
            names = f.get("operName") or [{"String": {"sval": "="}}]  # IN: none, `=` is meant
        elif kind == "SortBy":
            names = f.get("useOp") or []
        elif kind == "CaseExpr":
            names = [{"String": {"sval": "="}}] if f.get("arg") else []
        else:  # JoinExpr
            names = [{"String": {"sval": "="}}] if f.get("usingClause") or f.get("isNatural") else []
        if names:
            self.operator({"name": names})

    def operator(self, f: Node) -> None:
        names = _names(f.get("name"))
        if not names:
            return
        if len(names) > 1 and names[-2] != "pg_catalog":
            self.facts.unknown_code.append(f"uses operator {names[-2]}.{names[-1]} {UNKNOWN_VOLATILITY}")
            return
        symbols = _IMPLIED_OPERATORS.get(names[-1].upper(), (names[-1],))
        if len(names) == 1:
            self.facts.shadowable.update(f"operator {s}" for s in symbols)

    def typed_output(self, type_name: Node) -> None:
        """A type a query makes values of from text with no cast: a column definition list
        (`jsonb_to_record(…) AS x(v t)`), XMLTABLE's and JSON_TABLE's columns, JSON_VALUE's
        RETURNING. Its input function runs on text from the data (a date type reads the clock
        for 'now'), and a domain's CHECKs run (code of the user's, maybe in a table's row
        type): judged as a cast's type is."""
        names = _names(type_name.get("names"))
        schema, name = (names[-2] if len(names) > 1 else None), (names[-1] if names else "")
        if schema not in (None, "pg_catalog"):
            self.facts.unknown_code.append(f"makes values of type {schema}.{name} defined outside pg_catalog")
        elif schema is None:
            self.facts.shadowable.add(f"type {name}")
        if name not in _CLOCK_FREE_TYPES:
            self.facts.volatile.append(f"converts text to {name} (it could be 'now')")

    def cast(self, f: Node, scope: frozenset[str]) -> None:
        type_name = f.get("typeName") or {}
        names = _names(type_name.get("names"))
        schema, name = (names[-2] if len(names) > 1 else None), (names[-1] if names else "")
        if schema not in (None, "pg_catalog"):
            self.facts.unknown_code.append(f"casts to type {schema}.{name} defined outside pg_catalog")
        elif schema is None:
            self.facts.shadowable.add(f"type {name}")
        self.facts.shadowable.add(f"cast {name}")
        arg = f.get("arg")
        if name not in _CLOCK_FREE_TYPES and isinstance(arg, dict):
            inner = next(iter(arg), "")
            # A constant is checked as a literal and a parameter when bound; anything else
            # may be text that spells 'now' at run time ('no' || 'w', a column holding it).
            if inner not in ("A_Const", "ParamRef"):
                self.facts.volatile.append(f"converts computed text to {name} (it could be 'now')")
        self.node(arg, scope)


def analyse(kind: str, fields: Node, verdict: Verdict) -> Verdict:
    """Fill the verdict from one query/DML statement; only a plain read stays cacheable."""
    walk = _Walk()
    walk.visit(kind, fields, frozenset())
    # A cast the server applies on its own (an implicit or assignment cast) could be one a DBA
    # backed with a function of theirs: the database's catalog says whether any exists.
    walk.facts.shadowable.add("implicit cast")
    # A sort, a grouping, DISTINCT, a UNION or a hash join compares with the default operator
    # class of the values' type, which for a type of the user's may be theirs (in plpgsql).
    walk.facts.shadowable.add("operator class")
    apply_facts(walk.facts, verdict)
    if verdict.status is None:
        verdict.cacheable = True
    verdict.keys = keys.key_refs(kind, fields)
    return verdict


def facts_of(kind: str, fields: Node) -> Facts:
    walk = _Walk()
    walk.visit(kind, fields, frozenset())
    return walk.facts


def apply_facts(facts: Facts, verdict: Verdict) -> None:
    for schema, name in facts.writes:
        verdict.tables_written.add(name)
        if qualified(schema, name) not in verdict.qualified:
            verdict.qualified.append(qualified(schema, name))
        verdict.write(f"writes table {qualified(schema, name)}")
    if facts.into:
        verdict.write("SELECT ... INTO creates a table", everything=True)
    for schema, name in facts.reads:
        if name in verdict.tables_written:
            continue
        verdict.tables_read.add(name)
        if qualified(schema, name) not in verdict.qualified:
            verdict.qualified.append(qualified(schema, name))
    verdict.shadowable |= facts.shadowable
    verdict.settings_read |= facts.settings
    if facts.locks:
        verdict.refuse(Status.UNCACHEABLE, facts.locks[0])
    if facts.unknown_code:
        # Code we cannot vouch for may write any table or change the session (SET ROLE,
        # search_path) where the key cannot see it: evict the database, learn the session again.
        verdict.refuse(Status.VOLATILE, facts.unknown_code[0])
        verdict.invalidate_all = True
        verdict.changes_session = True
    if facts.volatile:
        verdict.refuse(Status.VOLATILE, facts.volatile[0])
    if facts.session_code:
        verdict.changes_session = True


__all__ = ["TIME_WORDS", "Facts", "ParseError", "analyse", "apply_facts", "facts_of", "parse"]

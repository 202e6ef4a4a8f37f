"""One statement of PostgreSQL's parse tree → Verdict, dispatched on its node type.

Queries and DML are analysed by `queries.py`; every other statement is judged by what it can
do: change the schema (DDL evicts the database, or every database for roles and grants),
change the session (the session learns its identity again), run server code, or nothing.
"""

from __future__ import annotations

from typing import Any

from neonpoly.cache import queries
from neonpoly.cache.classification import Status, Verdict

Node = dict[str, Any]

_QUERIES = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_UTILITY = {
    "VariableShowStmt": "SHOW depends on session state",
    "ListenStmt": "LISTEN subscribes the session to notifications",
    "UnlistenStmt": "UNLISTEN changes the session's subscriptions",
    "ClosePortalStmt": "CLOSE ends a cursor of the session",
    "CheckPointStmt": "CHECKPOINT is maintenance, never cached",
    "PrepareStmt": "PREPARE only names a statement (its executions may be cached)",
    "ConstraintsSetStmt": "SET CONSTRAINTS applies to the current transaction only",
}
_COPY = "COPY is never cached (it streams rows in or out)"
_SIDE_EFFECTS = {"LockStmt": "LOCK takes locks", "NotifyStmt": "NOTIFY sends a notification"}
# Facts shared by every database of the server: roles, memberships, databases, settings.
_CLUSTER_WIDE = frozenset(
    {
        "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "GrantRoleStmt",
        "GrantStmt", "CreatedbStmt", "DropdbStmt", "AlterDatabaseStmt", "AlterDatabaseSetStmt",
        "AlterDatabaseRefreshCollStmt", "AlterSystemStmt", "ReassignOwnedStmt", "DropOwnedStmt",
        "CreateTableSpaceStmt", "DropTableSpaceStmt", "AlterTableSpaceOptionsStmt",
    }
)
_FALSE = frozenset({"false", "off", "no", "0"})
# Every relation of pg_catalog and pg_toast is named so (information_schema's few tables are
# read by no trusted builtin, and reading them is never cached).
_CATALOG_PREFIX = "pg_"


def classify_statement(kind: str, f: Node) -> Verdict:
    verdict = _classify_statement(kind, f)
    catalogs = sorted(t for t in verdict.tables_written if t.startswith(_CATALOG_PREFIX))
    if catalogs and verdict.is_write:
        # A superuser's write to a system catalog is DDL by hand (an UPDATE of pg_description
        # is a COMMENT): trusted builtins read the catalogs (obj_description, has_*_privilege,
        # pg_get_userbyid), and the shared ones (pg_authid) are every database's. User tables
        # may be named pg_…, too: treated the same (too much, never too little).
        verdict.reason = f"writes the system catalog {catalogs[0]} (as DDL does)"
        verdict.invalidate_all = verdict.changes_session = verdict.cluster_wide = True
    return verdict


def _classify_statement(kind: str, f: Node) -> Verdict:
    if kind in _QUERIES:
        return queries.analyse(kind, f, Verdict())
    if kind == "ExplainStmt":
        return _explain(f)
    if kind == "CopyStmt":
        return _copy(f)
    if kind == "DeclareCursorStmt":
        return _declare(f)
    if kind == "FetchStmt":
        verdict = Verdict().refuse(Status.NOTAQUERY, "cursor statements depend on the cursor's position")
        verdict.fetches = True
        return verdict
    if kind == "TransactionStmt":
        return _transaction(f)
    if kind == "VariableSetStmt":
        return _set(f)
    if kind == "DiscardStmt":
        verdict = _changes_session(f"DISCARD {str(f.get('target', '')).removeprefix('DISCARD_')}")
        if f.get("target") == "DISCARD_ALL":
            verdict.deallocates = "*"
        verdict.drops_temp = f.get("target") in ("DISCARD_ALL", "DISCARD_TEMP")
        return verdict
    if kind == "DeallocateStmt":
        verdict = Verdict().refuse(Status.NOTAQUERY, "DEALLOCATE changes the session's prepared statements")
        verdict.deallocates = "*" if f.get("isall") or not f.get("name") else str(f["name"])
        return verdict
    if kind == "LoadStmt":
        return _changes_session("LOAD of a library")
    if kind == "VacuumStmt":
        rels = [r.get("VacuumRelation", {}).get("relation") for r in f.get("rels") or ()]
        if _option_on(f.get("options") or (), ("full",)):
            return _rewrite("VACUUM FULL", rels)
        return _runs_index_code("VACUUM" if f.get("is_vacuumcmd") else "ANALYZE", rels)
    if kind == "ReindexStmt":
        table = f.get("relation") if f.get("kind") == "REINDEX_OBJECT_TABLE" else None
        return _runs_index_code("REINDEX", [table])  # of an index, a schema …: tables not named
    if kind == "ClusterStmt":
        return _rewrite("CLUSTER", [f["relation"]] if f.get("relation") else [])
    if kind in _UTILITY:
        return Verdict().refuse(Status.NOTAQUERY, _UTILITY[kind])
    if kind in _SIDE_EFFECTS:
        return Verdict().refuse(Status.UNCACHEABLE, _SIDE_EFFECTS[kind])
    if kind == "TruncateStmt":
        verdict = Verdict()
        for rel in f.get("relations") or ():
            rv = rel.get("RangeVar", {})
            verdict.tables_written.add(str(rv.get("relname", "")))
            verdict.qualified.append(queries.qualified(rv.get("schemaname"), str(rv.get("relname", ""))))
        return verdict.write("TRUNCATE empties tables", everything=True)
    if kind in ("CallStmt", "DoStmt", "ExecuteStmt"):
        what = {"CallStmt": "CALL runs", "DoStmt": "DO runs", "ExecuteStmt": "EXECUTE runs a prepared statement of"}
        verdict = Verdict().write(f"{what[kind]} server code that may write", everything=True)
        verdict.changes_session = True
        return verdict
    # Everything else changes the schema (or is a statement this version does not know).
    label = kind.removesuffix("Stmt")
    verdict = Verdict().write(f"{label} (DDL) changes the schema", everything=True)
    verdict.changes_session = True  # CREATE TEMP, ownership, role attributes ...
    verdict.cluster_wide = kind in _CLUSTER_WIDE
    return verdict


def _rewrite(what: str, relations: list[Any]) -> Verdict:
    """VACUUM FULL and CLUSTER rewrite a table: its data stays, but every row's ctid (which a
    read may return) moves. A write of the tables named; of the whole database (every table
    it may rewrite) when none is."""
    verdict = Verdict()
    named = _write_named(verdict, relations)
    if named is None:
        return verdict.write(f"{what} rewrites tables", everything=True)
    if not named:
        return verdict.write(f"{what} rewrites every table it may (none named)", everything=True)
    return verdict.write(f"{what} rewrites {named} (every row's ctid moves)")


def _write_named(verdict: Verdict, relations: list[Any]) -> str | None:
    """The relations (parse tree RangeVars) added to what `verdict` writes, spelt for a reason;
    None when one of them has no name (the caller writes everything), "" when none is given."""
    for rv in relations:
        if not isinstance(rv, dict) or not rv.get("relname"):
            return None
        name = str(rv["relname"])
        verdict.tables_written.add(name)
        verdict.qualified.append(queries.qualified(rv.get("schemaname"), name))
    return ", ".join(verdict.qualified)


def _runs_index_code(what: str, relations: list[Any]) -> Verdict:
    """VACUUM, ANALYZE and REINDEX change no row, but run code a write of the table would:
    REINDEX evaluates index expressions and sorts by the indexes' operator classes, ANALYZE
    evaluates expression indexes for its sample and sorts each column by its type's default
    operator class, VACUUM merges a GIN index's pending entries with its compare function.
    ANALYZE also changes plans, and so the order of rows a read without ORDER BY returns.
    Judged as a write of the tables named (relations.py: opaque when that code is the user's),
    or of every table (none named); the eviction of a table whose code is builtin only costs
    hits."""
    verdict = Verdict()
    verdict.shadowable.add("operator class")
    named = _write_named(verdict, relations)
    if named is None:
        return verdict.write(f"{what} runs the code of every table's indexes", everything=True)
    if not named:
        return verdict.write(f"{what} runs the code of every table's indexes (none named)", everything=True)
    return verdict.write(f"{what} runs the code of the indexes of {named}")


def _changes_session(reason: str) -> Verdict:
    verdict = Verdict().refuse(Status.NOTAQUERY, f"{reason} changes session state")
    verdict.changes_session = True
    return verdict


# Settings that change which schemas a name resolves in (role and session user: `$user`).
_NAMES_RESOLVE_BY = frozenset({"search_path", "role", "session_authorization"})


def _set(f: Node) -> Verdict:
    name = str(f.get("name") or "").lower()
    if f.get("is_local"):
        if name in _NAMES_RESOLVE_BY:
            # Until the transaction ends, names resolve by it: a keyed write decided with the
            # identity's search_path could trust an `=` of the user's that matches every row.
            return _changes_session("SET LOCAL")
        verdict = Verdict().refuse(Status.NOTAQUERY, "SET LOCAL lasts only until the end of the transaction")
        return verdict
    if name in ("transaction", "transaction_isolation", "transaction_read_only", "transaction_deferrable"):
        return Verdict().refuse(Status.NOTAQUERY, "SET TRANSACTION applies to the current transaction only")
    if name == "constraints":
        return Verdict().refuse(Status.NOTAQUERY, "SET CONSTRAINTS applies to the current transaction only")
    word = "RESET" if str(f.get("kind", "")).startswith("VAR_RESET") else "SET"
    return _changes_session(word)


def _explain(f: Node) -> Verdict:
    verdict = Verdict().refuse(Status.UNCACHEABLE, "EXPLAIN output depends on planner state")
    query = f.get("query")
    if not isinstance(query, dict) or not query:
        return verdict
    ((kind, fields),) = query.items()
    inner = classify_statement(kind, fields)
    verdict.tables_read = inner.tables_read
    verdict.qualified = inner.qualified
    # As a cursor's (`_declare`): one of the user's standing in for a builtin it trusts by name
    # runs when ANALYZE executes it, or when planning folds an IMMUTABLE call of constants.
    verdict.shadowable = inner.shadowable
    analyzes = _option_on(f.get("options") or (), ("analyze", "analyse"))
    if not analyzes and (inner.invalidate_all or inner.changes_session):
        # Planning runs code too: the planner folds IMMUTABLE calls with constant arguments
        # (and asks STABLE ones for estimates), so a user's function may write or SET.
        verdict.invalidate_all = inner.invalidate_all
        verdict.changes_session = inner.changes_session
        verdict.reason = f"EXPLAIN plans, which may run code: {inner.reason}"
    elif analyzes and (inner.is_write or inner.invalidate_all or inner.changes_session):
        # EXPLAIN ANALYZE executes the statement.
        verdict.is_write = inner.is_write
        verdict.invalidate_all = inner.invalidate_all
        verdict.changes_session = inner.changes_session
        verdict.tables_written = inner.tables_written
        verdict.reason = f"EXPLAIN ANALYZE executes: {inner.reason}"
    return verdict


def _option_on(options: Any, names: tuple[str, ...]) -> bool:
    """Whether a statement's options (EXPLAIN's ANALYZE, VACUUM's FULL) turn the option of
    one of these names on; anything but an explicit false does (and any one of repeats)."""
    for option in options:
        elem = option.get("DefElem", {})
        if str(elem.get("defname", "")).lower() not in names:
            continue
        arg = elem.get("arg")
        if arg is None:
            return True
        ((atype, value),) = arg.items()
        if atype == "Integer":
            on = bool(value.get("ival", 0))
        elif atype == "Boolean":
            on = bool(value.get("boolval", False))
        else:
            on = str(value.get("sval", "")).lower() not in _FALSE
        if on:
            return True
    return False


def _copy(f: Node) -> Verdict:
    verdict = Verdict().refuse(Status.UNCACHEABLE, _COPY)
    verdict.copy = True
    if f.get("is_program"):
        # A shell command of the server's: it may connect back (psql) and write or alter
        # anything, in any database, as dblink_exec may; judged as server code (CALL, DO).
        verdict.write("", everything=True)
        verdict.reason = "COPY … PROGRAM runs a program on the server that may write anything"
        verdict.changes_session = True
    query = f.get("query")
    if isinstance(query, dict) and query:
        ((kind, fields),) = query.items()
        queries.apply_facts(queries.facts_of(kind, fields), verdict)
        verdict.refuse(Status.UNCACHEABLE, _COPY)
        verdict.cacheable = False
        return verdict
    rv = f.get("relation") or {}
    name = str(rv.get("relname", ""))
    verdict.qualified.append(queries.qualified(rv.get("schemaname"), name))
    if f.get("is_from"):
        verdict.tables_written.add(name)
        verdict.write(f"COPY FROM writes table {verdict.qualified[-1]}")
        if f.get("whereClause"):  # functions in COPY FROM … WHERE run per row
            queries.apply_facts(queries.facts_of("SelectStmt", {"whereClause": f["whereClause"]}), verdict)
        return verdict
    verdict.tables_read.add(name)
    return verdict


def _declare(f: Node) -> Verdict:
    verdict = Verdict().refuse(Status.NOTAQUERY, "cursor statements depend on the cursor's position")
    query = f.get("query")
    if isinstance(query, dict) and query:
        ((kind, fields),) = query.items()
        inner = classify_statement(kind, fields)
        verdict.tables_read = inner.tables_read
        verdict.qualified = inner.qualified
        # The builtins it trusts by name are checked as a read's are: one of the user's
        # standing in for them runs code (at DECLARE … WITH HOLD, and at every FETCH).
        verdict.shadowable = inner.shadowable
        if inner.is_write or inner.invalidate_all or inner.changes_session:
            # Its query runs as rows are fetched: every FETCH may write.
            verdict.is_write = True
            verdict.tables_written = inner.tables_written
            verdict.invalidate_all = True
            verdict.changes_session = inner.changes_session
            verdict.cursor_writes = True
            verdict.reason = f"cursor over a query that may write: {inner.reason}"
    return verdict


_TRANSACTION = {
    "TRANS_STMT_BEGIN": "begin", "TRANS_STMT_START": "begin", "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback", "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release", "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare_transaction",
}


def _transaction(f: Node) -> Verdict:
    kind = str(f.get("kind", ""))
    verdict = Verdict().refuse(Status.NOTAQUERY, "transaction control is relayed, never cached")
    if kind in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"):
        verdict.prepared = (("prepare" if kind == "TRANS_STMT_PREPARE" else "end", str(f.get("gid", ""))),)
    if kind == "TRANS_STMT_COMMIT_PREPARED":
        # Makes an earlier, unseen transaction's writes visible.
        return verdict.write("COMMIT PREPARED makes an earlier transaction's writes visible", everything=True)
    if kind == "TRANS_STMT_ROLLBACK_PREPARED":
        verdict.reason = "ROLLBACK PREPARED ends a prepared transaction"
        return verdict
    verdict.transaction_control = _TRANSACTION.get(kind)
    if f.get("chain"):
        verdict.reason = "transaction control (AND CHAIN opens the next transaction)"
    return verdict

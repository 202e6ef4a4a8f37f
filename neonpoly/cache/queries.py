"""Analysis of statements sqlglot can parse: reads, DML and data-modifying CTEs."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar

from sqlglot import exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.tokenizer_core import Token, TokenType

from neonpoly.cache.classification import Status, Verdict
from neonpoly.cache.volatility import UNKNOWN_VOLATILITY, volatility_reason

DIALECT = Postgres()


class StatementTokenizer(Postgres.Tokenizer):
    """Postgres tokens without "command" swallowing.

    The stock tokenizer turns the text after CALL, EXPLAIN, PREPARE, SHOW, RESET … into one
    string token; the policy needs those tokens (EXPLAIN ANALYZE of a write, PREPARE
    TRANSACTION) and the template must not show the text as one opaque literal.
    """

    COMMANDS: ClassVar[set[TokenType]] = set()


_local = threading.local()


def tokenize(sql: str) -> list[Token]:
    """Tokens of the whole text; one tokenizer per thread, as a tokenizer holds state."""
    tokenizer: StatementTokenizer | None = getattr(_local, "tokenizer", None)
    if tokenizer is None:
        tokenizer = _local.tokenizer = StatementTokenizer()
    return tokenizer.tokenize(sql)
_DML = (exp.Insert, exp.Update, exp.Delete, exp.Merge)


def fold(identifier: exp.Expr | None) -> str:
    """Unquoted names fold to lower case as PostgreSQL does; quoted names are kept."""
    if not isinstance(identifier, exp.Identifier):
        return ""
    text = str(identifier.this)
    return text if identifier.quoted else text.lower()


def table_names(table: exp.Table) -> tuple[str, str] | None:
    """(bare, qualified) names of a relation, or None for table functions and the like."""
    if not isinstance(table.this, exp.Identifier):
        return None
    bare = fold(table.this)
    schema = fold(table.args.get("db"))
    return bare, f"{schema}.{bare}" if schema else bare


def _cte_names(node: exp.Expr) -> set[str]:
    with_ = node.args.get("with_") or node.args.get("with")
    if not isinstance(with_, exp.With):
        return set()
    names: set[str] = set()
    for cte in with_.expressions:
        alias = cte.args.get("alias")
        if isinstance(alias, exp.TableAlias):
            names.add(fold(alias.this))
    return names


def _is_cte_reference(table: exp.Table, bare: str) -> bool:
    # A WITH name is visible to the statement that declares it and everything inside it.
    if table.args.get("db") is not None:
        return False
    node: exp.Expr | None = table.parent
    while node is not None:
        if bare in _cte_names(node):
            return True
        node = node.parent
    return False


def _write_target(node: exp.Expr) -> exp.Table | None:
    target = node.this
    if isinstance(target, exp.Schema):
        target = target.this
    return target if isinstance(target, exp.Table) else None


def parse(tokens: Sequence[Token], sql: str) -> exp.Expr | None:
    """Parse one statement's tokens; raises sqlglot errors for the caller to turn into a status."""
    trees = DIALECT.parser().parse(list(tokens), sql)
    return trees[0] if trees else None


def _record_write(node: exp.Expr, verdict: Verdict, targets: set[int]) -> None:
    target = _write_target(node)
    if target is None:
        if node.parent is None or not isinstance(node.parent, exp.When):
            verdict.write(f"{node.key.upper()} whose table cannot be named", everything=True)
        return
    names = table_names(target)
    if names is None:
        verdict.write(f"{node.key.upper()} whose table cannot be named", everything=True)
        return
    targets.add(id(target))
    verdict.tables_written.add(names[0])
    verdict.qualified.append(names[1])
    verdict.write(f"writes table {names[1]}")


def _select_flags(node: exp.Select, verdict: Verdict, targets: set[int]) -> list[str]:
    refusals: list[str] = []
    into = node.args.get("into")
    if isinstance(into, exp.Into):
        table = into.this
        names = table_names(table) if isinstance(table, exp.Table) else None
        if isinstance(table, exp.Table):
            targets.add(id(table))
        if names is not None:
            verdict.tables_written.add(names[0])
            verdict.qualified.append(names[1])
        verdict.write("SELECT ... INTO creates a table", everything=True)
    for lock in node.args.get("locks") or []:
        text = lock.sql(dialect="postgres").split(" OF ", 1)[0]
        refusals.append(f"SELECT ... {text}")
    return refusals


def analyse(tree: exp.Expr, verdict: Verdict) -> Verdict:
    """Fill the verdict from a parsed statement; only a plain read stays cacheable."""
    targets: set[int] = set()
    locks: list[str] = []
    volatile: list[str] = []
    tables: list[exp.Table] = []
    has_with = False
    for node in tree.walk():
        if isinstance(node, exp.Table):
            tables.append(node)
        elif isinstance(node, exp.Column):
            continue
        elif isinstance(node, _DML):
            _record_write(node, verdict, targets)
        elif isinstance(node, exp.Select):
            locks.extend(_select_flags(node, verdict, targets))
        elif isinstance(node, exp.Func):
            reason = volatility_reason(node)
            if reason is not None:
                volatile.append(reason)
        elif isinstance(node, exp.With):
            has_with = True
    for table in tables:
        names = table_names(table)
        if names is None or id(table) in targets:
            continue
        if has_with and _is_cte_reference(table, names[0]):
            continue
        verdict.tables_read.add(names[0])
        if names[1] not in verdict.qualified:
            verdict.qualified.append(names[1])
    if locks:
        verdict.refuse(Status.UNCACHEABLE, locks[0])
    if volatile:
        verdict.refuse(Status.VOLATILE, volatile[0])
        if any(UNKNOWN_VOLATILITY in reason for reason in volatile):
            # A function we do not know may write any table (a user-defined function
            # that UPDATEs): evict the database, as for any write we cannot name.
            verdict.invalidate_all = True
        if any(UNKNOWN_VOLATILITY in reason or "set_config" in reason for reason in volatile):
            # ... or change the session (SET ROLE, search_path) where the key cannot see it.
            verdict.changes_session = True
    if not isinstance(tree, (exp.Query, exp.Values, *_DML)):
        verdict.refuse(Status.PARSEERROR, f"unrecognised statement {tree.key.upper()}")
    if verdict.status is None:
        verdict.cacheable = True
    return verdict

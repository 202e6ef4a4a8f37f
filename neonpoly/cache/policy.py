"""What may be cached: the classification of one SQL string, memoised by its text.

The policy decides and the session acts.  Decisions, per proxy.md:

* cacheable only: SELECT / VALUES / TABLE without locking clauses, INTO, data-modifying
  CTEs or calls whose volatility is not known safe;
* ``volatile``: random(), nextval(), now() and other clock readers, current_setting()
  (not every setting is in the cache key), any function not on the allowlist.
  current_user, session_user, current_role, current_database and current_schema(s) are
  allowed because database, role and search_path are part of the key;
* ``notaquery``: SHOW (depends on session state), SET/RESET/DISCARD, transaction control,
  PREPARE/DEALLOCATE, cursors, LISTEN/UNLISTEN, VACUUM/ANALYZE and friends, empty text;
* ``uncacheable``: writes (is_write), DDL/TRUNCATE/CALL/DO (also invalidate_all), COPY,
  LOCK, NOTIFY, EXPLAIN, SELECT … FOR UPDATE/SHARE, SELECT … INTO;
* ``multiplestatements``: more than one statement; write facts are still aggregated so the
  session can invalidate;
* ``parseerror``: never raises; text that cannot be read is assumed to write unknown
  tables unless it starts like a query and has no write keyword.

The forwarded SQL is always the client's bytes; the template is for display and grouping.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

from sqlglot.tokenizer_core import Token, TokenType

from neonpoly.cache.classification import Classification, Status, Verdict
from neonpoly.cache.queries import tokenize
from neonpoly.cache.statements import classify_statement
from neonpoly.cache.template import template_by_regex, template_from_tokens, template_id

__all__ = ["MEMO_MAX_CHARS", "Classification", "Status", "classify", "warm_up"]

MEMO_SIZE = 8192
# Bulk INSERTs can be megabytes and never repeat; keeping them would bloat the memo.
MEMO_MAX_CHARS = 16_384


# A number can change neither what a statement is nor what it touches, so texts that differ
# only in numbers share one classification (pgbench -S sends a new text for every aid). The
# exception is SET: its value is the setting, so those are never shared by shape.
_NUMBER = re.compile(r"(?<![\w$.'])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
_exact: OrderedDict[str, Classification] = OrderedDict()
_shapes: OrderedDict[str, Classification] = OrderedDict()


def _remember(memo: OrderedDict[str, Classification], key: str, value: Classification) -> None:
    memo[key] = value
    if len(memo) > MEMO_SIZE:
        memo.popitem(last=False)


def classify(sql: str) -> Classification:
    """Classify SQL text; repeated texts (and texts differing only in numbers) are answered
    from a bounded memo without parsing."""
    found = _exact.get(sql)
    if found is not None:
        return found
    if len(sql) > MEMO_MAX_CHARS:
        return _classify(sql)
    shape = _NUMBER.sub("0", sql)
    found = _shapes.get(shape) if shape != sql else None
    if found is None:
        found = _classify(sql)
        if found.session_setting is None and not found.changes_session:
            _remember(_shapes, shape, found)
    _remember(_exact, sql, found)
    return found


def warm_up() -> None:
    """Build the function tables now (about 25 ms) instead of in the first client's query."""
    _classify("SELECT lower(a) FROM t")


def _split(tokens: Sequence[Token]) -> list[list[Token]]:
    statements: list[list[Token]] = [[]]
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            statements.append([])
        else:
            statements[-1].append(token)
    return [statement for statement in statements if statement]


def _classify(sql: str) -> Classification:
    try:
        tokens = tokenize(sql)
    except Exception:  # TokenError for unterminated quotes, and anything unforeseen
        return _unreadable(sql, "could not tokenize")
    try:
        statements = _split(tokens)
        if not statements:
            return _build(Verdict().refuse(Status.NOTAQUERY, "empty query"), "")
        verdicts = [classify_statement(statement, sql) for statement in statements]
        template = template_from_tokens(statements)
    except Exception as error:  # the promise is "never raises"
        return _unreadable(sql, f"could not classify: {type(error).__name__}")
    if len(verdicts) == 1:
        return _build(verdicts[0], template)
    return _build(_merge(verdicts), template)


def _merge(verdicts: Sequence[Verdict]) -> Verdict:
    merged = Verdict().refuse(
        Status.MULTIPLESTATEMENTS, f"{len(verdicts)} statements in one query string"
    )
    for verdict in verdicts:
        merged.is_write |= verdict.is_write
        merged.invalidate_all |= verdict.invalidate_all
        merged.changes_session |= verdict.changes_session
        merged.tables_read |= verdict.tables_read
        merged.tables_written |= verdict.tables_written
        merged.qualified.extend(q for q in verdict.qualified if q not in merged.qualified)
    return merged


def _unreadable(sql: str, reason: str) -> Classification:
    verdict = Verdict().refuse(Status.PARSEERROR, reason)
    first = sql.lstrip(" \t\r\n(").split(None, 1)[0].upper() if sql.strip(" \t\r\n(") else ""
    if first not in ("SELECT", "WITH", "VALUES", "TABLE") or any(
        word in sql.upper() for word in ("INSERT", "UPDATE", "DELETE", "MERGE", "INTO")
    ):
        verdict.is_write = verdict.invalidate_all = True
    return _build(verdict, template_by_regex(sql))


def _build(verdict: Verdict, template: str) -> Classification:
    return Classification(
        cacheable=verdict.cacheable and verdict.status is None,
        status=verdict.status,
        reason=verdict.reason,
        is_write=verdict.is_write,
        tables_read=frozenset(verdict.tables_read),
        tables_written=frozenset(verdict.tables_written),
        qualified_tables=tuple(verdict.qualified),
        invalidate_all=verdict.invalidate_all,
        changes_session=verdict.changes_session,
        session_setting=verdict.session_setting,
        transaction_control=verdict.transaction_control,
        template=template,
        template_id=template_id(template),
    )

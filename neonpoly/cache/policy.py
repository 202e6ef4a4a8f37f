"""What may be cached: the classification of one SQL string, memoised by its text.

The policy decides and the session acts. The text is parsed by PostgreSQL's own parser
(libpg_query, through pglast), so what is classified is what the server will run:

* cacheable only: SELECT / VALUES / TABLE reading relations, calling only pg_catalog
  builtins known to depend on nothing but their arguments and the session identity (see
  `volatility.py`), without locking clauses, INTO, data-modifying CTEs, clock literals;
* ``volatile``: random(), nextval(), now() and other clock readers, 'now' in any literal,
  functions not on the allowlist or not in pg_catalog (these also evict the database and make
  the session learn its identity again: they may write or SET anything);
* ``notaquery``: SHOW, SET/RESET/DISCARD, transaction control, PREPARE/DEALLOCATE, cursors,
  LISTEN/UNLISTEN, VACUUM/ANALYZE and friends, empty text;
* ``uncacheable``: writes (is_write), DDL/TRUNCATE/CALL/DO/EXECUTE (also invalidate_all), COPY,
  LOCK, NOTIFY, EXPLAIN, SELECT … FOR UPDATE/SHARE, SELECT … INTO;
* ``multiplestatements``: more than one statement; write facts are still aggregated so the
  session can invalidate;
* ``parseerror``: never raises; text the server's grammar rejects is assumed to write
  unknown tables unless it starts like a query and has no write keyword.

Whether a trusted builtin is really the builtin in the client's database, whether the
relations are plain tables, and who the session is are answered by the server at run time
(`relations.py`, `proxy/identity.py`). The forwarded SQL is always the client's bytes; the
template (from sqlglot's tokens, see `template.py`) is for display and grouping only.
"""

from __future__ import annotations

import re
import string
from collections import OrderedDict
from collections.abc import Sequence

from sqlglot.tokenizer_core import Token, TokenType

from neonpoly.cache import key_shapes, queries
from neonpoly.cache.classification import Classification, Status, Verdict
from neonpoly.cache.keys import KeyRef, key_refs
from neonpoly.cache.statements import classify_statement
from neonpoly.cache.template import template_by_regex, template_from_tokens, template_id, tokenize

__all__ = ["MEMO_MAX_CHARS", "Classification", "Status", "classify", "keys_for", "learn_key_shape", "warm_up"]

MEMO_SIZE = 8192
# Bulk INSERTs can be megabytes and never repeat; keeping them would bloat the memo.
MEMO_MAX_CHARS = 16_384
# Both memos together keep at most this many characters of SQL text (besides at most
# MEMO_SIZE entries each): ~2 * MEMO_SIZE classifications and 16 MB of keys at worst.
MEMO_MAX_TOTAL_CHARS = 8 << 20

# A number can change neither what a plain query or DML statement is nor what it touches, so
# such texts that differ only in numbers share one classification (pgbench -S sends a new text
# for every aid). Not for other statements (EXPLAIN (ANALYZE 0) vs (ANALYZE 1), SET x = 1),
# and not for text with quoted names ("t 1" and "t 2" are different tables).
# Spelled to start with \d (the check of the character before the number comes after its
# first digit): a pattern that starts with a character class lets the regex engine skip to
# candidate positions, about twice as fast on every new text as the same check up front,
# `(?<![\w$.'@])\d+...`, which matches exactly the same (tests/unit/test_policy.py).
# Not after `@` either: the template tokenizer reads `@3` as the placeholder `$3`, so texts
# sharing a shape across it would carry another text's template id (a rule by id misses).
_NUMBER = re.compile(r"\d(?<![\w$.'@]\d)\d*(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
# A dollar sign that is not a placeholder ($1): a dollar-quoted string may start there.
_DOLLAR_QUOTE = re.compile(r"\$(?!\d)")
# A string, a comment (not nested), or a number as _NUMBER finds them: _shape_commented.
_KEPT_OR_NUMBER = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*(?:[^*/]|\*(?!/)|/(?!\*))*\*/|" + _NUMBER.pattern)
# _numbers_zeroed: what may follow a number at the end of a text, the number's digits, and
# the (ASCII) characters after which a run of digits is no number of _NUMBER's (\w, $.'@).
_TRAILER = " \t\n\r\f\v;"
_DIGITS = "0123456789"
_DIGIT_BYTES = _DIGITS.encode()
# A digit that does not continue a word (`1`, `a.1`, `e-1`): where `_NUMBER` may start a match.
_DIGIT_NOT_IN_A_WORD = re.compile(r"(?<!\w)\d")
_BEFORE_NO_NUMBER = frozenset(string.ascii_letters + string.digits + "_$.'@")
_SHAPE_KINDS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"})
_exact: OrderedDict[str, Classification] = OrderedDict()
_shapes: OrderedDict[str, Classification] = OrderedDict()


_chars = [0]  # characters of the keys of both memos


def _remember(memo: OrderedDict[str, Classification], key: str, value: Classification) -> None:
    old = memo.pop(key, None)
    if old is not None:
        _chars[0] -= len(key)
    memo[key] = value
    _chars[0] += len(key)
    while len(memo) > MEMO_SIZE:
        gone, _ = memo.popitem(last=False)
        _chars[0] -= len(gone)
    while _chars[0] > MEMO_MAX_TOTAL_CHARS:
        victim = _exact if len(_exact) >= len(_shapes) else _shapes
        gone, _ = victim.popitem(last=False)
        _chars[0] -= len(gone)


def memo_chars() -> int:
    """Characters of SQL text the classification memos hold (bounded by MEMO_MAX_TOTAL_CHARS)."""
    return _chars[0]


def classify(sql: str) -> Classification:
    """Classify SQL text; repeated texts (and texts differing only in numbers) are answered
    from a bounded memo without parsing."""
    found = _exact.get(sql)
    if found is not None:
        return found
    if len(sql) > MEMO_MAX_CHARS:
        return _classify(sql)
    # Not for non-ASCII text either: PostgreSQL's lexer takes any non-ASCII character for a
    # letter of a name (`t€1` and `t€2` are two tables), where \w and the regex see none.
    shape = _shape(sql) if sql.isascii() else sql
    if shape != sql:
        found = _shapes.get(shape)
        if found is not None:
            # Not kept by its text too: a stream of new texts of one shape (pgbench -S) would
            # only churn the exact memo, and a repeat costs one more regex pass, no parse.
            return found
    found = _classify(sql)
    if found.shape_shared and shape != sql:
        _remember(_shapes, shape, found)
    _remember(_exact, sql, found)
    return found


def number_slot(sql: str) -> tuple[str, str] | None:
    """(head, trailer) of a text that `classify` answers, for every text `head + N +
    trailer` (N any run of ASCII digits, the whole within MEMO_MAX_CHARS), with this text's
    classification: its one number is at its end, before spaces or a semicolon, and it has no
    quote, backslash or dollar sign, and every other digit is part of a word (`t1`, `users_2024`:
    `_NUMBER` starts no match there), so `_shape` is `_NUMBER.sub`'s `head + "0" + trailer` for
    all of them; and that classification is shared by shape. None: not such a text.
    (pgbench -S: a session decides its bypassed reads by this slot, proxy/passes.py.)"""
    if len(sql) > MEMO_MAX_CHARS or not sql.isascii() or '"' in sql or "\\" in sql or "$" in sql or "'" in sql:
        return None
    body = sql.rstrip(_TRAILER)
    head = body.rstrip(_DIGITS)
    if (
        len(head) == len(body)
        or not head
        or head[-1] in _BEFORE_NO_NUMBER
        or _DIGIT_NOT_IN_A_WORD.search(head) is not None
        or not classify(sql).shape_shared
    ):
        return None
    return head, sql[len(body) :]


def _shape(sql: str) -> str:
    """The text with every number outside string literals as 0 (the text itself: not shared).

    A number inside a string is part of a value the classification may read: a setting's
    name (current_setting('my.a 1')), a clock word spelled with an escape (E'no\\167' is
    'now'). So strings are found by their quotes, and a text whose quotes cannot be counted
    that simply is not shared: quoted names ("t 1" and "t 2" are different tables, and may
    hold a quote), backslash escapes (E'' and U&'' strings) and dollar-quoted strings."""
    if '"' in sql or "\\" in sql or ("$" in sql and _DOLLAR_QUOTE.search(sql)):
        return sql
    if "'" not in sql:
        return _numbers_zeroed(sql)  # no strings: a number in a comment changes nothing
    if "--" in sql or "/*" in sql:
        return _shape_commented(sql)
    parts = sql.split("'")  # outside strings at even places ('' inside one: an empty outside)
    if not len(parts) % 2:
        return sql  # a string that never ends: the server will say so
    parts[0] = _NUMBER.sub("0", parts[0])
    for i in range(2, len(parts), 2):  # after a closing quote: as _NUMBER sees a number there
        parts[i] = _NUMBER.sub("0", "'" + parts[i])[1:]
    return "'".join(parts)


def _numbers_zeroed(sql: str) -> str:
    """`_NUMBER.sub("0", sql)`, and without the regex's scan of every character (most of a
    new text's cost) when the text's only digits are one number at its end, before spaces
    or a semicolon (pgbench -S, ORM lookups by id): then that number is the one match, since
    the regex takes a run of digits preceded by none of `\\w$.'@` and followed by none of
    `\\w.` whole (tests/unit/test_shape_memo.py compares both on random texts)."""
    body = sql.rstrip(_TRAILER)
    head = body.rstrip(_DIGITS)
    if (
        len(head) == len(body)
        or not head
        or head[-1] in _BEFORE_NO_NUMBER
        or not head.isascii()
        or len(head.encode().translate(None, _DIGIT_BYTES)) != len(head)
    ):
        return _NUMBER.sub("0", sql)
    return head + "0" + sql[len(body) :]


def _shape_commented(sql: str) -> str:
    """`_shape` of a text with strings and comments (ORM tags: sqlcommenter, marginalia): the
    strings and comments read as tokens, each kept whole; anything between them that still
    holds a quote or opens a comment (an unterminated one, a nested comment) is not shared."""
    out: list[str] = []
    at = 0
    for match in _KEPT_OR_NUMBER.finditer(sql):
        gap = sql[at : match.start()]
        if "'" in gap or "/*" in gap:
            return sql
        token = match.group()
        out.append(gap)
        out.append("0" if token[0].isdigit() else token)
        at = match.end()
    rest = sql[at:]
    if "'" in rest or "/*" in rest:
        return sql
    out.append(rest)
    return "".join(out)


def warm_up() -> None:
    """Load the parser now instead of in the first client's query."""
    _classify("SELECT lower(a) FROM t")


def _split(tokens: Sequence[Token]) -> list[list[Token]]:
    statements: list[list[Token]] = [[]]
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            statements.append([])
        else:
            statements[-1].append(token)
    return [statement for statement in statements if statement]


def _template(sql: str) -> str:
    try:
        return template_from_tokens(_split(tokenize(sql)))
    except Exception:  # TokenError for unterminated quotes, and anything unforeseen
        return template_by_regex(sql)


def _classify(sql: str) -> Classification:
    try:
        statements = queries.parse(sql)
    except queries.ParseError as error:
        return _unreadable(sql, f"could not parse: {error}")
    except Exception as error:  # the promise is "never raises" (deep nesting, odd bytes)
        return _unreadable(sql, f"could not parse: {type(error).__name__}")
    template = _template(sql)
    if not statements:
        return _build(Verdict().refuse(Status.NOTAQUERY, "an empty query returns nothing to cache"), template)
    try:
        verdicts = [classify_statement(kind, fields) for kind, fields in statements]
    except Exception as error:  # a tree shape this code does not expect: assume the worst
        return _unreadable(sql, f"could not classify: {type(error).__name__}")
    if len(verdicts) == 1:
        shared = statements[0][0] in _SHAPE_KINDS
        return _build(verdicts[0], template, shape_shared=shared, sql=sql)
    return _build(_merge(verdicts), template)


def _merge(verdicts: Sequence[Verdict]) -> Verdict:
    merged = Verdict().refuse(
        Status.MULTIPLESTATEMENTS, f"{len(verdicts)} statements in one query string"
    )
    for verdict in verdicts:
        merged.is_write |= verdict.is_write
        merged.invalidate_all |= verdict.invalidate_all
        merged.changes_session |= verdict.changes_session
        merged.cluster_wide |= verdict.cluster_wide
        merged.cursor_writes |= verdict.cursor_writes
        merged.fetches |= verdict.fetches
        merged.copy |= verdict.copy
        merged.tables_read |= verdict.tables_read
        merged.tables_written |= verdict.tables_written
        merged.shadowable |= verdict.shadowable
        merged.settings_read |= verdict.settings_read
        merged.deallocates = merged.deallocates or verdict.deallocates
        merged.drops_temp |= verdict.drops_temp
        merged.prepared += verdict.prepared
        if verdict.transaction_control == "commit" or merged.transaction_control is None:
            merged.transaction_control = verdict.transaction_control or merged.transaction_control
        merged.qualified.extend(q for q in verdict.qualified if q not in merged.qualified)
    return merged


# PREPARE and TRANSACTION in that order, anything between (comments nest: no finer test).
_MAY_PREPARE_TRANSACTION = re.compile(r"PREPARE.*TRANSACTION", re.IGNORECASE | re.DOTALL)


def _unreadable(sql: str, reason: str) -> Classification:
    verdict = Verdict().refuse(Status.PARSEERROR, reason[:200])
    first = sql.lstrip(" \t\r\n(").split(None, 1)[0].upper() if sql.strip(" \t\r\n(") else ""
    if first not in ("SELECT", "WITH", "VALUES", "TABLE") or any(
        word in sql.upper() for word in ("INSERT", "UPDATE", "DELETE", "MERGE", "INTO")
    ):
        verdict.is_write = verdict.invalidate_all = True
    if _MAY_PREPARE_TRANSACTION.search(sql):
        # It may prepare a transaction of a gid unknown: held under a name no COMMIT PREPARED
        # spells (a gid has no NUL), so until neonpoly restarts (QueryCache.two_phase).
        verdict.prepared = (("prepare", "\0unreadable"),)
    return _build(verdict, _template(sql))


def _build(verdict: Verdict, template: str, *, shape_shared: bool = False, sql: str = "") -> Classification:
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
        transaction_control=verdict.transaction_control,
        template=template,
        template_id=template_id(template),
        shadowable=frozenset(verdict.shadowable),
        settings_read=frozenset(verdict.settings_read),
        cluster_wide=verdict.cluster_wide,
        copy=verdict.copy,
        deallocates=verdict.deallocates,
        drops_temp=verdict.drops_temp,
        cursor_writes=verdict.cursor_writes,
        fetches=verdict.fetches,
        shape_shared=shape_shared,
        has_effects=bool(
            verdict.is_write or verdict.invalidate_all or verdict.changes_session or verdict.cursor_writes
            or verdict.fetches or verdict.transaction_control or verdict.deallocates is not None
            or bool(verdict.prepared)
        ),
        keys=verdict.keys,
        keys_sql=sql if any(k.literals for k in verdict.keys) else "",
        prepared=verdict.prepared,
    )


_own_keys: OrderedDict[str, tuple[KeyRef, ...]] = OrderedDict()


def keys_for(sql: str, info: Classification) -> tuple[KeyRef, ...]:
    """The key conjuncts of `sql` itself. A classification is shared by texts that differ
    only in numbers, so key values written in the text are read again from this text: by
    the parser, or from its digits where the parser has shown, for texts of its shape, which
    digits every key value is (key_shapes.py; a stale read must not hinge on a regex)."""
    refs = info.keys
    if not refs or not info.keys_sql or sql == info.keys_sql:
        return refs
    found = _own_keys.get(sql)
    if found is not None:
        return found
    found = key_shapes.known(sql)
    if found is not None:
        if found and found[0].write:
            return found  # a write's text seldom repeats (new values each time): not kept
    else:
        found = _parsed_keys(sql)
        if found is None:
            found = ()
        else:
            key_shapes.learn(sql, found, _parsed_keys)
    if len(sql) <= MEMO_MAX_CHARS:
        _own_keys[sql] = found
        while len(_own_keys) > MEMO_SIZE // 2:
            _own_keys.popitem(last=False)
    return found


def learn_key_shape(sql: str, info: Classification) -> None:
    """Have key_shapes learn the plan of `sql`'s shape, if it has not (`keys_for` learns it
    only from a second text of a classification: the first answers with its own keys)."""
    refs = keys_for(sql, info)
    if refs:
        key_shapes.learn(sql, refs, _parsed_keys)


def sql_prepares(sql: str) -> list[str]:
    """The names a simple query PREPAREs in SQL (the protocol's namespace too)."""
    try:
        return [str(fields.get("name", "")) for kind, fields in queries.parse(sql) if kind == "PrepareStmt"]
    except queries.ParseError:
        return []


def _parsed_keys(sql: str) -> tuple[KeyRef, ...] | None:
    """The key conjuncts of a one-statement text, by the parser (None: not one statement)."""
    try:
        statements = queries.parse(sql)
        if len(statements) == 1:
            return key_refs(*statements[0])
    except Exception:  # never raises, as classify: no precision instead
        pass
    return None

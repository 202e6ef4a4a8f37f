"""One statement → Verdict, dispatched on its leading keyword.

Utility statements (SET, BEGIN, COPY, LISTEN …) are recognised from tokens: sqlglot parses
many of them as opaque commands or, worse, as something else (``LISTEN x`` becomes an alias),
so only queries and DML are handed to the parser.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlglot.tokenizer_core import Token, TokenType

from neonpoly.cache import queries
from neonpoly.cache.classification import Status, Verdict

_QUERY_STARTS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "("})
_DML_STARTS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
_DDL_STARTS = frozenset(
    {"CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "REFRESH", "SECURITY",
     "IMPORT", "REASSIGN"}
)
# Utility statements that neither read user data nor change it.
_UTILITY = {
    "SHOW": "SHOW depends on session state",
    "LISTEN": "LISTEN", "UNLISTEN": "UNLISTEN",
    "DEALLOCATE": "DEALLOCATE", "DECLARE": "cursor statement", "FETCH": "cursor statement",
    "MOVE": "cursor statement", "CLOSE": "cursor statement",
    "VACUUM": "maintenance statement", "ANALYZE": "maintenance statement",
    "ANALYSE": "maintenance statement", "CHECKPOINT": "maintenance statement",
    "CLUSTER": "maintenance statement", "REINDEX": "maintenance statement",
}
_SIDE_EFFECTS = {"LOCK": "LOCK takes locks", "NOTIFY": "NOTIFY sends a notification"}
_WRITE_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "TRUNCATE"})
_FALSE_WORDS = frozenset({"FALSE", "OFF", "0"})
_SET_FORMS = {
    "ROLE": "role", "NAMES": "client_encoding", "SCHEMA": "search_path",
}


def _words(tokens: Sequence[Token]) -> list[str]:
    return [
        "" if t.token_type in (TokenType.STRING, TokenType.IDENTIFIER) else t.text.upper()
        for t in tokens
    ]


def classify_statement(tokens: Sequence[Token], sql: str) -> Verdict:
    first = tokens[0].text.upper()
    if first in _QUERY_STARTS or first in _DML_STARTS:
        return _parsed(tokens, sql)
    words = _words(tokens)
    first = words[0]
    if first in _DDL_STARTS:
        return Verdict().write(f"{first} statement (DDL) changes the schema", everything=True)
    if first == "TRUNCATE":
        return _truncate(tokens, words)
    if first in ("CALL", "DO"):
        # Server code may also SET ROLE or search_path: the key could not describe that.
        verdict = Verdict().write(f"{first} runs server code that may write", everything=True)
        verdict.changes_session = True
        return verdict
    if first == "EXPLAIN":
        return _explain(tokens, sql, words)
    if first == "COPY":
        return _copy(tokens, words)
    if first in ("SET", "RESET", "DISCARD", "LOAD"):
        return _session(tokens, sql, words)
    if first in ("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT",
                 "RELEASE", "PREPARE"):
        return _transaction(words)
    if first == "EXECUTE":
        # The statement text was sent earlier; it may be a write we cannot name.
        verdict = Verdict().write("EXECUTE of a prepared statement", everything=True)
        verdict.changes_session = True  # it may call a function that changes the session
        return verdict
    if first in _UTILITY:
        return Verdict().refuse(Status.NOTAQUERY, _UTILITY[first])
    if first in _SIDE_EFFECTS:
        return Verdict().refuse(Status.UNCACHEABLE, _SIDE_EFFECTS[first])
    return _unparsed(words, f"unrecognised statement {first[:20]}")


def _unparsed(words: Sequence[str], reason: str) -> Verdict:
    verdict = Verdict().refuse(Status.PARSEERROR, reason)
    # Cannot see inside: assume any write keyword means a write to unknown tables.
    if _WRITE_WORDS.intersection(words) or words[0] not in _QUERY_STARTS:
        verdict.is_write = verdict.invalidate_all = True
    return verdict


def _parsed(tokens: Sequence[Token], sql: str) -> Verdict:
    try:
        tree = queries.parse(tokens, sql)
    except Exception as error:  # sqlglot raises several error types, and RecursionError
        return _unparsed(_words(tokens), f"could not parse: {type(error).__name__}")
    if tree is None:
        return _unparsed(_words(tokens), "could not parse")
    return queries.analyse(tree, Verdict())


def _dotted_name(tokens: Sequence[Token], i: int) -> tuple[tuple[str, str] | None, int]:
    """Read ``[schema.]name`` at i: ((bare, qualified), next index) or (None, i)."""
    parts: list[str] = []
    while i < len(tokens):
        token = tokens[i]
        if token.token_type == TokenType.IDENTIFIER:
            parts.append(token.text)
        elif token.text.replace("_", "a").replace("$", "a").isalnum():
            parts.append(token.text.lower())
        else:
            break
        i += 1
        if i < len(tokens) and tokens[i].token_type == TokenType.DOT:
            i += 1
            continue
        break
    if not parts:
        return None, i
    return (parts[-1], ".".join(parts[-2:])), i


def _truncate(tokens: Sequence[Token], words: Sequence[str]) -> Verdict:
    verdict = Verdict()
    i = 1
    while i < len(tokens):
        if words[i] in ("TABLE", "ONLY", ","):
            i += 1
            continue
        names, i = _dotted_name(tokens, i)
        if names is None or words[i - 1] in ("CASCADE", "RESTRICT", "IDENTITY"):
            break
        verdict.tables_written.add(names[0])
        verdict.qualified.append(names[1])
        if i < len(tokens) and words[i] == "*":
            i += 1
    return verdict.write("TRUNCATE empties tables", everything=True)


def _explain(tokens: Sequence[Token], sql: str, words: Sequence[str]) -> Verdict:
    analyze = False
    i = 1
    if i < len(words) and words[i] == "(":
        depth = 0
        for j in range(i, len(words)):
            depth += {"(": 1, ")": -1}.get(words[j], 0)
            if words[j] in ("ANALYZE", "ANALYSE"):
                analyze = j + 1 >= len(words) or words[j + 1] not in _FALSE_WORDS
            if depth == 0:
                i = j + 1
                break
    while i < len(words) and words[i] in ("ANALYZE", "ANALYSE", "VERBOSE"):
        analyze = analyze or words[i] != "VERBOSE"
        i += 1
    verdict = Verdict().refuse(Status.UNCACHEABLE, "EXPLAIN output depends on planner state")
    if i >= len(tokens):
        return verdict
    inner = classify_statement(tokens[i:], sql)
    verdict.tables_read = inner.tables_read
    verdict.qualified = inner.qualified
    if analyze and inner.is_write:
        # EXPLAIN ANALYZE executes the statement.
        verdict.is_write = True
        verdict.invalidate_all = inner.invalidate_all
        verdict.tables_written = inner.tables_written
        verdict.reason = f"EXPLAIN ANALYZE executes: {inner.reason}"
    return verdict


def _copy(tokens: Sequence[Token], words: Sequence[str]) -> Verdict:
    verdict = Verdict().refuse(Status.UNCACHEABLE, "COPY")
    if len(words) > 1 and words[1] == "(":
        return verdict  # COPY (query) TO …: reads only
    names, i = _dotted_name(tokens, 1)
    if i < len(words) and words[i] == "(":
        i = words.index(")", i) + 1 if ")" in words[i:] else len(words)
    direction = words[i] if i < len(words) else ""
    if names is None or direction not in ("FROM", "TO"):
        return verdict.write("COPY whose table cannot be named", everything=True)
    verdict.qualified.append(names[1])
    if direction == "TO":
        verdict.tables_read.add(names[0])
        return verdict
    verdict.tables_written.add(names[0])
    return verdict.write(f"COPY FROM writes table {names[1]}")


def _transaction(words: Sequence[str]) -> Verdict:
    first, second = words[0], (words[1] if len(words) > 1 else "")
    verdict = Verdict().refuse(Status.NOTAQUERY, "transaction control")
    if first == "PREPARE":
        if second != "TRANSACTION":
            verdict.reason = "PREPARE of a statement"
            return verdict
        verdict.transaction_control = "prepare_transaction"
    elif second == "PREPARED":
        if first == "COMMIT":
            # Makes an earlier, unseen transaction's writes visible.
            return verdict.write("COMMIT PREPARED", everything=True)
        verdict.reason = "ROLLBACK PREPARED"
    elif first in ("BEGIN", "START"):
        verdict.transaction_control = "begin"
    elif first in ("COMMIT", "END"):
        verdict.transaction_control = "commit"
    elif first in ("ROLLBACK", "ABORT"):
        verdict.transaction_control = "rollback_to" if "TO" in words else "rollback"
    elif first == "SAVEPOINT":
        verdict.transaction_control = "savepoint"
    else:
        verdict.transaction_control = "release"
    return verdict


def _value(tokens: Sequence[Token], sql: str) -> str | None:
    if not tokens:
        return None
    if len(tokens) == 1:
        token = tokens[0]
        if token.token_type in (TokenType.STRING, TokenType.IDENTIFIER, TokenType.NUMBER):
            return token.text
        return None if token.text.upper() == "DEFAULT" else token.text.lower()
    return " ".join(sql[tokens[0].start : tokens[-1].end + 1].split())


def _session(tokens: Sequence[Token], sql: str, words: Sequence[str]) -> Verdict:
    first = words[0]
    verdict = Verdict().refuse(Status.NOTAQUERY, f"{first} changes session state")
    verdict.changes_session = True
    if first != "SET" and first != "RESET":
        return verdict
    i = 1
    if len(words) > 2 and words[1] in ("SESSION", "LOCAL") and words[2] not in (
        "AUTHORIZATION", "CHARACTERISTICS"
    ):
        if words[1] == "LOCAL":
            # Lasts until the transaction ends, and caching is off inside transactions.
            verdict.changes_session = False
            verdict.reason = "SET LOCAL lasts only until the end of the transaction"
            return verdict
        i = 2
    rest = words[i:]
    if not rest:
        return verdict
    if rest[0] in ("TRANSACTION", "CONSTRAINTS"):
        verdict.changes_session = False
        verdict.reason = f"{first} {rest[0]} applies to the current transaction only"
        return verdict
    if rest[0] == "ALL" or rest[:2] == ["SESSION", "CHARACTERISTICS"]:
        return verdict
    if rest[:2] == ["SESSION", "AUTHORIZATION"]:
        name, j = "session_authorization", i + 2
    elif rest[:2] == ["TIME", "ZONE"]:
        name, j = "timezone", i + 2
    elif rest[0] in _SET_FORMS:
        name, j = _SET_FORMS[rest[0]], i + 1
    else:
        parsed, j = _dotted_name(tokens, i)
        if parsed is None:
            return verdict
        name = parsed[1] if "." in parsed[1] else parsed[0]
        if j < len(words) and words[j] in ("TO", "="):
            j += 1
    value = None if first == "RESET" else _value(tokens[j:], sql)
    if name == "timezone" and value in ("local",):
        value = None
    verdict.session_setting = (name.lower(), value)
    return verdict

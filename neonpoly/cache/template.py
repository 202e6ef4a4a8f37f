"""Query templates: the SQL with every literal value replaced, for display and grouping.

Built from tokens rather than from sqlglot's regenerated SQL so that a template exists even
when the parser gives up, and so nothing the parser keeps (comments, odd literals) can leak.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Sequence
from typing import ClassVar

from sqlglot.dialects.postgres import Postgres
from sqlglot.tokenizer_core import Token, TokenType


class _TemplateTokenizer(Postgres.Tokenizer):
    """Postgres tokens without "command" swallowing: the stock tokenizer turns the text after
    CALL, EXPLAIN, SHOW … into one string token, which a template would show as one literal."""

    COMMANDS: ClassVar[set[TokenType]] = set()


_local = threading.local()


def tokenize(sql: str) -> list[Token]:
    """Tokens of the whole text; one tokenizer per thread, as a tokenizer holds state."""
    tokenizer: _TemplateTokenizer | None = getattr(_local, "tokenizer", None)
    if tokenizer is None:
        tokenizer = _local.tokenizer = _TemplateTokenizer()
    return tokenizer.tokenize(sql)

LITERAL_TYPES: frozenset[TokenType] = frozenset(
    {
        TokenType.STRING, TokenType.NUMBER, TokenType.BIT_STRING, TokenType.HEX_STRING,
        TokenType.BYTE_STRING, TokenType.NATIONAL_STRING, TokenType.RAW_STRING,
        TokenType.HEREDOC_STRING, TokenType.UNICODE_STRING,
    }
)
_NO_SPACE_BEFORE = frozenset({",", ")", "]", ".", "::", ";"})
_NO_SPACE_AFTER = frozenset({"(", "[", ".", "::"})
# Before "(" these keep their space ("IN (", "AS (") ; other words are function calls.
_SPACED_KEYWORDS = frozenset(
    {
        "IN", "VALUES", "AS", "FROM", "JOIN", "ON", "AND", "OR", "NOT", "WHERE", "SELECT",
        "EXISTS", "USING", "OVER", "ANY", "ALL", "SOME", "WITH", "BY", "THEN", "ELSE",
        "WHEN", "CASE", "RETURNING", "SET", "INTO", "LATERAL", "DISTINCT", "UNION",
        "INTERSECT", "EXCEPT", "TABLE", "IS", "LIKE", "ILIKE", "BETWEEN", "HAVING", "LIMIT",
        "OFFSET", "RECURSIVE", "MATERIALIZED", "CONFLICT", "DO", "UPDATE", "FILTER", "WINDOW",
        "PARTITION", "ORDER", "GROUP", "ROWS", "RANGE", "END", "EXPLAIN", "ANALYZE",
    }
)
# Words printed in upper case; every other unquoted word is folded to lower case, as
# PostgreSQL folds names, so "Name" and "NAME" give one template.
_KEYWORDS = _SPACED_KEYWORDS | frozenset(
    {
        "INSERT", "DELETE", "MERGE", "COPY", "TRUNCATE", "CREATE", "ALTER", "DROP", "BEGIN",
        "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PREPARE", "EXECUTE", "DEALLOCATE",
        "DECLARE", "FETCH", "MOVE", "CLOSE", "SHOW", "RESET", "DISCARD", "LISTEN", "NOTIFY",
        "UNLISTEN", "LOCK", "CALL", "VACUUM", "START", "TRANSACTION", "ABORT", "PREPARED",
        "MATCHED", "NOTHING", "NULL", "TRUE", "FALSE", "ASC", "DESC", "NULLS", "FIRST", "LAST",
        "LEFT", "RIGHT", "INNER", "OUTER", "FULL", "CROSS", "NATURAL", "ONLY", "FOR", "SHARE",
        "NO", "KEY", "SKIP", "LOCKED", "NOWAIT", "OF", "TO", "STDIN", "STDOUT", "CAST",
        "INTERVAL", "DEFAULT", "LOCAL", "SESSION", "AUTHORIZATION", "ROLE", "TIME", "ZONE",
        "CURRENT_USER", "SESSION_USER", "CURRENT_DATE", "CURRENT_TIMESTAMP", "CURRENT_TIME",
        "LOCALTIME", "LOCALTIMESTAMP", "ESCAPE", "SIMILAR", "ISNULL", "NOTNULL",
        "NEXT", "ROW", "ARRAY", "FOLLOWING", "PRECEDING", "UNBOUNDED", "CURRENT", "ORDINALITY",
    }
)
# A sign directly before a number is part of the literal unless it follows an operand.
_OPERAND_ENDS = frozenset({")", "]"})
_SIGN_AFTER = frozenset({"WHEN", "ELSE", "THEN", "RETURN", "INTERVAL", "TO", "DEFAULT"})

_IN_LIST = re.compile(r"\bIN \((?:\?, )*\?\)")
_ARRAY_LIST = re.compile(r"\bARRAY\[(?:\?, )*\?\]")
_VALUES_ROWS = re.compile(r"(\((?:\?, )*\?\))(?:, \1)+")


def _is_operand(token: Token | None) -> bool:
    """Whether a following sign is a binary operator rather than part of a number."""
    if token is None:
        return False
    text = token.text.upper().rsplit(None, 1)[-1] if token.text.strip() else ""
    if text in _SPACED_KEYWORDS or text in _SIGN_AFTER:
        return False
    if text in _OPERAND_ENDS or token.token_type in LITERAL_TYPES:
        return True
    # Words (names, type names like INT, keywords used as names) end an operand.
    return text[:1].isalnum() or text[:1] in ('"', "_")


def _piece(token: Token) -> str:
    if token.token_type == TokenType.IDENTIFIER:
        return '"' + token.text.replace('"', '""') + '"'
    if token.token_type in LITERAL_TYPES:
        return "?"
    return _word(token.text)


@functools.lru_cache(maxsize=4096)
def _word(raw: str) -> str:
    """Spelling of a non-literal, unquoted token (memoised: the vocabulary is small)."""
    text = " ".join(raw.split())
    if " " in text:
        return text.upper()  # multi-word keywords such as ORDER BY, GROUP BY, UNION ALL
    if "'" in text or "$" in text:
        # A token type this module does not know carrying quote characters is a literal.
        return "?"
    if _looks_like_name(text):
        return text.upper() if text.upper() in _KEYWORDS else text.lower()
    return text.upper()


def _pieces(tokens: Sequence[Token]) -> list[str]:
    out: list[str] = []
    i = 0
    prev: Token | None = None
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if token.token_type == TokenType.PARAMETER and nxt is not None and (
            nxt.token_type == TokenType.NUMBER and nxt.start == token.end + 1
        ):
            out.append("$" + nxt.text)
            prev, i = nxt, i + 2
            continue
        if (
            token.token_type in (TokenType.DASH, TokenType.PLUS)
            and nxt is not None
            and nxt.token_type == TokenType.NUMBER
            and not _is_operand(prev)
        ):
            out.append("?")
            prev, i = nxt, i + 2
            continue
        out.append(_piece(token))
        prev, i = token, i + 1
    return out


def _join(pieces: list[str]) -> str:
    parts: list[str] = []
    for index, piece in enumerate(pieces):
        if index:
            before = pieces[index - 1]
            glued = piece in _NO_SPACE_BEFORE or before in _NO_SPACE_AFTER
            if piece in ("(", "[") and before not in _SPACED_KEYWORDS:
                glued = glued or _looks_like_name(before)
            if not glued:
                parts.append(" ")
        parts.append(piece)
    return "".join(parts)


def _looks_like_name(piece: str) -> bool:
    return piece[:1].isalpha() or piece[:1] in ('"', "_")


def _collapse(text: str) -> str:
    text = _IN_LIST.sub("IN (?)", text)
    text = _ARRAY_LIST.sub("ARRAY[?]", text)
    return _VALUES_ROWS.sub(r"\1, ...", text)


def template_from_tokens(statements: Sequence[Sequence[Token]]) -> str:
    """Template of already split statements, joined by "; "."""
    return "; ".join(_collapse(_join(_pieces(tokens))) for tokens in statements if tokens)


_REDACT = re.compile(
    r"""
    (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<param>\$\d+)
    |(?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?(?:\$(?P=tag)\$|\Z))
    |(?P<estring>[Ee]'(?:[^'\\]|\\.|'')*(?:'|\Z))
    |(?P<string>(?:[BbXxNn]|[Uu]&)?'(?:[^']|'')*(?:'|\Z))
    |(?P<ident>"(?:[^"]|"")*(?:"|\Z))
    |(?P<number>(?<![\w$])(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<word>[A-Za-z_][A-Za-z_0-9$]*)
    |(?P<space>\s+)
    """,
    re.VERBOSE | re.DOTALL,
)


def template_by_regex(sql: str) -> str:
    """Best-effort template for text the tokenizer rejected; errs towards redacting more."""
    out: list[str] = []
    pos = 0
    for match in _REDACT.finditer(sql):
        if match.start() > pos:
            out.append(sql[pos : match.start()])
        kind = match.lastgroup if match.lastgroup != "tag" else "dollar"
        text = match.group()
        if kind in ("comment", "space"):
            out.append(" ")
        elif kind == "ident":
            # An unterminated quoted name swallows the rest of the text: redact it.
            out.append(text if len(text) > 1 and text.endswith('"') else "?")
        elif kind in ("dollar", "estring", "string", "number"):
            out.append("?")
        elif kind == "word":
            out.append(text.upper() if text.upper() in _KEYWORDS else text.lower())
        else:
            out.append(text)
        pos = match.end()
    out.append(sql[pos:])
    return _collapse(" ".join("".join(out).split()))


def template_id(template: str) -> str:
    """Stable across processes (unlike hash()): 16 hex digits of BLAKE2b."""
    return hashlib.blake2b(template.encode("utf-8"), digest_size=8).hexdigest()

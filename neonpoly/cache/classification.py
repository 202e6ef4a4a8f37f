"""The cache-status taxonomy and the verdict on one SQL string (no sqlglot here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from neonpoly.cache.keys import KeyRef


class Status(StrEnum):
    """The one taxonomy of cache outcomes, used in logs, admin, TUI and metrics."""

    HIT = "hit"
    MISS = "miss"
    UNCACHEABLE = "uncacheable"
    MULTIPLESTATEMENTS = "multiplestatements"
    NOTAQUERY = "notaquery"
    PARSEERROR = "parseerror"
    TRANSACTION = "transaction"
    VOLATILE = "volatile"
    OVERSIZEDRESULT = "oversizedresult"
    DISABLED = "disabled"
    BYPASS = "bypass"


@dataclass(frozen=True, slots=True)
class Classification:
    """What the policy knows about a SQL string before it is sent."""

    cacheable: bool
    status: Status | None
    reason: str
    is_write: bool
    tables_read: frozenset[str]
    tables_written: frozenset[str]
    qualified_tables: tuple[str, ...]
    invalidate_all: bool
    changes_session: bool  # the session must learn its identity again (see proxy/identity.py)
    transaction_control: str | None
    template: str
    template_id: str
    # Builtins trusted by name ("lower()", "operator =", "type text"): safe only in a database
    # where no object of that name exists outside pg_catalog (see cache/relations.py).
    shadowable: frozenset[str] = frozenset()
    cluster_wide: bool = False  # roles, grants, databases: every database's entries may change
    settings_read: frozenset[str] = frozenset()  # current_setting('name'): part of the identity
    copy: bool = False
    deallocates: str | None = None  # a statement name, or "*" for all of them
    # DISCARD TEMP/ALL: drops the session's temporary objects, which other sessions' catalog
    # helpers (to_regclass('pg_temp_3.t'), a regclass cast) see; no DDL statement says so.
    drops_temp: bool = False
    cursor_writes: bool = False  # DECLARE over a query that may write: its FETCHes write
    fetches: bool = False  # FETCH/MOVE
    shape_shared: bool = False  # texts differing only in numbers may share this classification
    # Anything the session must act on before sending it (evict, learn the session again,
    # track a cursor or a commit): False for plain reads, the hot path.
    has_effects: bool = True
    # Ways the statement is confined to rows of one key (cache/keys.py), with the text their
    # literals were read from: a text sharing this classification reads its own (policy.keys_for).
    keys: tuple[KeyRef, ...] = ()
    keys_sql: str = ""
    # Two-phase commit: ("prepare", gid) for PREPARE TRANSACTION, ("end", gid) for COMMIT or
    # ROLLBACK PREPARED, each of a query string's in order (it may prepare two, or prepare and
    # then fail). What a prepared transaction wrote is not stored until it ends.
    prepared: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Verdict:
    """One statement's findings while classifying; folded into a Classification."""

    cacheable: bool = False
    status: Status | None = None
    reason: str = ""
    is_write: bool = False
    tables_read: set[str] = field(default_factory=set)
    tables_written: set[str] = field(default_factory=set)
    qualified: list[str] = field(default_factory=list)
    invalidate_all: bool = False
    changes_session: bool = False
    transaction_control: str | None = None
    shadowable: set[str] = field(default_factory=set)
    settings_read: set[str] = field(default_factory=set)
    cluster_wide: bool = False
    copy: bool = False
    deallocates: str | None = None
    drops_temp: bool = False
    cursor_writes: bool = False
    fetches: bool = False
    keys: tuple[KeyRef, ...] = ()
    prepared: tuple[tuple[str, str], ...] = ()

    def refuse(self, status: Status, reason: str) -> Verdict:
        """Mark uncacheable, keeping the first reason found."""
        if self.status is None:
            self.status, self.reason = status, reason
        self.cacheable = False
        return self

    def write(self, reason: str, *, everything: bool = False) -> Verdict:
        self.is_write = True
        self.invalidate_all = self.invalidate_all or everything
        return self.refuse(Status.UNCACHEABLE, reason)

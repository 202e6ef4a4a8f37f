"""What a session is waiting for from the origin (or has answered itself), in order.

Every request that ends in ReadyForQuery (a simple Query, an extended batch up to Sync, a
FunctionCall) gets one `Pending`. Responses must reach the client in request order, so an
answer the cache produces while origin answers are still outstanding waits in this queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from neonpoly.cache.capture import Capture, StatTicket
from neonpoly.proxy.extended import BookOp

if TYPE_CHECKING:
    from neonpoly.cache.holds import PreparedHolds
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.proxy.hits import HitMemo
    from neonpoly.proxy.identity import Identity


@dataclass(slots=True, frozen=True)
class WriteMemo:
    """What a keyed write of one shape was decided on, and what it did (writes.py)."""

    cache: QueryCache
    identity: Identity  # the very object (writes.py)
    relations_version: int
    database: str
    table: str
    sources: tuple[tuple[int, int], ...]  # the key values: (run of the text, sign) each
    writes: frozenset[str]  # Pending.writes: its tables but the keyed one (none)
    extra: frozenset[str]  # what a write of the table reaches beyond it (cascades): whole
    ticket: StatTicket  # nothing in it depends on the text
    shape: tuple[str, ...]  # what it is kept by (key_shapes.shape_of)
    pattern: re.Pattern[str]  # the texts of that shape (key_shapes.matcher)


@dataclass(slots=True)
class Pending:
    started: float
    local: bytes | None = None  # a response the proxy answers itself, waiting its turn
    capture: Capture | None = None
    swallow: int = 0  # ParseCompletes of Parses the proxy sent on the client's behalf
    # Parses and Closes sent (neonpoly's deferred ones first), in the order the origin answers
    # them with ParseComplete/CloseComplete; `confirmed` of them answered so far. The rest
    # were refused or skipped when the response ends (StatementBook.settle).
    book_ops: list[BookOp] = field(default_factory=list)
    confirmed: int = 0
    deallocates: list[BookOp] = field(default_factory=list)  # confirmed by the response ending cleanly
    writes: frozenset[str] = frozenset()
    writes_everything: bool = False
    # (table, generation name) of writes confined to key values (cache/keys.py); their tables
    # are not in `writes` unless also written otherwise.
    keyed: frozenset[tuple[str, str]] = frozenset()
    commits: bool = False  # COMMIT (also AND CHAIN): the transaction's writes are now visible
    prepared: tuple[tuple[str, str], ...] = ()  # two-phase commit (Classification.prepared)
    # Where the holds stood when a COMMIT or ROLLBACK PREPARED of it was sent: its release
    # keeps a hold of the gid taken since (QueryCache.release_prepared). None: none sent.
    holds_taken: dict[PreparedHolds, int] | None = None
    # Relations it reads that were not known when it was sent: judged when it completes.
    reads: frozenset[str] = frozenset()
    trusts: frozenset[str] = frozenset()  # builtins it trusted by name, likewise judged then
    error: bool = False
    neutral: bool = False  # a plain read: cannot change the transaction status or settings
    # A batch ended by Flush has no ReadyForQuery: it ends after `expect` more messages
    # (None once an error means the origin now skips to the next Sync's ReadyForQuery).
    flush: bool = False
    expect: int | None = None
    # A stream cut by a simple Query before its Sync (batches.py `_query_in_batch`): its
    # `expect` counts only the messages that end each request's answer (rows are not counted).
    ends_only: bool = False
    streaming: bool = False  # an open stream's: answers counted as they come (`answered`)
    answers: int = 0  # a stream's: the answer-ending messages of what it forwarded so far
    answered: int = 0  # of those, the ones the origin sent
    # A simple Query sent inside an extended batch before its Sync: PostgreSQL skips it,
    # unanswered, when a message of the batch before it failed (it skips to the Sync).
    in_batch: bool = False
    stats: list[StatTicket] = field(default_factory=list)
    # neonpoly's own catalog lookups (cache/relations.py, identity.py): swallowed, never forwarded.
    lookup: list[str] | None = None
    identity: frozenset[str] | None = None  # the session-identity lookup, with the settings it asks
    rows: list[list[bytes | None]] = field(default_factory=list)
    memo: HitMemo | None = None  # the hit memo whose entry was gone and that sent this miss
    # A keyed write decided from its shape's memo, and the names it bumped (writes.py).
    by_memo: tuple[WriteMemo, frozenset[str]] | None = None

    def two_phase_sent(self, prepared: tuple[tuple[str, str], ...], cache: QueryCache | None) -> None:
        """Its two-phase commit steps, as it is sent: an end of one notes where the holds stand."""
        self.prepared += prepared
        if self.holds_taken is None and cache is not None and any(kind == "end" for kind, _ in prepared):
            self.holds_taken = cache.holds_taken()

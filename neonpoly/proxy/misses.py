"""A request's cache decision, and the memo that decides a miss again without its checks.

`CacheDecisions._cache_decision` judges a request from its classification (or its batch's
plan), the session and the cache. A stream of new texts of one shape (pgbench -S: a new key
value every time, nearly every one a miss) or a prepared statement run with new values gets
the very same classification or plan object each time (cache/policy.py's shape memo,
`StatementBook.plan_shaped`), and while nothing else the decision read has moved, the same
MISS. So a session remembers, per such object, what a MISS rested on (`MissMemo`), and
`MissMemo.holds` answers with that decision when each of those things is still the same
object or number: the arguments, the cache, the session's identity (its settings and
schemas with it) and the cache's DDL epoch, the catalog's resolution of what it reads, the
TTL rules (`QueryCache.refusals_version`), and the session's state (idle, no bypass, text
read as the server reads it, nothing outstanding that may change the transaction).

Only a MISS with a resolution is remembered: that path of `_cache_decision` changes nothing
(no identity forgotten, no catalog lookup sent, nothing set on the request), so answering it
from the memo leaves the session exactly as deciding it again would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from neonpoly.cache.policy import Status
from neonpoly.pgwire import TX_IDLE

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.cache.relations import Resolution
    from neonpoly.proxy.identity import Identity
    from neonpoly.proxy.state import SessionState

# Memos a session keeps (one per classification or plan it decided a miss of); past it,
# forgotten all at once. A forgotten memo only costs the full decision once more.
MAX_MISS_MEMOS = 64


# Not frozen: one is made for every request, and a frozen dataclass's __init__ (one
# object.__setattr__ per field) costs four times a plain one's. Nothing changes it once made.
@dataclass(slots=True)
class Decision:
    status: Status
    reason: str  # an explanation for SHOW QUERIES and the console ("" for a miss)
    resolution: Resolution | None = None  # what the catalog said, for a miss to be stored


@dataclass(slots=True, eq=False)
class MissMemo:
    """What a MISS of `source` (a Classification or a BatchPlan) was decided on."""

    source: object  # held: while it is, no other object has its id (the memos' key)
    template_id: str
    tables: frozenset[str]
    shadowable: frozenset[str]
    settings: frozenset[str]
    cache: QueryCache
    identity: Identity
    rules: int  # cache.refusals_version() before it was decided
    decision: Decision

    def holds(
        self,
        source: object,
        template_id: str,
        tables: frozenset[str],
        shadowable: frozenset[str],
        settings: frozenset[str],
        cache: QueryCache | None,
        state: SessionState,
        busy: bool,
    ) -> bool:
        """Would `_cache_decision` say this MISS again now (with no refusal given)? Each
        check is one of its own, in its order; `busy`: requests are outstanding and one may
        change the transaction (`_busy`)."""
        identity = state.identity
        if (
            identity is None
            or source is not self.source
            or cache is not self.cache
            or identity is not self.identity
            or identity.epoch != cache.ddl_epoch
            or template_id is not self.template_id
            or tables is not self.tables
            or shadowable is not self.shadowable
            or settings is not self.settings
            or state.bypass is not None
            or state.legacy_strings
            or state.tx_status != TX_IDLE
            or busy
            or cache.refusals_version() != self.rules
        ):
            return False
        # The catalog's answer: its memo hands out the same object until it learns or forgets.
        return (
            not (tables or shadowable)
            or cache.relations.resolve(state.database, tables, shadowable, identity.schemas) is self.decision.resolution
        )

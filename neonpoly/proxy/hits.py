"""Repeated hits answered from one lookup of the request's raw bytes.

A client re-running a query sends the same bytes again: a simple Query, or a prepared
statement's Bind/Describe/Execute/Sync (pgbench -M prepared, asyncpg and psycopg statement
caches). Once such a request was answered from the cache, the session remembers what that
decision rested on (`HitMemo`). The next time a read holds exactly those bytes, the relay
checks that nothing it rested on moved and looks the key up, without parsing a message,
classifying, planning or hashing a key again (`Relay._answer_memo`).

Most of those checks are a comparison each. Two answers are kept on the memo and asked again
only when they may have moved: the entry served last (with its reply, payload and
ReadyForQuery, built once), served again while the store says `get` would return that very
entry, live (`QueryCache.serves`: the plane's gate, TTL, generations; anything else, such as
a template purge or another entry stored for the key, goes through `lookup_entry`); and that
the TTL rules do not say never, asked again when the rule book moves (`refusals_version`).

Only plain reads are remembered: requests that write, change the session, commit, fetch from
cursors, deallocate, parse or close statements always take the full path.

When every check holds but the store has no entry any more (a write made it stale: the read
that follows a write), a simple Query's memo also carries its frame and classification,
and the miss is sent and captured from those (`CacheDecisions._memo_miss`): the checks that
held are the very ones that make the full path decide a miss of the same key, so deciding it
again would only repeat them (and ask the store a second time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neonpoly.cache.bypass import LookupScore
    from neonpoly.cache.entry import CacheEntry
    from neonpoly.cache.policy import Classification
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.cache.relations import Resolution
    from neonpoly.proxy.identity import Identity
    from neonpoly.stats import HitTally

# Per session: the hot set of one client. Only hits are remembered (a few hundred bytes each).
MAX_MEMOS = 2048


# Not frozen: the entry last served and its reply are kept on it (nothing else changes).
@dataclass(slots=True)
class HitMemo:
    """What a hit was decided on, each part checked again before the next one is served."""

    cache: QueryCache
    key: bytes
    identity: Identity  # the very object: a session that learns its identity again gets a new one
    book_version: int  # the session's prepared statements, unchanged
    database: str
    tables: frozenset[str]
    shadowable: frozenset[str]
    # What the catalog said (the very object the relation book memoises; None: nothing to ask).
    resolution: Resolution | None
    template_id: str
    tallies: tuple[HitTally, ...]  # where its hits are counted, one per Execute
    score: LookupScore  # its template's lookups (cache/bypass.py): its hits count there too
    # The entry last served, and its payload + ReadyForQuery as sent: served again only
    # while the store says it would answer with that very entry (QueryCache.serves).
    entry: CacheEntry | None = None
    reply: bytes = b""
    # The rules said the template is cached (QueryCache.caches) under this refusals version
    # (QueryCache.refusals_version): asked again only when it moves. Not `ttl_for`, which
    # reads the clock and the feed to report the TTL it would store now; a hit stores
    # nothing (the console's TTL column moves with the misses that store).
    ttl_version: int | None = None
    # A simple Query's frame (the memo's own key, no copy) and classification: when the entry
    # is gone (a write made it stale), its miss is sent and captured from here
    # (CacheDecisions._memo_miss) instead of being decided again. None (a prepared
    # statement's batch): the full path, or its shape's BatchMemo (batches.py).
    query: tuple[bytes, Classification] | None = None
    # The generation names its misses are stamped with (cache/keys.py read_names), worked out
    # at the first: they rest on its text and on what the relation book says of the tables
    # it reads (their key columns), which stands while `resolution` is the very object the
    # book answers (`Relay._answer_memo` checks it first: a book that learns or forgets
    # answers with new ones). None: not worked out yet.
    names: frozenset[str] | None = None
    # The relation book's version (RelationBook.version) when it last answered with
    # `resolution` itself: while it stands, the book learnt, was refused and forgot nothing
    # (each moves it and clears its answers, so a moved book never answers with this object
    # again), and would answer alike: a repeat is spared the resolve (a tuple hashed and
    # looked up, ~1.5k instructions of a ~36k hit). -1: not asked yet.
    relations_version: int = -1


# What `hit_seen` is reset to before a call that may set it: typed, unlike a literal None, so
# mypy does not take the attribute for None after the call (it would call the check that
# follows unreachable, and not type-check it; a mypyc build would fail there).
NO_HIT: HitMemo | None = None


def hit_tallies(cache: QueryCache, infos: list[tuple[str, str, tuple[str, ...]]]) -> tuple[HitTally, ...]:
    return tuple(cache.stats.tally(cache.cache_id, template_id, template, tables)
                 for template_id, template, tables in infos)  # fmt: skip

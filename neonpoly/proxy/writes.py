"""Repeated writes by primary key decided from one lookup of their text's shape.

A client writing by key (`UPDATE t SET v = v + 17 WHERE id = 42`) sends a new text each
time, with new numbers. The full path (`CacheDecisions._query`) classifies it, reads its key
values, asks the catalog whether the key and the builtins it trusts are what they seem,
what the table reaches, and decides it is not cached: about ten times the work of a hit,
all of it, but the key value, the same for every text of the same shape.

So once the full path has decided a keyed write, the session remembers that decision by the
text's shape (`key_shapes.shape_of`: the text between its integer literals, the shape
`policy.classify` shares one classification by, and the one whose key values key_shapes has
learnt to read from its digits). A later text of that shape is decided from the memo: its key
value read from its digits, the same names bumped, the same statistics kept, when everything
the decision rested on still holds, each checked before use:

* the route's cache is the memo's;
* the session's identity is the very object the memo was made under, and its DDL epoch is
  the cache's: any SET, role change, DDL or other session change makes the session learn
  its identity again (a new object), and DDL anywhere moves the epoch;
* the cache's relation book has not moved (`RelationBook.version`: it moves whenever it
  learns, is refused or forgets): the key column, what the table reaches, whether a builtin
  it trusts may be the user's and whether reading it runs code are the answers of then;
* the session does not read its strings another way (`legacy_strings`);
* no earlier request still outstanding is judged only when it completes (`_identity_pending`).

Anything else falls back to the full path, which makes a new memo. Only a write the full
path decided as keyed on one table, with no session effect (no SET, transaction control,
cursor, DEALLOCATE, nor the word PREPARE anywhere), and whose eviction did not widen to the
whole database, is remembered. When it completes outside a transaction with nothing else to settle, it is
evicted again from the same memo (checked again: a catalog that moved in between gets the
full path's answer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from neonpoly.cache import key_shapes, keys
from neonpoly.cache.policy import learn_key_shape
from neonpoly.pgwire import TX_IDLE
from neonpoly.proxy.learning import IdentityLearning
from neonpoly.proxy.pending import Pending, WriteMemo

if TYPE_CHECKING:
    from neonpoly.cache.policy import Classification
    from neonpoly.cache.query_cache import QueryCache

# Per session: the write templates of one client (a few hundred bytes each).
MAX_WRITE_MEMOS = 256
# What a text that may be a keyed write starts with (UPDATE, DELETE, INSERT): other texts,
# reads most of all, are not split into a shape to look for a memo.
WRITE_INITIALS = frozenset("UDIudi")
# Memos tried by their pattern before a text's shape is worked out: a client's few write
# shapes (pgbench's UPDATE is two: `+ 5` and `+ -5`, the sign not being a number's).
RECENT_WRITE_SHAPES = 4


class WriteMemos(IdentityLearning):
    # The open transaction's writes (CacheDecisions): a write completing inside one, or
    # after others, is settled by `_complete`.
    tx_writes: set[str]
    tx_keyed: set[tuple[str, str]]
    tx_writes_everything: bool

    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        self.write_memos: dict[tuple[str, ...], WriteMemo] = {}  # by the shape of their text
        self.write_recent: list[WriteMemo] = []  # the last few used, the latest first (`_recent`)

    def _write_by_memo(self, sql: str, raw: bytes, out: list[bytes]) -> bool:
        """Decide and send a keyed write from its shape's memo; False (nothing done): no memo,
        or one whose grounds moved."""
        # The shapes this session wrote last, tried first: one literal comparison each, where
        # `shape_of` scans the text twice with regexes (a fifth of a remembered write's CPU).
        runs: Sequence[str] | None = None
        for memo in self.write_recent:
            runs = key_shapes.runs_by(memo.pattern, sql)
            if runs is not None:
                break
        if runs is None:
            found = key_shapes.shape_of(sql)
            if found is None:
                return False
            shape, runs = found
            kept = self.write_memos.get(shape)
            if kept is None:
                return False
            memo = kept
            self._recent(memo)
        cache = memo.cache
        state = self.state
        identity = state.identity
        route = self.route
        if (
            route is None
            or route.cache is not cache
            or identity is not memo.identity
            or self._identity_pending()
            or identity.epoch != cache.ddl_epoch
            or cache.relations.version != memo.relations_version
            or state.legacy_strings
            or state.database != memo.database
        ):
            return False
        pairs, names = keys.write_pairs_and_names(memo.table, [sign * int(runs[i]) for i, sign in memo.sources])
        if memo.extra:
            names = names | memo.extra
        # Keywords to Pending's 27-field __init__ cost more than setting the fields after it.
        item = Pending(time.monotonic())
        item.writes = memo.writes
        item.keyed = pairs
        item.stats.append(memo.ticket)
        item.by_memo = (memo, names)
        self.book.simple_query()
        # As `_invalidate` evicts a keyed write: its keys, and whole what the table reaches.
        cache.invalidate_rows(memo.database, names)
        self.pending.append(item)
        out.append(raw)
        self.batch_open = False
        return True

    def _recent(self, memo: WriteMemo) -> None:
        """Try this memo first for the next texts; it takes the place of its shape's older one
        (which `write_memos` no longer holds: it must not be found for the shape again)."""
        recent = self.write_recent
        for at, old in enumerate(recent):
            if old.shape == memo.shape:
                del recent[at]
                break
        else:
            if len(recent) >= RECENT_WRITE_SHAPES:
                recent.pop()
        recent.insert(0, memo)

    def _identity_pending(self) -> bool:
        """Whether an earlier request still outstanding is judged only when it completes (it
        reads relations, or trusts builtins, the catalog had not described when it was sent):
        it may run code of the user's that changes the search_path (a view calling set_config)
        before a write sent behind it runs, and the session learns that only then. Its
        completion evicts what it may have written, but not what that write then changes."""
        return bool(self.pending) and any(p.reads or p.trusts for p in self.pending)

    def _remember_write(self, sql: str, info: Classification, item: Pending, cache: QueryCache) -> None:
        """After the full path sent a write: remember it by its shape when it was decided as a
        keyed write of one table that a later text of the shape can be decided like."""
        if (
            not info.shape_shared
            or info.invalidate_all
            or info.changes_session
            or info.cursor_writes
            or info.fetches
            or info.cluster_wide
            or info.transaction_control is not None
            or info.deallocates is not None
            or item.writes_everything
            or item.reads
            or item.trusts
            or len(item.stats) != 1
            or len(info.tables_written) != 1
        ):
            return
        state = self.state
        identity = state.identity
        if identity is None or identity.epoch != cache.ddl_epoch or state.legacy_strings:
            return
        found = key_shapes.shape_of(sql)
        if found is None:
            return
        shape, runs = found
        plan = key_shapes.plan_of(shape)
        if plan is None:
            learn_key_shape(sql, info)
            plan = key_shapes.plan_of(shape)
        if not plan:
            return
        database = state.database
        relations = cache.relations
        (table,) = info.tables_written
        column = relations.key_column(database, table)
        reach = relations.reach(database, (table,))
        if column is None or reach is None:
            return
        # The conjunct `_keyed_write` takes: the first of the key column, of literals alone.
        chosen = next((p for p in plan if p.write and p.table == table and p.column == column), None)
        if chosen is None or chosen.params or not chosen.sources:
            return
        values = [sign * int(runs[i]) for i, sign in chosen.sources]
        if keys.write_pairs(table, values) != item.keyed or item.writes != info.tables_written - {table}:
            return  # not what the full path did for this very text: leave it to the full path
        if len(self.write_memos) >= MAX_WRITE_MEMOS:
            self.write_memos.clear()
        memo = self.write_memos[shape] = WriteMemo(
            cache, identity, relations.version, database, table, chosen.sources, item.writes,
            reach - {table}, cache.counted_ticket(item.stats[0]), shape, key_shapes.matcher(shape),
        )  # fmt: skip
        self._recent(memo)

    def _complete_by_memo(self, item: Pending, names: frozenset[str], memo: WriteMemo) -> bool:
        """A write sent from its memo ended outside a transaction, with no earlier write of the
        transaction to settle: evicted again (the write is visible to others only now) and
        counted. False (nothing done): anything else, for `_complete`."""
        cache = memo.cache
        route = self.route
        if (
            self.state.tx_status != TX_IDLE
            or self.tx_writes
            or self.tx_keyed
            or self.tx_writes_everything
            or item.writes_everything
            or route is None
            or route.cache is not cache
            or cache.relations.version != memo.relations_version
        ):
            return False
        cache.invalidate_rows(memo.database, names)
        barrier = cache.reply_barrier
        if barrier is not None and (hold := barrier()) is not None:
            self.hold_client(hold)  # the reply waits until other nodes applied the bumps
        elapsed = time.monotonic() - item.started
        for ticket in item.stats:
            cache.record(ticket, elapsed, 0)
        return True

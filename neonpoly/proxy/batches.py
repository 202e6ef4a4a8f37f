"""Extended-protocol batches: every message up to Sync, decided on as a whole.

The relay collects Parse/Bind/Describe/Execute/Close in a `BatchBuffer` (extended.py). At
Sync the batch is planned and either answered from the cache or forwarded, preceded by any
Parse the origin lacks. A batch that cannot wait for its Sync (a Flush that wants answers,
COPY, a pipeline that never syncs) is streamed instead: forwarded as it arrives, never cached.
"""

from __future__ import annotations

import asyncio
import time

from neonpoly import pgwire
from neonpoly.cache.capture import StatTicket
from neonpoly.cache.policy import Status
from neonpoly.pgwire import MSG_BIND, MSG_CLOSE, MSG_PARSE
from neonpoly.proxy.decisions import CacheDecisions
from neonpoly.proxy.extended import BATCHED, BatchBuffer, BatchPlan
from neonpoly.proxy.pending import Pending


class BatchHandling(CacheDecisions):
    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        self.batch = BatchBuffer(self.book)

    def _sync(
        self, raw: bytes, out: list[bytes], expect: int | None = None, raw_batch: bytes | None = None
    ) -> None:
        """Decide on a whole batch at its Sync (or at a Flush, `expect` answers long);
        `raw_batch` is the batch's messages as received, when the relay has them in one piece."""
        if self.stream is not None:
            out.append(raw)
            self.stream = None
            self.batch_open = False
            self.book.synced()
            return
        batch = self.batch.take()
        flush = expect is not None
        # A driver re-running a prepared statement sends the same messages with other values:
        # planned once per shape (StatementBook.plan_shaped), whatever the values.
        plan, material = self.book.plan_shaped(batch)
        item = Pending(time.monotonic(), flush=flush, expect=expect)
        info = plan.primary
        if not plan.quiet or self.state.legacy_strings:  # a batch of plain reads has none
            self._plan_effects(plan, item, out, batch)
        refusal = (plan.status, plan.reason) if plan.status is not None else None
        if refusal is None and info is not None and not info.cacheable:
            refusal = (info.status or Status.UNCACHEABLE, info.reason)
        template = info.template_id if info is not None else ""
        decision = self._cache_decision(refusal, template, plan.tables, plan.shadowable, item, out, plan.settings_read)
        status, reason = decision.status, decision.reason
        if flush and status is Status.MISS and any(t == MSG_BIND for t, _ in batch):
            # Its portal must exist at the origin for the Execute that follows the Flush.
            status, reason = Status.UNCACHEABLE, "a Flush before Sync needs the portal at the origin"
        cache = self.route.cache if self.route else None
        if status is Status.MISS and cache is not None and (plan.executes or info is not None):
            # The tag (b"H"/b"X": a batch ended by Flush/Sync) is part of every stored key.
            key = cache.key(self.state.context(), (b"H" if flush else b"X") + material)
            payload = cache.lookup(key)
            # Not after messages ended by Flush went to the origin (asyncpg's Parse/Describe/
            # Flush): it runs them in an implicit transaction that only their Sync ends, and
            # answered here that Sync would never reach it (its locks held, invalidations unread).
            if payload is not None and not plan.forward and not self._busy() and not self.batch_open:
                self.book.after_local(plan)
                if plan.executes:
                    self._answer_locally(payload, plan.executed, item)
                else:
                    self._answer_quietly(payload, item)
                if not flush and _plain(plan) and all(t != MSG_PARSE and t != MSG_CLOSE for t, _ in batch):
                    self._note_hit(cache, key, decision.resolution, template, plan.tables, plan.shadowable,
                                   plan.executed if plan.executes else [])
                return
            item.capture = self._capture(cache, key, decision.resolution, template, batch)
        # Not neutral while the catalog has not described what it reads: it may run code.
        item.neutral = status is Status.MISS and not (item.reads or item.trusts)
        if status is Status.MISS and cache is not None:
            item.stats.extend([cache.miss_ticket(i.template_id, i.template, i.qualified_tables) for i in plan.executed])
        else:
            item.stats.extend(
                [StatTicket(i.template_id, i.template, i.qualified_tables, str(status), reason) for i in plan.executed]
            )
        deferred = self.book.deferred_parses(plan, item.book_ops) if plan.parses or plan.needs else []
        item.swallow = len(deferred)
        if plan.ops:  # Parses and Closes to confirm
            item.book_ops.extend(self.book.after_forward(plan))
        if plan.deallocates:
            item.deallocates.extend(self.book.deallocating(name) for name in plan.deallocates)
        self.pending.append(item)
        out.extend(deferred)
        if raw_batch is not None:
            out.append(raw_batch)
        else:
            out.extend(pgwire.frame(t, b) for t, b in batch)
        out.append(raw)
        self.batch_open = flush  # a Flush leaves the batch (its portals, its transaction) open
        if not flush:
            self.book.synced()

    def _plan_effects(
        self, plan: BatchPlan, item: Pending, out: list[bytes] | None, batch: list[tuple[int, bytes]] | None = None
    ) -> None:
        """A batch's writes evict before it is sent; session changes make the session learn
        its identity again (as `_note_effects` for a simple query)."""
        everything = plan.writes_everything or self.state.legacy_strings
        if plan.fetches and self.writing_cursors:
            everything = True
        if plan.cursor_writes:
            self.writing_cursors = True
        if plan.writes or everything:
            writes, keyed = plan.writes, frozenset[tuple[str, str]]()
            cache = self.route.cache if self.route else None
            if batch and not everything and cache is not None:
                writes, keyed = self._batch_keyed(cache, plan.writes, batch)  # by primary key
            item.writes = item.writes | writes
            item.keyed = item.keyed | keyed
            item.writes_everything = item.writes_everything or everything
            self._invalidate(writes, everything, out, cluster_wide=plan.cluster_wide, keyed=keyed)
        item.commits = item.commits or plan.commits
        if plan.changes_session or everything:
            self._forget_identity()

    def _open_stream(self, out: list[bytes]) -> None:
        """Forward the batch so far and everything up to its Sync as it arrives."""
        batch = self.batch.take()
        plan = self.book.plan(batch)
        item = Pending(time.monotonic())
        self._plan_effects(plan, item, out)
        self._cache_decision((Status.BYPASS, ""), "", plan.tables, plan.shadowable, item, out)
        status, reason = (plan.status, plan.reason) if plan.status else (Status.BYPASS, "streamed before its Sync")
        item.stats.extend(
            StatTicket(i.template_id, i.template, i.qualified_tables, str(status), reason) for i in plan.executed
        )
        deferred = self.book.deferred_parses(plan, item.book_ops)
        item.swallow = len(deferred)
        item.book_ops.extend(self.book.after_forward(plan))
        item.deallocates.extend(self.book.deallocating(name) for name in plan.deallocates)
        self.pending.append(item)
        self.stream = item
        out.extend(deferred)
        out.extend(pgwire.frame(t, b) for t, b in batch)

    def _stream_frame(self, mtype: int, body: bytes, raw: bytes, out: list[bytes]) -> None:
        assert self.stream is not None
        if mtype in BATCHED:
            plan = self.book.plan([(mtype, body)])
            self._plan_effects(plan, self.stream, None)
            if plan.tables or plan.shadowable:
                self._cache_decision((Status.BYPASS, ""), "", plan.tables, plan.shadowable, self.stream, None)
            deferred = self.book.deferred_parses(plan, self.stream.book_ops)
            self.stream.swallow += len(deferred)
            self.stream.book_ops.extend(self.book.after_forward(plan))
            self.stream.deallocates.extend(self.book.deallocating(name) for name in plan.deallocates)
            out.extend(deferred)
        out.append(raw)


def _plain(plan: BatchPlan) -> bool:
    """A batch of plain reads: nothing in it changes anything, so a repeat may be answered
    from the memo of its raw bytes (hits.py)."""
    return not (
        plan.ops or plan.writes or plan.writes_everything or plan.changes_session or plan.commits
        or plan.cursor_writes or plan.fetches or plan.deallocates or plan.cluster_wide
    )

"""Extended-protocol batches: every message up to Sync, decided on as a whole.

The relay collects Parse/Bind/Describe/Execute/Close in a `BatchBuffer` (extended.py). At
Sync the batch is planned and either answered from the cache or forwarded, preceded by any
Parse the origin lacks. A batch that cannot wait for its Sync (a Flush that wants answers,
COPY, a pipeline that never syncs) is streamed instead: forwarded as it arrives, never cached.

A driver running a prepared statement sends one lone batch per execution (Bind, Describe,
Execute, Sync in one read), most of them first sightings of their values: a miss. Once `_sync`
decided one of a shape (the same messages but for the Bind's values) to be a cacheable read,
the next reads of that shape are decided from its `BatchMemo` while nothing it rested on moved
(`_lone_batch`): looked up, answered, or sent as they came, with no frames collected or planned.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neonpoly import pgwire
from neonpoly.cache.capture import StatTicket
from neonpoly.cache.policy import Status
from neonpoly.cache.rules import RulePolicy
from neonpoly.pgwire import MSG_BIND, MSG_CLOSE, MSG_DESCRIBE, MSG_FUNCTION_CALL, MSG_PARSE, MSG_QUERY, TX_IDLE
from neonpoly.proxy.decisions import CacheDecisions
from neonpoly.proxy.extended import BATCHED, BatchBuffer, BatchPlan, reads_clock, segments_of
from neonpoly.proxy.hits import MAX_MEMOS, HitMemo, hit_tallies
from neonpoly.proxy.pending import Pending

if TYPE_CHECKING:
    from neonpoly.cache.bypass import LookupScore
    from neonpoly.cache.entry import CacheEntry
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.cache.relations import Resolution
    from neonpoly.proxy.identity import Identity
    from neonpoly.stats import HitTally

_LENGTH = struct.Struct("!i")
_READY_IDLE = pgwire.ready_for_query(TX_IDLE)
# Lone batches remembered per session (see BatchMemo): a driver's statements, like MAX_SHAPES.
MAX_BATCH_MEMOS = 512
# The most bytes after its Bind a lone batch has (a Describe, an Execute, a Sync: their names
# are short). A longer read (a pipeline of batches) is not copied into a shape to look up.
_LONE_REST = 512


# Not frozen: one is made per shape, rarely; nothing changes it once made.
@dataclass(slots=True, eq=False)
class BatchMemo:
    """What a lone batch (a read that is one Bind, then Describe/Execute, then Sync: a driver
    running a prepared statement) was decided on when the full path found it a cacheable read
    (`_sync`: a MISS, then looked up). Its next reads of the same shape, other values, take
    `_lone_batch` while every part is still what `_sync` would find: the checks of
    `_cache_decision` a read can fail, compared as `Relay._answer_memo` compares a hit's."""

    plan: BatchPlan  # the shape's plan (StatementBook.plan_shaped), for this book version
    before: bytes  # the key material before the Bind's values, and after them
    after: bytes
    cache: QueryCache
    identity: Identity  # the very object: a session that learns its identity again gets a new one
    book_version: int
    database: str
    resolution: Resolution  # the very object the relation book memoises
    template_id: str
    rest: list[tuple[int, bytes]]  # the batch's messages after its Bind, for `_capture`
    score: LookupScore  # its template's lookups (cache/bypass.py)
    tallies: tuple[HitTally, ...]  # where its hits are counted, one per Execute (as a HitMemo's)
    # As a HitMemo's (hits.py): the relation book's version when it last answered with
    # `resolution` itself (-1: not asked yet), and the rules' refusals version under which
    # they last said the template is cached (None: not asked yet). While each stands, its
    # question is not asked again: the same answer (~3.5k instructions of a bypassed read).
    relations_version: int = -1
    ttl_version: int | None = None


class BatchHandling(CacheDecisions):
    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        self.batch = BatchBuffer(self.book)
        # Lone batches by shape: the Bind's portal and statement names, then the read's bytes
        # after the Bind (its Describe/Execute/Sync), all of it fixed by the driver.
        self.batch_memos: dict[bytes, BatchMemo] = {}
        # The shape of a lone batch `_lone_batch` had no memo for, handed to the full path
        # (checked again there: `_keep_memo`).
        self.lone_shape: bytes | None = None

    def _lone_batch(self, data: bytes) -> bool:
        """A read that is one whole lone batch of a remembered shape (the caller checked: it
        starts with a Bind; cbuf empty, no batch or stream open, a cache on the route),
        decided as `_sync` decides it, from its memo: no frame list, no BatchBuffer, no
        plan lookup, no decision taken again. False (nothing done): the full path, which
        remembers the shape when it can.

        The memo's key is the read's own bytes but the Bind's values (and its length): a
        read that matches it is a Bind followed by the very Describe/Execute/Sync frames
        that `_sync` saw whole when it made the memo, so the read is framed as they were."""
        n = len(data)
        end = 1 + _LENGTH.unpack_from(data, 1)[0]  # the Bind's end
        if end < 9 or end >= n or end > pgwire.SMALL_MESSAGE_LIMIT or n - end > _LONE_REST:
            return False
        # Its values start after the portal and statement names (two NUL-ended strings).
        cut = data.find(b"\x00", data.find(b"\x00", 5, end) + 1, end) + 1
        if cut <= 5:
            return False
        shape = data[5:cut] + data[end:]
        memo = self.batch_memos.get(shape)
        state = self.state
        identity = state.identity
        cache = memo.cache if memo is not None else None
        route = self.route
        if (
            memo is None
            or cache is None
            or identity is not memo.identity
            or identity.epoch != cache.ddl_epoch
            or self.book.version != memo.book_version
            or route is None
            or route.cache is not cache
            or state.tx_status != TX_IDLE
            or state.legacy_strings
            or state.bypass is not None
            or self.pending
            or self.batch_open
            or self.unsynced
        ):
            self.lone_shape = shape
            return False
        tail = data[cut:end]
        if reads_clock(tail):
            return False  # refused per batch (plan_shaped plans it in full)
        plan = memo.plan
        if plan.tables or plan.shadowable:
            relations = cache.relations
            if relations.version != memo.relations_version:
                if relations.resolve(memo.database, plan.tables, plan.shadowable, identity.schemas) is not (
                    memo.resolution
                ):
                    self.lone_shape = shape  # the catalog moved: decided again, remembered anew
                    return False
                memo.relations_version = relations.version
        template = memo.template_id
        policy = cache.ttl_policy  # `cache.refusals_version()` written out, as `_answer_memo` does
        version = policy.book.version if type(policy) is RulePolicy else cache.refusals_version()
        if version is None or version != memo.ttl_version:
            if not cache.caches(template, plan.tables):
                return False  # DISABLED: the full path says so and counts it
            memo.ttl_version = version
        score = memo.score
        if score.bypassed and self._pass_lone(cache, score, plan, template, data):
            return True
        started = time.monotonic()
        if score.bypassed and cache.bypass.passes(score):
            # Its lookups do not hit (cache/bypass.py): forwarded as pass-through would.
            item = Pending(started)
            for info in plan.executed:
                item.stats.append(cache.pass_ticket(score, info.template_id, info.template, info.qualified_tables,
                                                    info.template_id == template))  # fmt: skip
            self._send_lone(item, data)
            return True
        material = hashlib.blake2b(memo.before + tail + memo.after, digest_size=32).digest()
        key = cache.key(state.context(), b"X" + material)  # as `_sync` keys it
        entry = cache.lookup_entry(key, score)
        if entry is not None:
            self._lone_hit(memo, key, entry, data, started)
            return True
        item = Pending(started)  # (a hit needs none: answered at once, nothing outstanding)
        item.capture = self._capture(cache, key, memo.resolution, template, [(MSG_BIND, data[5:end]), *memo.rest])
        stats = item.stats
        for info in plan.executed:
            stats.append(cache.miss_ticket(info.template_id, info.template, info.qualified_tables))
        self._send_lone(item, data)
        return True

    def _lone_hit(self, memo: BatchMemo, key: bytes, entry: CacheEntry, data: bytes, started: float) -> None:
        """`_lone_batch` found the read's entry: answered as `_sync` answers a hit of a lone
        batch (nothing outstanding, the session idle: its payload and an idle ReadyForQuery),
        counted in the memo's tallies as a hit memo counts its hits (`_answer_locally` would
        make a ticket per Execute), and remembered by the read's bytes (hits.py) with the
        entry it was served and its reply, as `_note_hit` would remember it but for those:
        its first repeat is then asked `serves`, not looked up again."""
        cache = memo.cache
        payload = entry.payload
        reply = payload + _READY_IDLE
        elapsed = time.monotonic() - started
        size = len(payload)
        for tally in memo.tallies:
            cache.record_hit(tally, elapsed, size)
        self.write_client(reply)
        plan = memo.plan
        resolution = memo.resolution if plan.tables or plan.shadowable else None
        template = memo.template_id
        hit = HitMemo(
            cache, key, memo.identity, memo.book_version, memo.database, plan.tables, plan.shadowable, resolution,
            template, memo.tallies, cache.bypass.score(template), entry=entry, reply=reply,
        )  # fmt: skip
        if len(self.hit_memos) >= MAX_MEMOS:
            self.hit_memos.clear()
        self.hit_memos[data] = hit

    def _pass_lone(self, cache: QueryCache, score: LookupScore, plan: BatchPlan, template: str, data: bytes) -> bool:
        """A lone batch of a bypassed template `_lone_batch` found every ground of its memo
        still standing for, passed through as a bypassed simple Query is from its memo
        (passes.py): counted at once, then relayed as pass-through relays it (one request in
        `inflight`, no `Pending`), when nothing else is outstanding or owed an answer's
        settling (as `_pass_by_memo` asks). False, with nothing changed: not such a read (a
        probe, the bypass ended, something outstanding): `_lone_batch` goes on."""
        if (
            self.inflight
            or self.relations_wanted
            or self.tx_writes
            or self.tx_keyed
            or self.tx_writes_everything
            or not cache.bypass.skips(score)
        ):
            return False
        unrecorded = None
        for info in plan.executed:
            ticket = cache.pass_ticket(score, info.template_id, info.template, info.qualified_tables,
                                       info.template_id == template)  # fmt: skip
            if not cache.record_passed(ticket):
                unrecorded = [ticket] if unrecorded is None else [*unrecorded, ticket]
        if unrecorded is not None:
            # Not counted at once (debug logging times every read): `_complete` counts them.
            item = Pending(time.monotonic())
            item.stats.extend(unrecorded)
            self._send_lone(item, data)
            return True
        self.passed_at = time.monotonic()
        self.inflight = 1
        if self.origin_transport is not None:
            self.origin_transport.write(data)
        if self.book.unsynced:  # (a Parse sent since the last Sync)
            self.book.synced()
        return True

    def _send_lone(self, item: Pending, data: bytes) -> None:
        """A lone batch `_lone_batch` decided not to answer: sent to the origin as it came (no
        Parse to send ahead: its statements were at the origin for this book version)."""
        item.neutral = True  # the catalog described what it reads (no reads/trusts left)
        self.pending.append(item)
        if self.origin_transport is not None:
            self.origin_transport.write(data)
        if self.book.unsynced:  # (a Parse sent since the last Sync)
            self.book.synced()

    def _keep_memo(
        self,
        plan: BatchPlan,
        item: Pending,
        resolution: Resolution | None,
        template: str,
        batch: list[tuple[int, bytes]],
        raw_batch: bytes | None,
        raw: bytes,
    ) -> None:
        """`_sync` found the lone batch `_lone_batch` handed it a cacheable read and looked it
        up: remember what that rested on, if its next sightings can be decided from it."""
        shape, self.lone_shape = self.lone_shape, None
        cache = self.route.cache if self.route else None
        identity = self.state.identity
        if (
            shape is None
            or raw_batch is None
            or cache is None
            or identity is None
            or resolution is None
            or item.reads
            or item.trusts
            or not plan.quiet
            or not _plain(plan)
            or plan.forward
            or plan.status is not None
            or (plan.primary is not None and not plan.primary.cacheable)
            or sum(1 for t, _ in batch if t == MSG_BIND) != 1
            or batch[0][0] != MSG_BIND
            or self.state.legacy_strings
        ):
            return
        bind = batch[0][1]
        cut = bind.find(b"\x00", bind.find(b"\x00") + 1) + 1
        if cut <= 0 or shape != bind[:cut] + raw_batch[5 + len(bind) :] + raw:
            return  # not the lone batch the shape was taken from
        if pgwire.parse_bind(bind).statement in self.book.copies:
            return  # BatchBuffer streams it
        statements = self.book.statements
        if any(name not in statements or not statements[name].at_origin for name in plan.needs):
            # Sent ahead by `deferred_parses`, which moves the book's version (and so the
            # next sighting is planned again anyway): not remembered.
            return
        segments = segments_of(plan.pieces)
        if len(segments) != 2:
            return
        if len(self.batch_memos) >= MAX_BATCH_MEMOS:
            self.batch_memos.clear()
        self.batch_memos[shape] = BatchMemo(
            plan, segments[0], segments[1], cache, identity, self.book.version, self.state.database, resolution,
            template, batch[1:], cache.bypass.score(template),
            hit_tallies(cache, [(i.template_id, i.template, i.qualified_tables) for i in plan.executed]
                        if plan.executes else []),
        )  # fmt: skip

    def _sync(
        self, raw: bytes, out: list[bytes], expect: int | None = None, raw_batch: bytes | None = None
    ) -> None:
        """Decide on a whole batch at its Sync (or at a Flush, `expect` answers long);
        `raw_batch` is the batch's messages as received, when the relay has them in one piece."""
        if self.stream is not None:
            out.append(raw)
            self.stream = None
            self.batch_open = self.unsynced = False
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
        # Looked up: a read the cache may answer, unless its template's lookups do not hit
        # (cache/bypass.py: then `passing`, its score, and forwarded as pass-through would).
        lookup = status is Status.MISS and cache is not None and (plan.executes or info is not None)
        passing: LookupScore | None = None
        if lookup and cache is not None:
            if self.lone_shape is not None and not flush:
                self._keep_memo(plan, item, decision.resolution, template, batch, raw_batch, raw)
            score = cache.bypass.score(template)
            if score.bypassed and cache.bypass.passes(score):
                lookup, passing = False, score
        if lookup and cache is not None:
            # The tag (b"H"/b"X": a batch ended by Flush/Sync) is part of every stored key.
            key = cache.key(self.state.context(), (b"H" if flush else b"X") + material)
            payload = cache.lookup(key, score)
            # Not after messages ended by Flush went to the origin (asyncpg's Parse/Describe/
            # Flush): it runs them in an implicit transaction that only their Sync ends, and
            # answered here that Sync would never reach it (its locks held, invalidations unread).
            if payload is not None and not plan.forward and not self._busy() and not (self.batch_open or self.unsynced):
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
        if passing is not None and cache is not None:
            # Its other statements' templates were not judged: their tickets say so (`led`).
            item.stats.extend(
                [cache.pass_ticket(passing, i.template_id, i.template, i.qualified_tables, i.template_id == template)
                 for i in plan.executed]
            )  # fmt: skip
        elif status is Status.MISS and cache is not None:
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
        self.unsynced = flush  # a Sync ends what the origin skips after an error, a Flush not
        if not flush:
            self.book.synced()

    def _plan_effects(
        self, plan: BatchPlan, item: Pending, out: list[bytes] | None, batch: list[tuple[int, bytes]] | None = None
    ) -> None:
        """A batch's writes evict before it is sent; session changes make the session learn
        its identity again (as `_note_effects` for a simple query)."""
        drops_temp = plan.drops_temp and self.state.temp_objects  # DISCARD TEMP/ALL: see SessionState
        everything = plan.writes_everything or self.state.legacy_strings or drops_temp
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
        item.two_phase_sent(plan.prepared, self.route.cache if self.route else None)
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
        item.answers = sum(_answers(t, b) for t, b in batch)
        item.streaming = True
        self.pending.append(item)
        self.stream = item
        self.unsynced = True
        out.extend(deferred)
        out.extend(pgwire.frame(t, b) for t, b in batch)

    def _stream_frame(self, mtype: int, body: bytes, raw: bytes, out: list[bytes]) -> None:
        assert self.stream is not None
        if mtype in (MSG_QUERY, MSG_FUNCTION_CALL):
            self._query_in_batch(mtype, body, raw, out)
            return
        if mtype in BATCHED:
            plan = self.book.plan([(mtype, body)])
            self._plan_effects(plan, self.stream, None)
            if plan.tables or plan.shadowable:
                self._cache_decision((Status.BYPASS, ""), "", plan.tables, plan.shadowable, self.stream, None)
            deferred = self.book.deferred_parses(plan, self.stream.book_ops)
            self.stream.swallow += len(deferred)
            self.stream.book_ops.extend(self.book.after_forward(plan))
            self.stream.deallocates.extend(self.book.deallocating(name) for name in plan.deallocates)
            self.stream.answers += _answers(mtype, body)
            out.extend(deferred)
        out.append(raw)

    def _function_call(self, raw: bytes, out: list[bytes]) -> None:
        """A FunctionCall runs a function by OID: anything may happen."""
        self.pending.append(Pending(time.monotonic(), writes_everything=True))
        self._invalidate(frozenset(), everything=True)
        self._forget_identity()
        out.append(raw)

    def _query_in_batch(self, mtype: int, body: bytes, raw: bytes, out: list[bytes]) -> None:
        """A simple Query (or a FunctionCall, alike here) sent after extended messages and
        before their Sync. PostgreSQL
        runs it in the batch's implicit transaction, commits that, and answers it with a
        ReadyForQuery of its own; but when a message of the batch before it failed, it skips
        it unanswered up to the Sync. So a stream open before it ends after the messages that
        end its answers (counted, rows aside), and the Query is a request of its own that may
        be skipped (`in_batch`: see `_origin_frames`), carrying the stream's writes (its end
        is their commit). Until the Sync, every Query is such a one (`unsynced`)."""
        stream = self.stream
        if stream is None and self.batch.messages:
            self._open_stream(out)  # collected, not yet forwarded: they go first
            stream = self.stream
        if stream is not None:
            self.stream = None
            stream.streaming = False
            stream.flush = stream.ends_only = True
            # Ends after its answers still to come; after an error, at the Sync's ReadyForQuery.
            stream.expect = None if stream.error else stream.answers - stream.answered
            if stream.expect == 0 and stream in self.pending:
                self.pending.remove(stream)  # answered already (`_complete` evicts again: early,
                self._complete(stream)  # so the Query carries its writes, below)
        self.batch_open = True  # never answered from the cache (`_query`)
        before = len(self.pending)
        if mtype == MSG_QUERY:
            self._query(body, raw, out)
        else:
            self._function_call(raw, out)
        self.batch_open = False  # the Query ends the batch's transaction (or is skipped to the Sync)
        if len(self.pending) > before:
            item = self.pending[-1]
            item.in_batch = True
            item.capture = None  # it ran in the batch's transaction: not stored
            if stream is not None:
                item.writes |= stream.writes
                item.keyed |= stream.keyed
                item.writes_everything |= stream.writes_everything


# The messages that end the origin's answer to one extended message (`_answers`): a counted
# stream's rows and COPY data are not counted (answers.py).
ENDS_ANSWER = frozenset(b"123tTnCIs")


def _answers(mtype: int, body: bytes) -> int:
    """How many messages end the origin's answers to an extended message: Parse, Bind, Close
    and Execute one each (CommandComplete, EmptyQueryResponse or PortalSuspended ends an
    Execute's rows), Describe of a statement two (parameters, then rows or NoData)."""
    if mtype == MSG_DESCRIBE:
        return 2 if body[:1] == b"S" else 1
    return 1


def _plain(plan: BatchPlan) -> bool:
    """A batch of plain reads: nothing in it changes anything, so a repeat may be answered
    from the memo of its raw bytes (hits.py)."""
    return not (
        plan.ops or plan.writes or plan.writes_everything or plan.changes_session or plan.commits
        or plan.cursor_writes or plan.fetches or plan.deallocates or plan.cluster_wide or bool(plan.prepared)
    )

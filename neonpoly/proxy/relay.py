"""The client's frame loop: client bytes to the origin (or answered from the cache).

Bytes are forwarded untouched and in one write per read; only the frames a decision needs
are looked at: queries (decided on by the layers below), Terminate. The origin's side is
answers.py. This runs for every read, so it reads the message types as plain ints.
"""

from __future__ import annotations

import asyncio
import struct
import time

from neonpoly import pgwire
from neonpoly.cache.rules import RulePolicy
from neonpoly.pgwire import (
    MSG_BIND,
    MSG_FLUSH,
    MSG_FUNCTION_CALL,
    MSG_QUERY,
    MSG_SYNC,
    MSG_TERMINATE,
    TX_IDLE,
)
from neonpoly.proxy.batches import BatchHandling
from neonpoly.proxy.extended import BATCHED
from neonpoly.proxy.hits import MAX_MEMOS, NO_HIT, HitMemo

_ENDS_WITH_READY = frozenset((MSG_QUERY, MSG_SYNC, MSG_FUNCTION_CALL))  # requests answered up to ReadyForQuery
_READY_IDLE = pgwire.ready_for_query(TX_IDLE)
FRAME_LENGTH = struct.Struct("!i")  # a frame's length, after its type byte
FRAME_HEAD = struct.Struct("!Bi")  # a frame's type and length: one call per frame on the relay's walks
_FRONTEND, _FRONTEND_LARGE, _LARGE = pgwire.FRONTEND_TYPES, pgwire.FRONTEND_LARGE_TYPES, pgwire.LARGE_MESSAGE_LIMIT


class Relay(BatchHandling):
    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        # Ready, on a route without a cache: nothing is decided, asked or held, so each read
        # only needs its frames counted (`_relay_data`, `_pass_origin`). Set once, at login.
        self.passing = False
        self.hit_memos: dict[bytes, HitMemo] = {}  # raw request bytes -> the hit it was (hits.py)

    def _client_frames(self, data: bytes | None = None) -> None:
        """The client's whole frames: those in cbuf, or (`data`) a read that came with cbuf
        empty, taken as it is (no copy into cbuf and out again; only a torn tail is kept)."""
        batch = self.batch
        if data is None:
            if self.hit_memos and not self.pending:
                memo = self.hit_memos.get(bytes(self.cbuf))
                if memo is not None and self._answer_memo(memo):
                    self.cbuf.clear()
                    return
            frames, used = pgwire.scan_frames(
                self.cbuf, allowed=pgwire.FRONTEND_TYPES, large=pgwire.FRONTEND_LARGE_TYPES
            )
            if not frames:
                return
            buf = pgwire.take(self.cbuf, used)
        else:
            if (
                data[0] == MSG_QUERY
                and len(data) > 5
                and not batch.messages
                and self.stream is None
                and not self.unsynced
                and self.route is not None
                and self.route.cache is not None
                and 4 <= FRAME_LENGTH.unpack_from(data, 1)[0] == len(data) - 1 <= pgwire.SMALL_MESSAGE_LIMIT
            ):
                self._lone_query(data)
                return
            if (
                data[0] == MSG_BIND
                and len(data) > 5
                and not batch.messages
                and self.stream is None
                and self.route is not None
                and self.route.cache is not None
                and self._lone_batch(data)
            ):
                return
            frames, used = pgwire.scan_frames(data, allowed=pgwire.FRONTEND_TYPES, large=pgwire.FRONTEND_LARGE_TYPES)
            if used < len(data):
                self.cbuf += data[used:]
                data = data[:used]
            if not frames:
                return
            buf = data
        if self.route is not None and self.route.cache is None:
            self._relay_frames(frames, buf)
            return
        out: list[bytes] = []
        fresh = not batch.messages and self.stream is None  # buf starts a request
        self.hit_seen = NO_HIT
        # Where in buf the batch being collected starts, when all of it is in buf (-1: not):
        # a batch forwarded as received goes out as these bytes, not framed again.
        batch_from = -1
        for mtype, start, end in frames:
            if self.stream is not None and mtype != MSG_SYNC and mtype != MSG_FLUSH:
                batch_from = -1
                self._stream_frame(mtype, buf[start + 5 : end], buf[start:end], out)
            elif mtype in BATCHED:
                if not batch.messages:
                    batch_from = start
                if batch.add(mtype, buf[start + 5 : end]):  # an Execute that runs COPY
                    batch_from = -1
                    self._open_stream(out)
            elif mtype == MSG_SYNC:
                self._sync(buf[start:end], out, raw_batch=buf[batch_from:start] if batch_from >= 0 else None)
                batch_from = -1
            elif mtype == MSG_FLUSH:  # the client wants answers before Sync
                expect = batch.expected_answers()
                if self.stream is not None or expect is None:
                    if self.stream is None and batch.messages:
                        self._open_stream(out)
                    out.append(buf[start:end])
                elif batch.messages:
                    raw_batch = buf[batch_from:start] if batch_from >= 0 else None
                    self._sync(buf[start:end], out, expect=expect, raw_batch=raw_batch)
                else:
                    out.append(buf[start:end])
                batch_from = -1
            elif mtype in (MSG_QUERY, MSG_FUNCTION_CALL):
                batch_from = -1
                if batch.messages or self.unsynced:
                    self._query_in_batch(mtype, buf[start + 5 : end], buf[start:end], out)
                elif mtype == MSG_QUERY:
                    self._query(buf[start + 5 : end], buf[start:end], out)
                else:  # it runs a function by OID: anything may happen
                    self._function_call(buf[start:end], out)
            elif mtype == MSG_TERMINATE:
                out.append(buf[start:end])
                self.outcome = "client terminated"
                self._write_origin(out)
                self.close()
                return
            else:  # CopyData/Done/Fail: straight through
                batch_from = -1
                out.append(buf[start:end])
        if self.hit_seen is not None:
            self._remember_hit(frames, buf, fresh)
        if batch.messages and self.stream is None:
            # The client sent no Sync (or Flush) with what it has sent so far. PostgreSQL runs
            # each message as it arrives, and a pipeline may wait for their answers before it
            # ever syncs: forward them now (such a batch is not cached).
            self._open_stream(out)
        self._write_origin(out)

    def _lone_query(self, data: bytes) -> None:
        """The loop below for a read that is one whole, valid simple Query and nothing else
        (cbuf empty, no batch or stream open, a cache on the route): the most common read,
        a first sighting (a miss) most of all, spared the frame list and the loop."""
        out: list[bytes] = []
        self.hit_seen = NO_HIT
        self._query(data[5:], data, out)
        if self.hit_seen is not None:
            self._remember_hit([(MSG_QUERY, 0, len(data))], data, True)
        self._write_origin(out)  # (a Query opens no batch: nothing to stream, unlike below)

    def _remember_hit(self, frames: list[tuple[int, int, int]], buf: bytes, fresh: bool) -> None:
        """The read was one request answered from the cache: remember it by its bytes."""
        memo, self.hit_seen = self.hit_seen, None
        if memo is None or not fresh:
            return
        ends = [t for t, _, _ in frames if t in _ENDS_WITH_READY or t == MSG_FLUSH]
        if len(ends) != 1 or frames[-1][0] != ends[0] or ends[0] == MSG_FUNCTION_CALL:
            return
        if len(self.hit_memos) >= MAX_MEMOS:
            self.hit_memos.clear()
        self.hit_memos[buf] = memo

    def _answer_memo(self, memo: HitMemo) -> bool:
        """Answer a repeat of a remembered hit, if everything it was decided on still holds
        (the checks of `_cache_decision` a plain read can fail, with nothing outstanding or
        half-received) and the store would still answer with the entry served last time."""
        state = self.state
        cache = memo.cache
        identity = state.identity
        route = self.route
        if (
            identity is not memo.identity
            or identity.epoch != cache.ddl_epoch
            or state.tx_status != TX_IDLE
            or state.legacy_strings
            or state.bypass is not None
            or self.book.version != memo.book_version
            or route is None
            or route.cache is not cache
            or self.pending
            or self.stream is not None
            or self.batch_open
            or self.unsynced
            or self.batch.messages
        ):
            return False
        if memo.resolution is not None:
            relations = cache.relations
            if relations.version != memo.relations_version:
                if relations.resolve(memo.database, memo.tables, memo.shadowable, identity.schemas) is not (
                    memo.resolution
                ):
                    return False
                memo.relations_version = relations.version
        started = time.monotonic()
        policy = cache.ttl_policy  # `cache.refusals_version()` written out for a rule policy (the
        # usual): a method, an isinstance and a property less per hit (~1k instructions of ~34k)
        version = policy.book.version if type(policy) is RulePolicy else cache.refusals_version()
        if version is None or version != memo.ttl_version:
            if not cache.caches(memo.template_id, memo.tables):
                return False
            memo.ttl_version = version
        entry = memo.entry
        if entry is None or not cache.serves(memo.key, entry, memo.score):
            entry = cache.lookup_entry(memo.key, memo.score)
            if entry is None:
                # Gone: a miss of the same decision, sent from what the memo knows (a simple
                # Query's); the full path would decide it again and ask the store again.
                return self._memo_miss(memo)
            memo.entry = entry
            memo.reply = entry.payload + _READY_IDLE  # built once per entry, not per hit
        elapsed = time.monotonic() - started
        size = len(entry.payload)
        for tally in memo.tallies:
            cache.record_hit(tally, elapsed, size)
        reply = memo.reply
        if self.held is None and not self.closed:  # write_client, written out: one call less
            self.bytes_out += len(reply)
            self.client.write(reply)
        else:
            self.write_client(reply)
        return True

    def _relay_data(self, data: bytes) -> bool:
        """`_relay_frames` (no cache) for a read that came with cbuf empty, in one pass: its
        frames checked as `scan_frames` checks them and counted, then the read written as it
        came. False (nothing done) when it holds a Terminate or an invalid frame: then
        `_client_frames` (and `_relay_frames`)."""
        n = len(data)
        pos = 0
        ends = 0
        unpack = FRAME_HEAD.unpack_from
        while n - pos >= 5:
            mtype, length = unpack(data, pos)
            if (
                mtype not in _FRONTEND
                or length < 4
                or (length > pgwire.SMALL_MESSAGE_LIMIT and (mtype not in _FRONTEND_LARGE or length > _LARGE))
            ):
                return False
            end = pos + 1 + length
            if end > n:
                break
            if mtype in _ENDS_WITH_READY:
                ends += 1
            elif mtype == MSG_TERMINATE:
                return False
            pos = end
        if pos < n:
            self.cbuf += data[pos:]  # a torn frame: kept until the rest comes
            data = data[:pos]
        self.inflight += ends
        if data and self.origin_transport is not None:
            self.origin_transport.write(data)
        return True

    def _relay_frames(self, frames: list[tuple[int, int, int]], buf: bytes) -> None:
        """Pass-through (no cache): nothing to decide, so no parsing and one write.

        Only count the requests that end in ReadyForQuery, so that a lost origin or a
        shutdown knows whether a client is waiting for an answer.
        """
        for mtype, _, _ in frames:
            if mtype in _ENDS_WITH_READY:
                self.inflight += 1
            elif mtype == MSG_TERMINATE:
                self.outcome = "client terminated"
                if self.origin_transport is not None:
                    self.origin_transport.write(buf)
                self.close()
                return
        if self.origin_transport is not None:
            self.origin_transport.write(buf)

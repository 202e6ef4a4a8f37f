"""The frame loops: client bytes to the origin, origin bytes to the client.

Bytes are forwarded untouched and in one write per read; only the frames a decision needs
are looked at. From the client: queries (decided on by the layers below), Terminate. From
the origin: ReadyForQuery (the transaction status, the end of a response), ParameterStatus,
the answers to neonpoly's own lookups (read, never forwarded) and the responses of misses
being captured. This runs for every read, so it reads the message types as plain ints.
"""

from __future__ import annotations

import asyncio
import struct
import time

from neonpoly import pgwire
from neonpoly.cache.capture import StatTicket
from neonpoly.cache.policy import Status
from neonpoly.pgwire import (
    MSG_BIND,
    MSG_CLOSE_COMPLETE,
    MSG_COPY_BOTH_RESPONSE,
    MSG_COPY_IN_RESPONSE,
    MSG_COPY_OUT_RESPONSE,
    MSG_ERROR_RESPONSE,
    MSG_FLUSH,
    MSG_FUNCTION_CALL,
    MSG_NOTICE_RESPONSE,
    MSG_NOTIFICATION_RESPONSE,
    MSG_PARAMETER_STATUS,
    MSG_PARSE_COMPLETE,
    MSG_QUERY,
    MSG_READY_FOR_QUERY,
    MSG_SYNC,
    MSG_TERMINATE,
    TX_IDLE,
)
from neonpoly.proxy.batches import ENDS_ANSWER, BatchHandling
from neonpoly.proxy.extended import BATCHED
from neonpoly.proxy.hits import MAX_MEMOS, NO_HIT, TTL_RECHECK, HitMemo
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.state import READY

# Notifications, notices, parameter changes: never replayed.
_NOT_PAYLOAD = frozenset((MSG_NOTIFICATION_RESPONSE, MSG_NOTICE_RESPONSE, MSG_PARAMETER_STATUS))
# Errors and COPY are never stored. A suspended portal ('s', asyncpg's fetchval sends a
# row limit of 1) is: outside a transaction its portal dies at Sync, so the same request
# always gets the same bytes, and the row limit is part of the key.
_FAILS_CAPTURE = frozenset((MSG_ERROR_RESPONSE, MSG_COPY_IN_RESPONSE, MSG_COPY_OUT_RESPONSE, MSG_COPY_BOTH_RESPONSE))
_ENDS_WITH_READY = frozenset((MSG_QUERY, MSG_SYNC, MSG_FUNCTION_CALL))  # requests answered up to ReadyForQuery
# Notifications and settings are the client's, even in the middle of neonpoly's own lookup.
_CLIENTS_DURING_LOOKUP = frozenset((MSG_NOTIFICATION_RESPONSE, MSG_PARAMETER_STATUS))
_SWALLOWED = frozenset((MSG_PARSE_COMPLETE, MSG_CLOSE_COMPLETE))  # answers to Parses/Closes sent for the client
_READY_IDLE = pgwire.ready_for_query(TX_IDLE)
_NOTABLE = frozenset((MSG_ERROR_RESPONSE, MSG_PARAMETER_STATUS))  # what a forwarded answer may tell
# What stops `_origin_fast` from taking a captured answer whole: frames a capture leaves out
# (`_NOT_PAYLOAD`) or that fail it (`_FAILS_CAPTURE`), and what a forwarded answer may tell.
_NOT_CAPTURED = _NOT_PAYLOAD | _FAILS_CAPTURE | _NOTABLE
_LENGTH = struct.Struct("!i")  # a frame's length, after its type byte
_HEAD = struct.Struct("!Bi")  # a frame's type and length: one call per frame on the relay's walks
_READY_HEAD = bytes((MSG_READY_FOR_QUERY,)) + _LENGTH.pack(5)  # a ReadyForQuery, but its status
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
                and 4 <= _LENGTH.unpack_from(data, 1)[0] == len(data) - 1 <= pgwire.SMALL_MESSAGE_LIMIT
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
        if memo.resolution is not None and cache.relations.resolve(
            memo.database, memo.tables, memo.shadowable, identity.schemas
        ) is not memo.resolution:
            return False
        started = time.monotonic()
        version = cache.refusals_version()
        if version is None or version != memo.ttl_version or started >= memo.ttl_until:
            if cache.ttl_for(memo.template_id, memo.tables) is None:
                return False
            memo.ttl_version, memo.ttl_until = version, started + TTL_RECHECK
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
        unpack = _HEAD.unpack_from
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

    def _pass_origin(self, data: bytes) -> bool:
        """The origin's read on a passing session (no cache; the caller checked that nothing
        is pending and obuf is empty), when it is one whole answer: frames up to one
        ReadyForQuery, its last six bytes, with no error or setting before it. Then it only
        needs the transaction status and one request counted off, and goes to the client as
        it came. One walk over the frames before the ReadyForQuery that lands exactly on it
        proves the shape; anything else (False: nothing done) is `_origin_fast`'s.

        The pass-through's per-answer work: kept to the fewest steps (each costs dear here)."""
        tail = len(data) - 6
        if tail < 0 or not data.startswith(_READY_HEAD, tail):
            return False
        pos = 0
        unpack = _HEAD.unpack_from
        while pos < tail:
            mtype, length = unpack(data, pos)
            if length < 4 or mtype == MSG_READY_FOR_QUERY or mtype in _NOTABLE:
                return False
            pos += 1 + length
        if pos != tail:
            return False  # the walk crossed it: the six bytes are inside a frame
        self.state.tx_status = data[tail + 5 :]
        if self.inflight:
            self.inflight -= 1
        if self.held is None and not self.closed:  # write_client, written out
            self.bytes_out += tail + 6
            self.client.write(data)
        else:
            self.write_client(data)
        return True

    def _origin_fast(self, data: bytes) -> bool:
        """The origin's read, when `_origin_frames` would only forward it: nothing pending
        wants its frames (no lookup, swallowed Parse, Flush count or statement book entry to
        confirm), and it holds at most one ReadyForQuery, as its last frame. Then only the
        ReadyForQuery, errors and settings matter: they are found in one pass over the read,
        which goes to the client as it came. A miss being captured is taken here only when
        the read is its whole, clean answer (the capture is then that read but its last six
        bytes). False (nothing done): not such a read.

        The caller holds no earlier origin bytes (obuf is empty)."""
        pending = self.pending
        head = pending[0] if pending else None
        capture = None
        if head is not None:
            if (
                head.local is not None
                or head.lookup is not None
                or head.identity is not None
                or head.swallow
                or head.flush
                or head.streaming
                or head.confirmed != len(head.book_ops)
            ):
                return False
            capture = head.capture
            if capture is not None and (capture.failed or capture.frames):
                return False
        n = len(data)
        pos = 0
        ready = -1  # where the ReadyForQuery starts
        notable = False
        tail = n - 6
        # The common read is one whole answer, its ReadyForQuery the last six bytes: then only
        # the frames before it are walked, and one walk that lands exactly on it, meeting no
        # error, setting or other ReadyForQuery, proves the read is such an answer. Anything
        # else (and a landing elsewhere) is walked again below, frame by frame.
        if tail >= 0 and data.startswith(_READY_HEAD, tail):
            unpack = _HEAD.unpack_from
            stops = _NOTABLE if capture is None else _NOT_CAPTURED
            while pos < tail:
                mtype, length = unpack(data, pos)
                if length < 4 or mtype == MSG_READY_FOR_QUERY or mtype in stops:
                    break
                pos += 1 + length
            if pos == tail:
                ready = tail
                pos = n
            else:
                pos = 0
        if capture is not None:
            # A miss being captured, answered whole by this read: everything before the
            # ReadyForQuery is what `_origin_frames` would have captured frame by frame (no
            # frame it leaves out or that fails a capture was met), kept as one slice.
            route = self.route
            cache = route.cache if route is not None else None
            if ready < 0 or tail == 0 or cache is None or not cache.accepts(tail):
                return False  # the frame loop: torn, several answers, errors, oversized
            capture.frames.append(data[:tail])
            capture.size = tail
        if ready < 0:
            ready_end = 0
            unpack = _HEAD.unpack_from
            while n - pos >= 5:
                mtype, length = unpack(data, pos)
                if length < 4 or length > pgwire.LARGE_MESSAGE_LIMIT:
                    return False  # _origin_frames says what is wrong
                end = pos + 1 + length
                if end > n:
                    break
                if mtype == MSG_READY_FOR_QUERY:
                    if ready >= 0:
                        return False  # answers to several requests: the full loop
                    ready, ready_end = pos, end
                elif mtype in _NOTABLE:
                    notable = True
                pos = end
            if ready >= 0 and ready_end != n:
                return False  # something after the ReadyForQuery
        if pos == 0:
            self.obuf += data  # not one whole frame yet
            return True
        if notable:
            self._notable_frames(data, pos, head)
        if ready < 0:
            if pos < n:
                self.obuf += data[pos:]  # a torn frame: kept until the rest comes
                data = data[:pos]
            self.write_client(data)
        else:
            self.state.tx_status = data[ready + 5 : ready + 6]
            if self.inflight:
                self.inflight -= 1
            if head is not None:
                pending.popleft()
                self._complete(head)
            if pending:
                out = [data]
                self._release_local(out)
                data = b"".join(out)
            if self.held is None and not self.closed:  # write_client, written out: one call less
                self.bytes_out += len(data)
                self.client.write(data)
            else:
                self.write_client(data)
        if not pending:
            if self.route is not None and self.route.cache is not None:  # nothing to learn without
                self._learn_when_idle()
            if self.cbuf and not self.identity_inflight and self.phase is READY and not self.closed:
                self._client_frames()
        return True

    def _notable_frames(self, data: bytes, used: int, head: Pending | None) -> None:
        """Errors and settings in a read `_origin_fast` forwards, in order."""
        pos = 0
        unpack = _LENGTH.unpack_from
        while pos < used:
            mtype = data[pos]
            end = pos + 1 + unpack(data, pos + 1)[0]
            if mtype == MSG_ERROR_RESPONSE:
                if head is not None:
                    head.error = True
            elif mtype == MSG_PARAMETER_STATUS:
                self._parameter(data[pos + 5 : end])
            pos = end

    def _origin_frames(self) -> None:
        frames, used = pgwire.scan_frames(self.obuf)
        if not frames:
            return
        buf = pgwire.take(self.obuf, used)
        out: list[bytes] = []
        cut = 0  # start of the span not yet appended to out
        pending = self.pending
        # The request the frames answer, and what kind it is: looked up again only after
        # something left the queue (most reads answer one request, frame after frame).
        head: Pending | None = None
        own = plain = False
        stale = True
        for mtype, start, end in frames:
            if stale:
                stale = False
                head = pending[0] if pending else None
                if head is not None and head.local is not None:  # pragma: no cover - defensive
                    head = None
                own = head is not None and (head.lookup is not None or head.identity is not None)
                # Nothing to capture, swallow or count: only errors and settings matter.
                plain = (
                    head is not None and head.capture is None and not head.swallow and not head.flush
                    and head.confirmed == len(head.book_ops) and not head.streaming
                )
            if own:
                assert head is not None
                if mtype in _CLIENTS_DURING_LOOKUP:
                    if mtype == MSG_PARAMETER_STATUS:
                        self._parameter(buf[start + 5 : end])
                    continue
                out.append(buf[cut:start])
                cut = end
                self._lookup_frame(head, mtype, buf[start + 5 : end])
                if mtype == MSG_READY_FOR_QUERY:
                    self._release_local(out)
                    stale = True
                continue
            if mtype == MSG_READY_FOR_QUERY:
                stale = True
                self.state.tx_status = buf[start + 5 : start + 6]
                out.append(buf[cut:end])
                cut = end
                if self.inflight:
                    self.inflight -= 1
                # Flush batches still open here failed: the origin skipped to this Sync (and Queries in them).
                skipped = False
                while pending and pending[0].local is None and (pending[0].flush or (skipped and pending[0].in_batch)):
                    failed = pending.popleft()
                    failed.error = skipped = True
                    self._complete(failed)
                if pending and pending[0].local is None:
                    done = pending.popleft()
                    done.error = done.error or skipped
                    self._complete(done)
                self._release_local(out)
                continue
            if head is None:
                if mtype == MSG_PARAMETER_STATUS:
                    self._parameter(buf[start + 5 : end])
                continue
            if plain:
                if mtype == MSG_ERROR_RESPONSE:
                    head.error = True
                elif mtype == MSG_PARAMETER_STATUS:
                    self._parameter(buf[start + 5 : end])
                continue
            if mtype in _SWALLOWED and head.book_ops:
                self._confirm(head)  # the statement book believes a Parse/Close only now
            if head.swallow and mtype in _SWALLOWED:  # our Parse/Close ahead of it
                head.swallow -= 1
                stale = not head.swallow  # maybe plain from now on
                out.append(buf[cut:start])
                cut = end
                continue
            if mtype == MSG_ERROR_RESPONSE:
                head.error = True
            elif mtype == MSG_PARAMETER_STATUS:
                self._parameter(buf[start + 5 : end])
            capture = head.capture
            if head.streaming and mtype in ENDS_ANSWER:
                head.answered += 1  # (batches.py `_query_in_batch`)
            if head.flush and head.expect is not None and mtype not in _NOT_PAYLOAD and (
                not head.ends_only or mtype in ENDS_ANSWER or mtype == MSG_ERROR_RESPONSE
            ):
                if mtype == MSG_ERROR_RESPONSE:
                    head.expect = None  # now ends at the next ReadyForQuery
                else:
                    head.expect -= 1
                    if capture is not None and not capture.failed:
                        capture.frames.append(buf[start:end])
                        capture.size += end - start
                    if head.expect == 0:
                        out.append(buf[cut:end])
                        cut = end
                        stale = True
                        pending.popleft()
                        self._complete(head)
                        self._release_local(out)
                    continue
            if capture is not None and not capture.failed and mtype not in _NOT_PAYLOAD:
                if mtype in _FAILS_CAPTURE:
                    capture.failed = True
                    capture.frames.clear()
                else:
                    capture.frames.append(buf[start:end])
                    capture.size += end - start
                    if (
                        self.route is not None
                        and self.route.cache is not None
                        and not self.route.cache.accepts(capture.size)
                    ):
                        capture.failed = True
                        capture.frames.clear()
                        head.stats = [
                            StatTicket(t.template_id, t.template, t.tables, str(Status.OVERSIZEDRESULT),
                                       "the result is larger than the cache takes")
                            for t in head.stats
                        ]
        out.append(buf[cut:used])
        self.write_client(b"".join(out))
        if not pending:
            self._learn_when_idle()
            if self.cbuf and not self.identity_inflight and self.phase is READY and not self.closed:
                self._client_frames()

    def _release_local(self, out: list[bytes]) -> None:
        """Cache answers queued behind origin answers go out as soon as it is their turn."""
        pending = self.pending
        while pending and pending[0].local is not None:
            item = pending.popleft()
            out.append(
                (item.local or b"")
                if item.flush
                else (item.local or b"") + pgwire.ready_for_query(self.state.tx_status)
            )


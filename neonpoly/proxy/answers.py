"""The origin's frame loop: origin bytes to the client.

Bytes are forwarded untouched and in one write per read; only the frames a decision needs
are looked at: ReadyForQuery (the transaction status, the end of a response),
ParameterStatus, the answers to neonpoly's own lookups (read, never forwarded) and the
responses of misses being captured. Most reads take a fast path (`_pass_origin`,
`_origin_fast`) that proves the read is one whole answer by its last six bytes and walks
the frames once; the rest go frame by frame (`_origin_frames`). This runs for every read,
so it reads the message types as plain ints.
"""

from __future__ import annotations

from neonpoly import pgwire
from neonpoly.cache.capture import StatTicket
from neonpoly.cache.policy import Status
from neonpoly.pgwire import (
    MSG_CLOSE_COMPLETE,
    MSG_COPY_BOTH_RESPONSE,
    MSG_COPY_IN_RESPONSE,
    MSG_COPY_OUT_RESPONSE,
    MSG_ERROR_RESPONSE,
    MSG_NOTICE_RESPONSE,
    MSG_NOTIFICATION_RESPONSE,
    MSG_PARAMETER_STATUS,
    MSG_PARSE_COMPLETE,
    MSG_READY_FOR_QUERY,
)
from neonpoly.proxy.batches import ENDS_ANSWER
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.relay import FRAME_HEAD, FRAME_LENGTH, Relay
from neonpoly.proxy.state import READY

# Notifications, notices, parameter changes: never replayed.
_NOT_PAYLOAD = frozenset((MSG_NOTIFICATION_RESPONSE, MSG_NOTICE_RESPONSE, MSG_PARAMETER_STATUS))
# Errors and COPY are never stored. A suspended portal ('s', asyncpg's fetchval sends a
# row limit of 1) is: outside a transaction its portal dies at Sync, so the same request
# always gets the same bytes, and the row limit is part of the key.
_FAILS_CAPTURE = frozenset((MSG_ERROR_RESPONSE, MSG_COPY_IN_RESPONSE, MSG_COPY_OUT_RESPONSE, MSG_COPY_BOTH_RESPONSE))
# Notifications and settings are the client's, even in the middle of neonpoly's own lookup.
_CLIENTS_DURING_LOOKUP = frozenset((MSG_NOTIFICATION_RESPONSE, MSG_PARAMETER_STATUS))
_SWALLOWED = frozenset((MSG_PARSE_COMPLETE, MSG_CLOSE_COMPLETE))  # answers to Parses/Closes sent for the client
_NOTABLE = frozenset((MSG_ERROR_RESPONSE, MSG_PARAMETER_STATUS))  # what a forwarded answer may tell
# What stops `_origin_fast` from taking a captured answer whole: frames a capture leaves out
# (`_NOT_PAYLOAD`) or that fail it (`_FAILS_CAPTURE`), and what a forwarded answer may tell.
_NOT_CAPTURED = _NOT_PAYLOAD | _FAILS_CAPTURE | _NOTABLE
_READY_HEAD = bytes((MSG_READY_FOR_QUERY,)) + FRAME_LENGTH.pack(5)  # a ReadyForQuery, but its status


class OriginAnswers(Relay):
    """The origin's side of the relay (the client's is Relay)."""

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
        unpack = FRAME_HEAD.unpack_from
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
            unpack = FRAME_HEAD.unpack_from
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
            unpack = FRAME_HEAD.unpack_from
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
        unpack = FRAME_LENGTH.unpack_from
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

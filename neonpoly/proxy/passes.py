"""Bypassed simple reads decided from one comparison with the session's last one.

A read of a template whose lookups do not hit (cache/bypass.py) is forwarded as pass-through
forwards it, but the full path still decides that: it decodes and classifies the new text
(pgbench -S sends a new one every time: its literal), asks the catalog what it reads, checks
the session and the rules, and only then finds the template bypassed. None of that changes
from one text of the template to the next while the session stands still.

So once the full path has passed a simple Query through, the session remembers that decision
by the text around its one number (`policy.number_slot`: `head + N + trailer`, the texts
`classify` gives this one's classification, whatever the digits N). A later Query whose bytes
are that head, ASCII digits and that trailer is passed from the memo, when everything the
full path's decision rested on still holds, each checked before use:

* the route's cache is the memo's, its rules still cache the template (`caches`);
* the session's identity is the very object the memo was made under, and its DDL epoch is
  the cache's (any SET, role change, DDL or other session change makes a new object);
* the relation book has not moved (`RelationBook.version`: it moves whenever it learns, is
  refused or forgets), so what the text reads resolves as it did (under the same identity's
  search_path): no code run, nothing volatile, no setting it does not carry;
* the statement book has not moved (`simple_query` has nothing to drop), the session is idle,
  reads its strings as UTF-8, is not bypassed as a whole, and nothing is outstanding (no
  pending request, no batch or stream open, no open transaction's writes to settle);
* the template is still bypassed and this read is not its probe (`Bypass.skips`: a probe, a
  hit since the bypass began, or its end take the full path, which decides them as before).

A read passed from the memo is what the full path's pass is: the same frame to the origin,
the same `Pending` (neutral: the catalog described what it reads), the same ticket counted
as a miss with its reason when it completes. Anything else takes the full path, which makes
the memo again.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neonpoly.cache import policy
from neonpoly.pgwire import MSG_QUERY, SMALL_MESSAGE_LIMIT, TX_IDLE
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.writes import WriteMemos

if TYPE_CHECKING:
    from neonpoly.cache.bypass import LookupScore
    from neonpoly.cache.capture import StatTicket
    from neonpoly.cache.policy import Classification
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.cache.relations import Resolution
    from neonpoly.proxy.extended import BatchBuffer
    from neonpoly.proxy.identity import Identity

# Digits a memo's Query may hold where its number is: a longer run is still one number to
# `classify`, but the full path keeps it (and the bound on the text, MEMO_MAX_CHARS).
_MAX_DIGITS = 18
_LENGTH = struct.Struct("!i")


@dataclass(slots=True)
class PassMemo:
    """What a bypassed simple read was passed on, and the bytes of the texts it decides."""

    cache: QueryCache
    identity: Identity  # the very object
    book_version: int
    relations_version: int  # the relation book's: what it reads resolves as it did then
    tables: frozenset[str]
    template_id: str
    score: LookupScore
    ticket: StatTicket  # its pass ticket (a new bypass, a new reason: the full path again)
    head: bytes  # the frame's bytes up to its number, from the text on (after type and length)
    tail: bytes  # the bytes after its number: the trailer and the NUL
    most: int  # the longest frame it decides


class ReadPasses(WriteMemos):
    batch: BatchBuffer  # the extended messages collected (batches.py)

    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        self.pass_memo: PassMemo | None = None
        self.passed_at = 0.0  # when the read passed from the memo and outstanding was sent

    def _pass_by_memo(self, data: bytes) -> bool:
        """Pass a lone simple Query `data` (one whole valid frame, the caller checked, with no
        batch or stream open) from the session's memo; False (nothing done): not a text of
        its slot, or a ground moved."""
        memo = self.pass_memo
        if memo is None:
            return False
        head, tail = memo.head, memo.tail
        n = len(data)
        start = 5 + len(head)
        end = n - len(tail)
        if (
            n > memo.most
            or end <= start
            or data[0] != MSG_QUERY
            or _LENGTH.unpack_from(data, 1)[0] != n - 1  # one whole frame
            or not data.startswith(head, 5)
            or not data.endswith(tail)
            or not data[start:end].isdigit()  # bytes: ASCII digits only
        ):
            return False
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
            or self.inflight
            or self.batch_open
            or self.unsynced
            or self.batch.messages
            or self.stream is not None
            or self.relations_wanted
            or self.tx_writes
            or self.tx_keyed
            or self.tx_writes_everything
            or cache.relations.version != memo.relations_version
            or not cache.caches(memo.template_id, memo.tables)
        ):
            return False
        score = memo.score
        if not score.bypassed or score.reason is not memo.ticket.reason or not cache.bypass.skips(score):
            return False
        self.book.simple_query()  # nothing to drop (the book's version is the memo's): kept for form
        if cache.record_passed(memo.ticket):
            # Counted now (a bypassed read's latency is not timed): its answer is relayed as
            # pass-through relays it, one request in `inflight` and no `Pending`, until
            # anything else happens (`_queue_passed`).
            self.passed_at = time.monotonic()
            self.inflight = 1
        else:
            item = Pending(time.monotonic(), neutral=True)
            item.stats.append(memo.ticket)
            self.pending.append(item)
        self._write_origin([data])
        return True

    def _queue_passed(self) -> None:
        """The client sent more while a read passed from the memo is outstanding (`inflight`
        on a session with a cache): from now on that read waits in the queue like any other
        (neutral, already counted), ahead of what comes next, so that answers stay in order
        and nothing is asked or answered ahead of it."""
        self.inflight = 0
        self.pending.appendleft(Pending(self.passed_at, neutral=True))

    def _remember_pass(
        self,
        sql: str,
        raw: bytes,
        info: Classification,
        resolution: Resolution | None,
        score: LookupScore,
        ticket: StatTicket,
    ) -> None:
        """The full path passed a bypassed plain read `raw` through: remember it for the next
        text of its slot, when it rested only on what `_pass_by_memo` checks."""
        cache = self.route.cache if self.route else None
        identity = self.state.identity
        if cache is None or identity is None or resolution is None or info.has_effects or not raw.endswith(b"\x00"):
            return
        slot = policy.number_slot(sql)
        if slot is None:
            return
        head = slot[0].encode()
        tail = slot[1].encode() + b"\x00"
        most = min(5 + len(head) + _MAX_DIGITS + len(tail), 5 + policy.MEMO_MAX_CHARS + 1, 1 + SMALL_MESSAGE_LIMIT)
        self.pass_memo = PassMemo(
            cache, identity, self.book.version, cache.relations.version, info.tables_read, info.template_id,
            score, ticket, head, tail, most,
        )  # fmt: skip

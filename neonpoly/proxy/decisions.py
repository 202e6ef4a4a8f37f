"""The cache's part in a request: hit, miss (captured to be stored) or why not; evictions.

A request is judged by `_cache_decision` from what the classifier says about its SQL and
what the catalog says about what it reads. A hit is answered from the cache (behind the
origin's outstanding answers, if any); a miss goes to the origin with a `Capture` that the
relay fills and `_complete` stores once the response ended cleanly. Writes evict before
they are sent and again when they commit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neonpoly import pgwire
from neonpoly.cache.capture import Capture, StatTicket
from neonpoly.cache.policy import Classification, Status, classify
from neonpoly.cache.relations import Resolution
from neonpoly.pgwire import TX_IDLE
from neonpoly.proxy.hits import HitMemo, hit_tickets
from neonpoly.proxy.learning import IdentityLearning
from neonpoly.proxy.pending import Pending

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status
    reason: str  # an explanation for SHOW QUERIES and the console ("" for a miss)
    resolution: Resolution | None = None  # what the catalog said, for a miss to be stored


_NOTHING_TO_RESOLVE = Resolution(frozenset(), None, None)


class CacheDecisions(IdentityLearning):
    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        # Writes of the open transaction: evicted again when it commits.
        self.tx_writes: set[str] = set()
        self.tx_writes_everything = False
        self.writing_cursors = False  # a cursor over a query that may write was declared
        self.hit_seen: HitMemo | None = None  # a plain read just answered from the cache (hits.py)

    def _query(self, body: bytes, raw: bytes, out: list[bytes]) -> None:
        sql = pgwire.query_text(body)
        info = classify(sql)
        item = Pending(time.monotonic())
        if info.deallocates is not None:
            self.book.deallocated(info.deallocates)
        self._note_effects(info, item, out)
        refusal = None if info.cacheable else (info.status or Status.UNCACHEABLE, info.reason)
        decision = self._cache_decision(
            refusal, info.template_id, info.tables_read, info.shadowable, item, out, info.settings_read
        )
        status = decision.status
        cache = self.route.cache if self.route else None
        if status is Status.MISS and cache is not None:
            # b"Q" tags a simple query's key material (batches.py has b"H" and b"X"); the tags
            # are part of every stored key: changing one orphans a persisted cache.
            key = cache.key(self.state.context(), b"Q" + body)
            payload = cache.lookup(key)
            if payload is not None and not self._busy():
                self._answer_locally(payload, [info], item)
                if not info.has_effects:
                    self._note_hit(cache, key, decision.resolution, info.template_id, info.tables_read,
                                   info.shadowable, [info])
                return
            item.capture = self._capture(cache, key, decision.resolution, info.template_id)
        # Not neutral while the catalog has not described what it reads: it may run code.
        item.neutral = status is Status.MISS and not (item.reads or item.trusts)
        item.stats.append(
            StatTicket(info.template_id, info.template, info.qualified_tables, str(status), decision.reason)
        )
        self.pending.append(item)
        out.append(raw)
        self.batch_open = False

    def _cache_decision(
        self,
        refusal: tuple[Status, str] | None,
        template_id: str,
        tables: frozenset[str],
        shadowable: frozenset[str],
        item: Pending,
        out: list[bytes] | None,
        settings: frozenset[str] = frozenset(),
    ) -> Decision:
        """The status of a request and why, after what the catalog says about what it reads
        and calls.

        Reading a relation whose definition or policies run code of the user's is like calling
        that code: it may write or change the session. When the catalog has not answered yet,
        the question goes out ahead of the request (if the session is idle) and the request is
        judged again when it completes."""
        cache = self.route.cache if self.route else None
        if cache is None:
            return Decision(Status.DISABLED, "caching is off for this connection string")
        resolution: Resolution | None = _NOTHING_TO_RESOLVE
        known = self.state.identity
        if known is not None and known.epoch != cache.ddl_epoch:
            self._forget_identity()  # DDL somewhere (a schema on its path, a grant) may change it
            known = None
        if tables or shadowable:
            schemas = known.schemas if known is not None else None
            resolution = cache.relations.resolve(self.state.database, tables, shadowable, schemas)
            if resolution is None:
                idle = self._at_boundary() and not self._busy() and self.state.bypass is None
                if idle and out is not None:
                    self._ask_relations(cache, cache.relations.unknown(self.state.database, tables), out)
                item.reads, item.trusts = tables, shadowable
            elif resolution.runs_code is not None:
                self._runs_code(item)
                return Decision(Status.VOLATILE, resolution.runs_code)
        if refusal is not None:
            return Decision(refusal[0], refusal[1], resolution)
        if resolution is not None and resolution.volatile is not None:
            return Decision(Status.VOLATILE, resolution.volatile)
        if cache.ttl_for(template_id, tables) is None:
            return Decision(Status.DISABLED, "a rule says never, or the cache's mode is off")
        if self.state.bypass is not None:
            return Decision(Status.BYPASS, f"{self.state.bypass} is never cached")
        if self.state.legacy_strings:
            return Decision(Status.BYPASS, "standard_conforming_strings is off: text not read as the server reads it")
        if self.state.tx_status != TX_IDLE:
            return Decision(Status.TRANSACTION, "inside a transaction block")
        if self._busy():
            return Decision(Status.TRANSACTION, "behind a pipelined request that may change the transaction")
        if known is None:
            return Decision(Status.BYPASS, "the session changed (SET, DDL, server code): asking who it is now")
        needed = settings
        if resolution is not None and resolution.settings:
            needed = needed | resolution.settings
        if needed and not needed <= known.settings:
            # Settings the identity does not carry yet (custom ones are not in pg_settings):
            # from now on every session's identity carries them.
            if cache.want_settings(needed):
                self._forget_identity()
                missing = sorted(needed - known.settings)[0]
                return Decision(Status.BYPASS, f"reads setting {missing}: asking the server for it")
            return Decision(Status.VOLATILE, "reads more custom settings than a session identity carries")
        return Decision(Status.MISS, "", resolution)

    def _note_hit(
        self,
        cache: QueryCache,
        key: bytes,
        resolution: Resolution | None,
        template_id: str,
        tables: frozenset[str],
        shadowable: frozenset[str],
        infos: list[Classification],
    ) -> None:
        """A plain read was answered from the cache: what that rested on, for the relay to
        remember against the request's raw bytes (hits.py)."""
        identity = self.state.identity
        if identity is None or self.state.legacy_strings or self.state.bypass is not None:
            return
        if tables or shadowable:
            if resolution is None:
                return
        else:
            resolution = None
        self.hit_seen = HitMemo(
            cache, key, identity, self.book.version, self.state.database, tables, shadowable, resolution,
            template_id, hit_tickets([(i.template_id, i.template, i.qualified_tables) for i in infos]),
        )

    def _busy(self) -> bool:
        """Could an outstanding origin answer change the transaction status or settings?

        A local answer queued behind plain reads is safe (it waits its turn, and the status
        cannot change); behind anything else it is not, so the request goes to the origin.
        Nor behind a batch ended by Flush: if it fails, the origin skips everything up to
        the next Sync, and only the origin can answer that Sync.
        """
        return any(p.local is None and (p.flush or not p.neutral) for p in self.pending)

    def _capture(
        self, cache: QueryCache, key: bytes, resolution: Resolution | None, template_id: str
    ) -> Capture | None:
        """Count a sighting of a miss and, once admitted, prepare to store it, tagged with
        every table it really reads. Nothing is stored while the catalog has not answered
        (the lookup is on its way; with the default admission the answer is in before it
        matters)."""
        admitted = cache.admit(key, template_id)
        if resolution is None or not admitted:
            return None
        database = self.state.database
        return Capture(key, database, resolution.tags, template_id, cache.stamp(database, resolution.tags))

    def _answer_locally(self, payload: bytes, infos: list[Classification], item: Pending) -> None:
        cache = self.route.cache if self.route else None
        if cache is not None:
            for info in infos:
                cache.record(
                    StatTicket(info.template_id, info.template, info.qualified_tables, "hit"),
                    time.monotonic() - item.started,
                    len(payload),
                )
        self._answer_quietly(payload, item)

    def _answer_quietly(self, payload: bytes, item: Pending) -> None:
        """Answer from the cache; behind outstanding plain reads, wait for their turn."""
        if self.pending:
            item.local = payload
            self.pending.append(item)
        else:
            self.write_client(payload if item.flush else payload + pgwire.ready_for_query(self.state.tx_status))

    def _note_effects(self, info: Classification, item: Pending, out: list[bytes]) -> None:
        """Writes evict before they are sent; session changes make the session learn its
        identity again."""
        if not info.has_effects and not self.state.legacy_strings:
            return  # a plain read
        everything = info.invalidate_all or self.state.legacy_strings
        if info.fetches and self.writing_cursors:
            everything = True  # the cursor's query runs now, and may write
        if info.cursor_writes:
            self.writing_cursors = True
        if info.is_write or everything:
            item.writes = info.tables_written
            item.writes_everything = everything
            self._invalidate(info.tables_written, everything, out, cluster_wide=info.cluster_wide)
        item.commits = info.transaction_control == "commit"
        if info.changes_session or everything:
            self._forget_identity()

    def _runs_code(self, item: Pending) -> None:
        """The request runs code neonpoly cannot vouch for: it may write anything or SET."""
        item.writes_everything = True
        self._invalidate(frozenset(), True)
        self._forget_identity()

    def _invalidate(
        self,
        tables: frozenset[str],
        everything: bool,
        out: list[bytes] | None = None,
        *,
        cluster_wide: bool = False,
    ) -> None:
        """Evict what a write may change: its tables and everything they reach (foreign-key
        cascades, partitions); the whole database for triggers, rules or tables not looked
        up yet (and the session learns its identity again: a trigger may SET); every database
        of the origin for roles and grants. Given `out` in an idle session, also ask about
        those tables for next time."""
        cache = self.route.cache if self.route else None
        if cache is None or not (tables or everything):
            return
        database = self.state.database
        named = (tables, everything)
        if not everything:
            reach = cache.relations.reach(database, tables)
            if reach is None:
                everything = True
                self._forget_identity()
                unknown = cache.relations.unknown(database, tables)
                if unknown and out is not None and self._at_boundary() and not self._busy():
                    self._ask_relations(cache, unknown, out)
            else:
                tables = reach
        cache.invalidate(None if cluster_wide else database, tables, everything, named)

    def _complete(self, item: Pending) -> None:
        """A response ended (ReadyForQuery): evict again, store, count."""
        committed = self.state.tx_status == TX_IDLE
        cache = self.route.cache if self.route else None
        if (item.reads or item.trusts) and cache is not None:
            # It read relations (or trusted builtins) the catalog had not described when it was sent.
            known = self.state.identity
            schemas = known.schemas if known is not None else None
            resolution = cache.relations.resolve(self.state.database, item.reads, item.trusts, schemas)
            if resolution is None:
                self.relations_wanted |= item.reads  # asked at the next idle moment
            if resolution is None or resolution.runs_code is not None:
                item.writes_everything = True
                self._forget_identity()
        if item.writes or item.writes_everything:
            self.tx_writes |= item.writes
            self.tx_writes_everything |= item.writes_everything
        if (committed or item.commits) and (self.tx_writes or self.tx_writes_everything):
            # The write is visible to other sessions only now (COMMIT AND CHAIN leaves a new
            # transaction open): evict again so a miss that raced it is not kept.
            self._invalidate(frozenset(self.tx_writes), self.tx_writes_everything)
            self.tx_writes = set()
            self.tx_writes_everything = False
            barrier = cache.reply_barrier if cache is not None else None
            if barrier is not None and (hold := barrier()) is not None:
                self.hold_client(hold)  # the reply waits until other nodes applied the bumps
        if cache is None:
            return
        capture = item.capture
        if capture is not None and not capture.failed and not item.error and committed and capture.frames:
            cache.store_capture(capture)
        elapsed = time.monotonic() - item.started
        for ticket in item.stats:
            cache.record(ticket, elapsed, 0)

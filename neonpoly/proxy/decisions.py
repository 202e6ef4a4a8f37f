"""The cache's part in a request: hit, miss (captured to be stored) or why not; evictions.

A request is judged by `_cache_decision` from what the classifier says about its SQL and
what the catalog says about what it reads. A hit is answered from the cache (behind the
origin's outstanding answers, if any); a miss goes to the origin with a `Capture` that the
relay fills and `_complete` stores once the response ended cleanly. Writes evict before
they are sent and again when they commit.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neonpoly import pgwire
from neonpoly.cache import keys
from neonpoly.cache.capture import Capture, StatTicket
from neonpoly.cache.keys import KeyRef
from neonpoly.cache.policy import Classification, Status, classify, keys_for, sql_prepares
from neonpoly.cache.relations import Resolution
from neonpoly.pgwire import MSG_BIND, MSG_CLOSE, MSG_PARSE, TARGET_STATEMENT, TX_IDLE
from neonpoly.proxy.hits import HitMemo, hit_tallies
from neonpoly.proxy.passes import ReadPasses
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.writes import WRITE_INITIALS

if TYPE_CHECKING:
    from neonpoly.cache.bypass import LookupScore
    from neonpoly.cache.query_cache import QueryCache


# Not frozen: one is made for every request, and a frozen dataclass's __init__ (one
# object.__setattr__ per field) costs four times a plain one's. Nothing changes it once made.
@dataclass(slots=True)
class Decision:
    status: Status
    reason: str  # an explanation for SHOW QUERIES and the console ("" for a miss)
    resolution: Resolution | None = None  # what the catalog said, for a miss to be stored


_NOTHING_TO_RESOLVE = Resolution(frozenset(), None, None)
_READY_IDLE = pgwire.ready_for_query(TX_IDLE)
# What a request's key values are read from: a simple query's text, or an extended batch.
KeySource = str | list[tuple[int, bytes]] | None
# A Bind's values and its statement's declared parameter types.
BoundValues = tuple[bytes, tuple[int, ...]] | None
# Texts that may PREPARE in SQL (a statement name shared with protocol Parses).
_MAY_PREPARE = re.compile(r"(?i)(?<![a-z0-9_$])prepare(?![a-z0-9_$])")


class CacheDecisions(ReadPasses):
    hit_memos: dict[bytes, HitMemo]  # the relay's remembered hits, by their raw bytes (relay.py)

    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        # Writes of the open transaction: evicted again when it commits.
        self.tx_writes: set[str] = set()
        self.tx_keyed: set[tuple[str, str]] = set()  # (table, generation name): keyed writes
        self.tx_writes_everything = False
        self.writing_cursors = False  # a cursor over a query that may write was declared
        self.hit_seen: HitMemo | None = None  # a plain read just answered from the cache (hits.py)

    def _query(self, body: bytes, raw: bytes, out: list[bytes]) -> None:
        sql = pgwire.query_text(body)
        if self.write_memos and sql[:1] in WRITE_INITIALS and self._write_by_memo(sql, raw, out):
            return
        info = classify(sql)
        item = Pending(time.monotonic())
        self.book.simple_query()
        if info.deallocates is not None:
            item.deallocates.append(self.book.deallocating(info.deallocates))
        if not info.cacheable and _MAY_PREPARE.search(sql):
            self.book.prepared_in_sql(sql_prepares(sql))
        if info.has_effects or self.state.legacy_strings:  # not a plain read (the common case)
            self._note_effects(info, item, out, sql)
        refusal = None if info.cacheable else (info.status or Status.UNCACHEABLE, info.reason)
        decision = self._cache_decision(
            refusal, info.template_id, info.tables_read, info.shadowable, item, out, info.settings_read
        )
        cache = self.route.cache if self.route else None
        if decision.status is Status.MISS and cache is not None:
            score = cache.bypass.score(info.template_id)
            if score.bypassed and cache.bypass.passes(score):
                # Its lookups do not hit (cache/bypass.py): forwarded as pass-through would,
                # with no key, lookup, admission or capture (neutral as a miss below).
                item.neutral = not (item.reads or item.trusts)
                ticket = cache.pass_ticket(score, info.template_id, info.template, info.qualified_tables)
                item.stats.append(ticket)
                if item.neutral and not item.deallocates:  # the next text of its slot: passes.py
                    self._remember_pass(sql, raw, info, decision.resolution, score, ticket)
                self.pending.append(item)
                out.append(raw)
                self.batch_open = False
                return
            # b"Q" tags a simple query's key material (batches.py has b"H" and b"X"); the tags
            # are part of every stored key: changing one orphans a persisted cache.
            key = cache.key(self.state.context(), b"Q" + body)
            entry = cache.lookup_entry(key, score)
            if entry is not None and not self._busy() and not self.batch_open:
                self._answer_locally(entry.payload, [info], item)
                if not info.has_effects:
                    self._note_hit(cache, key, decision.resolution, info.template_id, info.tables_read,
                                   info.shadowable, [info], (raw, info), score)  # fmt: skip
                return
            item.capture = self._capture(cache, key, decision.resolution, info.template_id, sql, info)
            # Not neutral while the catalog has not described what it reads: it may run code.
            item.neutral = not (item.reads or item.trusts)
            item.stats.append(cache.miss_ticket(info.template_id, info.template, info.qualified_tables))
        else:
            item.stats.append(
                StatTicket(info.template_id, info.template, info.qualified_tables, str(decision.status),
                           decision.reason)
            )  # fmt: skip
            if item.keyed and cache is not None and not _MAY_PREPARE.search(sql):
                self._remember_write(sql, info, item, cache)
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
        state = self.state
        known = state.identity
        if known is not None and known.epoch != cache.ddl_epoch:
            self._forget_identity()  # DDL somewhere (a schema on its path, a grant) may change it
            known = None
        if tables or shadowable:
            schemas = known.schemas if known is not None else None
            resolution = cache.relations.resolve(state.database, tables, shadowable, schemas)
            if resolution is None:
                # Not for text neonpoly cannot read (the names asked would not be the server's).
                idle = (self._at_boundary() and not self._busy() and self.state.bypass is None
                        and not self.state.legacy_strings)
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
        if not cache.caches(template_id, tables):
            return Decision(Status.DISABLED, "a rule says never, or the cache's mode is off")
        if state.bypass is not None:
            return Decision(Status.BYPASS, f"{state.bypass} is never cached")
        if state.legacy_strings:
            return Decision(Status.BYPASS, state.unreadable)
        if state.tx_status != TX_IDLE:
            return Decision(Status.TRANSACTION, "inside a transaction block")
        if self.pending and self._busy():
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
        query: tuple[bytes, Classification] | None = None,
        score: LookupScore | None = None,
    ) -> None:
        """A plain read was answered from the cache: what that rested on, for the relay to
        remember against the request's raw bytes (hits.py); `score`: its template's lookups'."""
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
            template_id, hit_tallies(cache, [(i.template_id, i.template, i.qualified_tables) for i in infos]),
            score if score is not None else cache.bypass.score(template_id), query=query,
        )  # fmt: skip

    def _memo_miss(self, memo: HitMemo) -> bool:
        """A remembered simple Query whose entry is gone (made stale, expired): sent and
        captured as `_query` would, from the memo. `Relay._answer_memo` calls it once every
        check a hit rests on held, the checks that make `_cache_decision` say MISS for this
        text: the same identity object (DDL epoch, settings), idle, no bypass, the same book
        (no unnamed statement for `simple_query` to drop), route, cache, resolution object,
        TTL rules still caching, nothing outstanding; the key is the memo's, just looked up.
        False (nothing done): not a simple Query's memo, or one kept under more bytes."""
        query = memo.query
        if query is None:
            return False
        raw, info = query
        if self.hit_memos.get(raw) is not memo:
            return False  # remembered for more bytes than its Query (hits.py): not only its own
        cache = memo.cache
        item = Pending(time.monotonic())
        self.book.simple_query()  # nothing to drop (the book's version is the memo's): kept for form
        # A memo of a read of no relation has no resolution: `_cache_decision`'s is empty.
        resolution = memo.resolution if memo.resolution is not None else _NOTHING_TO_RESOLVE
        names = memo.names
        if names is None:
            sql = pgwire.query_text(raw[5:])  # decoded again, not kept: a memo holds no copy of the text
            names = memo.names = keys.read_names(resolution.tags, self._point(cache, sql, info))
        item.capture = self._capture(cache, memo.key, resolution, info.template_id, names=names)
        item.neutral = True  # the catalog described what it reads (`_query`: no reads/trusts left)
        item.memo = memo
        item.stats.append(cache.miss_ticket(info.template_id, info.template, info.qualified_tables))
        self.pending.append(item)
        self._write_origin([raw])
        return True

    def _busy(self) -> bool:
        """Could an outstanding origin answer change the transaction status or settings?

        A local answer queued behind plain reads is safe (it waits its turn, and the status
        cannot change); behind anything else it is not, so the request goes to the origin.
        Nor behind a batch ended by Flush: if it fails, the origin skips everything up to
        the next Sync, and only the origin can answer that Sync.
        """
        if not self.pending:  # the common case, asked for every request: no generator
            return False
        return any(p.local is None and (p.flush or not p.neutral) for p in self.pending)

    def _capture(
        self,
        cache: QueryCache,
        key: bytes,
        resolution: Resolution | None,
        template_id: str,
        source: KeySource = None,
        info: Classification | None = None,
        *,
        names: frozenset[str] | None = None,
    ) -> Capture | None:
        """Count a sighting of a miss and, once admitted, prepare to store it, tagged with
        every table it really reads (and stamped as a point read of one key, or as a read of
        the table's rows: cache/keys.py; `names`: those generation names, already worked
        out). Nothing is stored while the catalog has not answered (the lookup is on its
        way; with the default admission the answer is in before it matters)."""
        admitted = cache.admit(key, template_id)
        if resolution is None or not admitted:
            return None
        database = self.state.database
        if names is None:
            names = keys.read_names(resolution.tags, self._point(cache, source, info) if source else None)
        return Capture(key, database, resolution.tags, template_id, cache.stamp(database, names))

    def _point(
        self, cache: QueryCache, source: KeySource, info: Classification | None = None
    ) -> tuple[str, int] | None:
        """(table, key value) when the request is a read confined to one primary key (`info`:
        the text's classification, when the caller has it)."""
        if isinstance(source, str):
            if info is None:
                info = classify(source)
            return self._point_of(cache, keys_for(source, info), None) if info.keys else None
        binds = [i for i, (mtype, _) in enumerate(source or ()) if mtype == MSG_BIND]
        if len(binds) != 1:
            return None
        bound = self._bound(source or [], binds[0])
        if bound is None or not bound[0].keys:
            return None
        return self._point_of(cache, bound[1], bound[2])

    def _point_of(self, cache: QueryCache, refs: tuple[KeyRef, ...], values: BoundValues) -> tuple[str, int] | None:
        for ref in refs:
            if ref.write or cache.relations.key_column(self.state.database, ref.table) != ref.column:
                continue
            found = _values(ref, values)
            if found is not None and len(found) == 1:
                return ref.table, found[0]
        return None

    def _keyed_write(
        self, cache: QueryCache, info: Classification, refs: tuple[KeyRef, ...], values: BoundValues
    ) -> tuple[str, frozenset[tuple[str, str]]] | None:
        """(table, (table, generation name) pairs) when a write provably changes only rows of
        the key values it names, in that table alone: the catalog vouches for the key
        (relations.py), and every builtin it trusts by name is the builtin in this session (a
        `=` of the user's on the search_path could match any row)."""
        if not refs or info.invalidate_all or len(info.tables_written) != 1:
            return None
        database = self.state.database
        # Behind a request judged only when it completes, the search_path may not be the
        # identity's any more: any schema may then hold a rival of a trusted builtin.
        known = None if self._identity_pending() else self.state.identity
        checked = cache.relations.resolve(database, (), info.shadowable, known.schemas if known else None)
        if checked is None or checked.runs_code is not None:
            return None
        for ref in refs:
            if not ref.write or ref.table not in info.tables_written:
                continue
            if cache.relations.key_column(database, ref.table) != ref.column:
                continue
            found = _values(ref, values)
            if found:
                return ref.table, keys.write_pairs(ref.table, found)
        return None

    def _batch_keyed(
        self, cache: QueryCache, writes: frozenset[str], batch: list[tuple[int, bytes]]
    ) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
        """A batch's writes split into whole tables and (table, generation name) pairs of the
        Binds that write by key alone; a table also written otherwise stays whole."""
        precise: set[tuple[str, str]] = set()
        whole: set[str] = set()
        for index in [i for i, (mtype, _) in enumerate(batch) if mtype == MSG_BIND]:
            bound = self._bound(batch, index)
            if bound is None:
                continue  # the plan refused it: its writes are in `writes` or nowhere
            info = bound[0]
            if not (info.is_write or info.invalidate_all):
                continue
            found = self._keyed_write(cache, info, bound[1], bound[2])
            if found is None:
                whole |= info.tables_written
            else:
                precise |= found[1]
        keyed = frozenset(p for p in precise if p[0] not in whole)
        return writes - (frozenset(t for t, _ in keyed) - whole), keyed

    def _bound(
        self, batch: list[tuple[int, bytes]], index: int
    ) -> tuple[Classification, tuple[KeyRef, ...], BoundValues] | None:
        """The statement the Bind at `index` of this batch binds (parsed in the batch before
        it, or earlier), its key conjuncts and the Bind's values."""
        parses: dict[str, pgwire.ParseMsg | None] = {}
        for mtype, body in batch[:index]:
            if mtype == MSG_PARSE:
                parse = pgwire.parse_parse(body)
                parses[parse.name] = parse
            elif mtype == MSG_CLOSE and body[:1] == TARGET_STATEMENT:
                parses[pgwire.parse_target(body).name] = None
        bind = pgwire.parse_bind(batch[index][1])
        if bind.statement in parses:
            stmt = parses[bind.statement]
        else:
            known = self.book.known(bind.statement)
            stmt = known.parse if known is not None else None
        if stmt is None:
            return None
        info = classify(stmt.query)
        return info, keys_for(stmt.query, info), (bind.tail, keys.param_types(stmt.param_types))

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

    def _note_effects(self, info: Classification, item: Pending, out: list[bytes], sql: str = "") -> None:
        """Writes evict before they are sent; session changes make the session learn its
        identity again."""
        if not info.has_effects and not self.state.legacy_strings:
            return  # a plain read
        drops_temp = info.drops_temp and self.state.temp_objects  # DISCARD TEMP/ALL: see SessionState
        everything = info.invalidate_all or self.state.legacy_strings or drops_temp
        if info.fetches and self.writing_cursors:
            everything = True  # the cursor's query runs now, and may write
        if info.cursor_writes:
            self.writing_cursors = True
        if info.is_write or everything:
            cache = self.route.cache if self.route else None
            found = None
            if info.keys and not everything and cache is not None:
                found = self._keyed_write(cache, info, keys_for(sql, info), None)
            if found is not None:
                item.writes = info.tables_written - {found[0]}
                item.keyed = found[1]
            else:
                item.writes = info.tables_written
            item.writes_everything = everything
            self._invalidate(item.writes, everything, out, cluster_wide=info.cluster_wide, keyed=item.keyed)
        item.commits = info.transaction_control == "commit"
        item.two_phase_sent(info.prepared, self.route.cache if self.route else None)
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
        keyed: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        """Evict what a write may change: its tables and everything they reach (foreign-key
        cascades, partitions); the whole database for triggers, rules or tables not looked
        up yet (and the session learns its identity again: a trigger may SET); every database
        of the origin for roles and grants. Given `out` in an idle session, also ask about
        those tables for next time. `keyed` are the generation names of writes confined to
        key values (cache/keys.py): their tables' own rows, while what those tables reach
        (cascades) is evicted whole."""
        cache = self.route.cache if self.route else None
        if cache is None or not (tables or everything or keyed):
            return
        database = self.state.database
        keyed_tables = {t for t, _ in keyed} if keyed else set()
        named = (tables | keyed_tables if keyed_tables else tables, everything)
        if not everything:
            relations = cache.relations
            reach = relations.reach(database, tables) if tables else frozenset()  # none: nothing reached
            for table in keyed_tables:
                further = relations.reach(database, (table,))
                if reach is None or further is None:
                    reach = None
                    break
                if further - {table}:
                    reach = reach | (further - {table})
            if reach is None:
                everything = True
                self._forget_identity()
                unknown = cache.relations.unknown(database, named[0])
                if unknown and out is not None and self._at_boundary() and not self._busy():
                    self._ask_relations(cache, unknown, out)
                tables = named[0]
            else:
                tables = reach.union([name for _, name in keyed]) if keyed else reach
        if everything:
            self.state.temp_objects = True  # the code, DDL or triggers may have made temporary objects
        # A whole database: also every other's entries (code reaches them: dblink, postgres_fdw).
        cache.invalidate(None if cluster_wide else database, tables, everything, named, elsewhere=everything)

    def _confirm(self, item: Pending) -> None:
        """A ParseComplete or CloseComplete: the origin did the next Parse/Close it was sent."""
        if item.confirmed < len(item.book_ops):
            self.book.confirm(item.book_ops[item.confirmed])
            item.confirmed += 1

    def _settle_book(self, item: Pending) -> bool:
        """At the end of a response: Parses/Closes never confirmed were refused or skipped;
        a DEALLOCATE holds if nothing failed. True when every Parse/Close was confirmed."""
        unconfirmed = item.book_ops[item.confirmed :]
        for op in unconfirmed:
            self.book.settle(op)
        for op in item.deallocates:
            if item.error:
                self.book.settle(op)
            else:
                self.book.confirm(op)
        return not unconfirmed

    def _complete(self, item: Pending) -> None:
        """A response ended (ReadyForQuery): evict again, store, count."""
        by_memo = item.by_memo
        if by_memo is not None and self._complete_by_memo(item, by_memo[1], by_memo[0]):
            return
        if not (
            item.capture is not None or item.book_ops or item.deallocates or item.reads or item.trusts or item.writes
            or item.writes_everything or item.keyed or item.commits or self.tx_writes or self.tx_writes_everything
            or self.tx_keyed or item.prepared
        ):  # fmt: skip
            # Nothing to settle, evict or store (a miss not captured, the common one): what
            # the rest would do then is count it.
            cache = self.route.cache if self.route else None
            if cache is not None and item.stats:
                elapsed = time.monotonic() - item.started
                for ticket in item.stats:
                    cache.record(ticket, elapsed, 0)
            return
        confirmed = self._settle_book(item) if item.book_ops or item.deallocates else True
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
            why = resolution and (resolution.runs_code or resolution.volatile)
            if why:
                # Counted as its repeats will be (a system catalog, a sequence, code of the
                # user's): never cacheable, so not a miss, which means a cacheable read the
                # origin answered. Nor is it stored.
                item.capture = None
                item.stats = [_volatile(t, why) if t.status == _MISS else t for t in item.stats]
        if item.writes or item.writes_everything or item.keyed:
            self.tx_writes |= item.writes
            self.tx_keyed |= item.keyed
            self.tx_writes_everything |= item.writes_everything
        if item.prepared and cache is not None:
            # Before the eviction below (nothing runs in between): what it wrote is visible at
            # COMMIT PREPARED, wherever that runs. Held even if the batch failed (it may have
            # failed after a PREPARE TRANSACTION) or left a transaction open (`…; BEGIN`).
            written = frozenset(self.tx_writes).union(t for t, _ in self.tx_keyed)
            everything, exact, db = self.tx_writes_everything, not self.state.legacy_strings, self.state.database
            cache.two_phase(item.prepared, db, written, everything, item.error, exact=exact, taken=item.holds_taken)
        settles = committed or item.commits or bool(item.prepared)
        if settles and (self.tx_writes or self.tx_writes_everything or self.tx_keyed):
            # The write is visible to other sessions only now (COMMIT AND CHAIN leaves a new
            # transaction open): evict again so a miss that raced it is not kept. A table
            # also written otherwise in the transaction is evicted whole.
            whole = frozenset(self.tx_writes)
            keyed = frozenset(p for p in self.tx_keyed if p[0] not in whole)
            self._invalidate(whole, self.tx_writes_everything, keyed=keyed)
            # A transaction open after it (`COMMIT; BEGIN; UPDATE …`, AND CHAIN, a PREPARE then
            # BEGIN) may hold this request's writes: kept, evicted again at its end.
            open_writes = not committed and (item.writes or item.keyed or item.writes_everything)
            self.tx_writes = set(item.writes) if open_writes else set()
            self.tx_keyed = set(item.keyed) if open_writes else set()
            self.tx_writes_everything = bool(open_writes and item.writes_everything)
            barrier = cache.reply_barrier if cache is not None else None
            if barrier is not None and (hold := barrier()) is not None:
                self.hold_client(hold)  # the reply waits until other nodes applied the bumps
        if cache is None:
            return
        capture = item.capture
        # Its key came from Parse texts of the batch: stored only if the origin took them all.
        if capture is not None and not capture.failed and not item.error and committed and capture.frames and confirmed:
            entry = cache.store_capture(capture, item.stats)
            memo = item.memo
            if memo is not None and entry is not None:
                # The memo that sent the miss offers the new entry to its next repeat, served
                # as any memo's entry only while the store holds it, live (QueryCache.serves):
                # the repeat is spared the lookup that would find it.
                memo.entry = entry
                memo.reply = entry.payload + _READY_IDLE
        elapsed = time.monotonic() - item.started
        for ticket in item.stats:
            cache.record(ticket, elapsed, 0)


_MISS = str(Status.MISS)


def _volatile(ticket: StatTicket, why: str) -> StatTicket:
    return StatTicket(ticket.template_id, ticket.template, ticket.tables, str(Status.VOLATILE), why)


def _values(ref: KeyRef, values: BoundValues) -> list[int] | None:
    """The key values of one conjunct: its literals and its bound parameters (None: unsure)."""
    if not ref.params:
        return list(ref.literals)
    if values is None:
        return None
    bound = keys.bound_integers(values[0], ref.params, values[1])
    return None if bound is None else [*ref.literals, *bound]

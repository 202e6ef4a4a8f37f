"""One cache (one integration): keys, admission, TTLs, the store and its statistics.

The session asks it questions in the order a query lives: what is its key, is there an
answer, should a miss be kept (Time To First Hit), may this response be stored, and which
entries a write makes stale.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from neonpoly.cache.bypass import Bypass, LookupScore
from neonpoly.cache.cacheability import Cacheability
from neonpoly.cache.capture import Capture, StatTicket
from neonpoly.cache.entry import CacheEntry, CacheStore
from neonpoly.cache.holds import LocalHolds, PreparedHolds
from neonpoly.cache.invalidation import GenerationStamp
from neonpoly.cache.relations import RelationBook
from neonpoly.cache.rules import RulePolicy
from neonpoly.stats import HitTally, StatsRecorder

log = logging.getLogger("neonpoly.cache")

DEFAULT_TTL = 300.0
# Custom settings read with current_setting() that session identities carry; past this many
# a query reading a new one is not cached (a client must not grow every identity at will).
MAX_SETTINGS_READ = 256
DEFAULT_ADMIT_AFTER = 2
# Sightings of missing keys are counted in a fixed array of one-byte counters (two slots a
# key, the smaller wins: a count-min sketch), cleared every `_SIGHTINGS_AGE` sightings: 4 MiB
# whatever the stream of distinct queries. A collision can only admit a key early (a store
# that was not needed yet), never serve a wrong answer.
_SIGHT_SLOTS = 1 << 22
_SIGHTINGS_AGE = 1 << 20
_SLOT_MASK = _SIGHT_SLOTS - 1
_TWO_SLOTS = struct.Struct("<II")  # a key's two slots: its first and second four bytes
# Digests of stored answers kept to tell adaptive TTL whether a refetch changed.
_DIGESTS_LIMIT = 32_768
_KEPT_WHOLE = 256  # answers up to this many bytes are kept whole instead (store_capture): 8 MiB at most

# Templates whose plain-miss tickets are kept (miss_ticket); past it they are made again.
_MISS_TICKETS = 4096

# (template_id, tables) -> TTL in seconds, or None for "never cache" (rules, adaptive TTL).
TTLPolicy = Callable[[str, frozenset[str]], float | None]


class QueryCache:
    def __init__(
        self,
        cache_id: str,
        store: CacheStore,
        stats: StatsRecorder,
        *,
        ttl: float = DEFAULT_TTL,
        admit_after: int = DEFAULT_ADMIT_AFTER,
        clock: Callable[[], float] = time.time,
        ttl_policy: TTLPolicy | None = None,
    ) -> None:
        self.cache_id = cache_id
        self.store = store
        self.stats = stats
        self.ttl = ttl
        self.admit_after = min(255, max(1, admit_after))
        self.clock = clock
        self.ttl_policy = ttl_policy
        self._salt = cache_id.encode() + b"\x00"
        # How often each key was seen missing: a key is stored on its Nth sighting.
        self._sightings = bytearray(_SIGHT_SLOTS)
        self._sighted = 0
        # Which templates' entries get read before they are evicted (stop capturing the rest).
        self.cacheability = Cacheability(clock)
        # Which templates' lookups hit at all (stop looking up the rest: cache/bypass.py).
        self.bypass = Bypass(clock)
        self.relations = RelationBook()
        self.settings_read: set[str] = set()
        # Bumped by DDL and by roles and grants: a schema created on some session's search_path,
        # a USAGE granted, can change who that session is. Identities learned before are
        # learned again before their next cached answer.
        self.ddl_epoch = 0
        # Other caches in front of the same origin (set by the service that owns them all).
        self.siblings: Callable[[], Iterable[QueryCache]] = tuple
        # (template_id, changed) when an entry is stored again for a key stored before with
        # no write through neonpoly in between: teaches adaptive TTL about the writes that
        # did not go through neonpoly.
        self.on_refetch: Callable[[str, bool], None] | None = None
        self._digests: OrderedDict[bytes, tuple[bytes, GenerationStamp]] = OrderedDict()
        # Set by a shared invalidation plane (freshness/plane.py): hits only while it answers
        # True (this node is provably caught up with the other nodes' writes), and a future
        # a write's reply waits for (the other nodes applied its bumps) or None.
        self.serve_gate: Callable[[], bool] | None = None
        self.reply_barrier: Callable[[], asyncio.Future[None] | None] | None = None
        # Prepared transactions (by the cache it was prepared through and gid: one gid is
        # prepared on each server a transaction spans, what two-phase commit is for, each
        # committed on its own) whose writes become visible at a COMMIT PREPARED that may
        # bypass neonpoly: their reads are not stored. In this process, or in the board the
        # workers of `serve --workers N` share (`share_holds`).
        self.holds: PreparedHolds = LocalHolds()
        self._miss_tickets: dict[str, StatTicket] = {}  # template id -> its plain misses' ticket
        self._pass_tickets: dict[str, StatTicket] = {}  # template id -> its bypassed reads' ticket

    def key(self, context: bytes, material: bytes) -> bytes:
        return hashlib.blake2b(self._salt + context + b"\x01" + material, digest_size=32).digest()

    def want_settings(self, names: frozenset[str]) -> bool:
        """Make session identities carry these settings from now on; False past the limit."""
        new = names - self.settings_read
        if len(self.settings_read) + len(new) > MAX_SETTINGS_READ:
            return False
        self.settings_read |= new
        return True

    def lookup(self, key: bytes, score: LookupScore | None = None) -> bytes | None:
        entry = self.lookup_entry(key, score)
        return None if entry is None else entry.payload

    def lookup_entry(self, key: bytes, score: LookupScore | None = None) -> CacheEntry | None:
        """The entry `key` is answered with, or None: a hit memo keeps it (proxy/hits.py) and
        asks `serves` for its repeats. `score`: its template's (`bypass.score`), counted."""
        gate = self.serve_gate
        if gate is not None and not gate():
            return None  # passed through: the answer may be stale for all this node can prove
        entry = self.store.get(key)
        if entry is None:
            self.cacheability.missed(key)
            if score is not None:
                score.left -= 1
                if not score.left:
                    self.bypass.judge(score)
            return None
        self.cacheability.served(key)
        if score is not None:
            score.hits += 1
        return entry

    def serves(self, key: bytes, entry: CacheEntry, score: LookupScore | None = None) -> bool:
        """True when `lookup(key)` would now answer with this very entry (and counts it served
        as `lookup` does); False when that cannot be told cheaply: then ask `lookup_entry`."""
        gate = self.serve_gate
        if (gate is not None and not gate()) or not self.store.holds(key, entry):
            return False
        cacheability = self.cacheability
        if key in cacheability.unread:  # only the first read of an entry: a call less per hit
            cacheability.served(key)
        if score is not None:
            score.hits += 1
        return True

    def admit(self, key: bytes, template_id: str = "") -> bool:
        """Count a sighting; True when this miss should be stored (Time To First Hit) and its
        template's entries are read before they are evicted (see cache/cacheability.py)."""
        cacheability = self.cacheability
        if cacheability.suppressed and not cacheability.capturing(template_id):
            return False
        admit_after = self.admit_after
        if admit_after == 1:
            return True
        # Asked for every miss: plain int operations, no min()/max() calls.
        counts = self._sightings
        a, b = _TWO_SLOTS.unpack_from(key)
        a &= _SLOT_MASK
        b &= _SLOT_MASK
        count_a = counts[a]
        count_b = counts[b]
        seen = (count_a if count_a < count_b else count_b) + 1
        if seen >= admit_after:
            return True
        if count_a < seen:
            counts[a] = seen
        if count_b < seen:
            counts[b] = seen
        self._sighted += 1
        if self._sighted >= _SIGHTINGS_AGE:
            counts[:] = bytes(_SIGHT_SLOTS)
            self._sighted = 0
        return False

    def capture_refusal(self, template_id: str) -> str | None:
        """Why a miss of this template is not being stored, in words (None: it is)."""
        return self.cacheability.explain(template_id)

    def lookup_refusal(self, template_id: str) -> str | None:
        """Why reads of this template are not looked up, in words (None: they are)."""
        return self.bypass.explain(template_id)

    def stamp(self, database: str, tables: Iterable[str]) -> GenerationStamp:
        return self.store.stamp(database, tables)

    def accepts(self, size: int) -> bool:
        return self.store.accepts(size)

    def ttl_for(self, template_id: str, tables: frozenset[str]) -> float | None:
        if self.ttl_policy is not None:
            return self.ttl_policy(template_id, tables)
        return self.ttl

    def refusals_version(self) -> int | None:
        """Stays the same while `ttl_for` refuses (None) no more and no fewer templates: a hit
        memo asks `ttl_for` again only when it moves. None: no such promise, ask every time."""
        policy = self.ttl_policy
        if policy is None:
            return 0  # the cache's own TTL: never None
        return policy.refusals_version if isinstance(policy, RulePolicy) else None

    def caches(self, template_id: str, tables: frozenset[str]) -> bool:
        """`ttl_for(...) is not None`, asked for every miss: a `RulePolicy` answers it from
        the rules alone (RulePolicy.allows)."""
        policy = self.ttl_policy
        if policy is None:
            return True
        if isinstance(policy, RulePolicy):
            return policy.allows(template_id, tables)
        return policy(template_id, tables) is not None

    def two_phase(
        self,
        steps: tuple[tuple[str, str], ...],
        database: str,
        tables: frozenset[str],
        everything: bool,
        failed: bool,
        *,
        exact: bool = True,
        taken: Mapping[PreparedHolds, int] | None = None,
    ) -> None:
        """A batch's two-phase commit steps, once it ended: COMMIT or ROLLBACK PREPARED (the
        batch evicts what they made visible) release their gid, if nothing failed; then each
        PREPARE TRANSACTION holds what the session's transaction wrote, even in a batch that
        failed (after it, maybe) or prepared another gid too: holding too much only stores less.
        Not `exact`: the gids are the parser's reading of a text the server reads otherwise
        (standard_conforming_strings off: a backslash in '…' escapes; a client encoding not
        UTF-8). Such a session releases nothing, and holds under a name no COMMIT PREPARED
        spells (a gid has no NUL): held until neonpoly restarts, never released by mistake.
        `taken`: `holds_taken()` when the batch was sent (a hold taken since is kept)."""
        if not failed and exact:
            for kind, gid in steps:
                if kind == "end":
                    self.release_prepared(gid, taken)
        if tables or everything:
            for kind, gid in steps:
                if kind == "prepare":
                    self.hold_prepared(gid if exact else f"\0{gid}", database, tables, everything)

    def hold_prepared(self, gid: str, database: str, tables: frozenset[str], everything: bool) -> None:
        """PREPARE TRANSACTION `gid` wrote `tables` (or anything): until neonpoly sees it end,
        answers reading what it wrote are not stored, here or in the sibling caches (its
        COMMIT PREPARED may come straight to the origin; evicting then is not possible)."""
        reach = None if everything else self.relations.reach(database, tables)
        for holds in self._keepers():
            holds.hold((self.cache_id, gid), database, reach)

    def release_prepared(self, gid: str, taken: Mapping[PreparedHolds, int] | None = None) -> None:
        """COMMIT or ROLLBACK PREPARED `gid` went through neonpoly (and evicted), this cache's
        (another cache's origin may be another server, where that gid is another transaction;
        or the same server under another name: then its hold stays, storing less). `taken`:
        `holds_taken()` when it was sent; a hold of the gid taken since stays (PreparedHolds
        .release), as does any in a keeper it does not name. None: released whatever came."""
        for holds in self._keepers():
            holds.release((self.cache_id, gid), None if taken is None else taken.get(holds, -1))

    def holds_taken(self) -> dict[PreparedHolds, int]:
        """Where each keeper's holds stand, as a COMMIT or ROLLBACK PREPARED is sent."""
        return {holds: holds.taken() for holds in self._keepers()}

    def _keepers(self) -> list[PreparedHolds]:
        """This cache's holds and its siblings', each once (on a board they are one)."""
        keepers: dict[int, PreparedHolds] = {}
        for cache in (self, *self.siblings()):
            keepers.setdefault(id(cache.holds), cache.holds)
        return list(keepers.values())

    def share_holds(self, holds: PreparedHolds) -> None:
        """Hold in `holds` from now on (the board of `serve --workers N`); what this cache
        held so far moves there."""
        for key, database, reach in self.holds.entries():
            holds.hold(key, database, reach)
        self.holds = holds

    def store_capture(self, capture: Capture, tickets: list[StatTicket] | None = None) -> CacheEntry | None:
        """Store a captured answer; the entry handed to the store (None: the TTL rules say
        never, or it reads what an open prepared transaction wrote: then its misses among
        `tickets` are replaced by ones saying so). The store may still refuse it (made stale
        in flight): ask `serves`."""
        if self.holds:
            why = self.holds.holding(capture.database, capture.tables)
            if why is not None:
                if tickets is not None:
                    # Still a miss (a cacheable read the origin answered), with the reason it
                    # was not kept: SHOW QUERIES and the console tell the user which hold.
                    tickets[:] = [
                        StatTicket(t.template_id, t.template, t.tables, t.status, why) if t.status == "miss" else t
                        for t in tickets
                    ]
                return None
        ttl = self.ttl_for(capture.template_id, capture.tables)
        if ttl is None or ttl <= 0:
            return None
        payload = b"".join(capture.frames)
        if self.on_refetch is not None:
            # A small answer is kept as it is (the entry's own bytes, no copy): comparing it costs
            # less than hashing it, for every store. (It equals a digest only by a 128-bit
            # collision, as two digests do.)
            digest = payload if len(payload) <= _KEPT_WHOLE else hashlib.blake2b(payload, digest_size=16).digest()
            previous = self._digests.pop(capture.key, None)
            self._digests[capture.key] = (digest, capture.stamp)
            if len(self._digests) > _DIGESTS_LIMIT:
                self._digests.popitem(last=False)
            # A write through neonpoly in between (the stamp moved) explains a change.
            if previous is not None and previous[1] == capture.stamp:
                self.on_refetch(capture.template_id, previous[0] != digest)
        # By position: seven keywords cost a dataclass's __init__ more than all its stores
        # (~3.3k instructions of a re-capture's ~139k).
        entry = CacheEntry(
            payload, capture.database, capture.tables, capture.template_id, capture.stamp, self.clock(), ttl
        )
        self.store.put(capture.key, entry)
        self.cacheability.stored(capture.key, capture.template_id)
        return entry

    def invalidate(
        self,
        database: str | None,
        tables: frozenset[str],
        everything: bool,
        named: tuple[frozenset[str], bool] | None = None,
        *,
        elsewhere: bool = False,
    ) -> None:
        """Evict `tables` (or the database; or, with `database` None, every database of the
        origin: roles and grants are shared by all of them). `elsewhere`: with `everything`,
        every database's entries too (not what they know): a write through neonpoly that evicts
        its whole database ran code neonpoly cannot follow, and such code reaches other
        databases (dblink, postgres_fdw); the change feed's evictions stay in their database.
        `named` is what the write itself said, when the eviction was widened only for safety
        (DDL forgets what the catalog said)."""
        ddl = named is None or named[1]  # DDL and the like: views, keys or triggers may have changed
        for cache in (self, *self.siblings()):
            if database is None or (everything and ddl):
                cache.ddl_epoch += 1
            # Caches in front of the same origin share its tables: a write through one makes
            # the others' entries just as stale.
            if database is None:
                cache.store.invalidate_everything()
                cache.relations.forget()
            elif everything:
                if elsewhere:
                    cache.store.invalidate_everything()
                else:
                    cache.store.invalidate_database(database)
                if ddl:
                    cache.relations.forget(database)
            else:
                cache.store.invalidate_tables(database, tables)

    def invalidate_rows(self, database: str, names: frozenset[str]) -> None:
        """`invalidate(database, names, False)` for a keyed write's generation names (and the
        tables it reaches), in one step: a session's remembered keyed write (proxy/writes.py)
        bumps them twice per write, and nothing else of `invalidate` applies to it."""
        self.store.invalidate_tables(database, names)
        for cache in self.siblings():
            cache.store.invalidate_tables(database, names)

    def miss_ticket(self, template_id: str, template: str, tables: tuple[str, ...]) -> StatTicket:
        """The ticket of a plain miss of this template: one per template (nothing in it
        depends on the text), carrying the tally its misses are counted in once looked up.
        Stats count by template id, so texts sharing one share everything a ticket says."""
        found = self._miss_tickets.get(template_id)
        if found is None:
            if len(self._miss_tickets) >= _MISS_TICKETS:
                self._miss_tickets.clear()
            found = self._miss_tickets[template_id] = StatTicket(template_id, template, tables, "miss")
            found.tally = self.stats.tally(self.cache_id, template_id, template, tables)
        return found

    def pass_ticket(
        self, score: LookupScore, template_id: str, template: str, tables: tuple[str, ...], led: bool = True
    ) -> StatTicket:
        """The ticket of a read of a bypassed template (cache/bypass.py): one per template and
        bypass (its reason says why), counted in its template's tally as `miss_ticket`'s.
        `led`: False for another statement of the bypassed template's batch (its own reason)."""
        reason = score.reason if led else score.batch_reason
        found = self._pass_tickets.get(template_id)
        if found is None or found.reason is not reason:
            if len(self._pass_tickets) >= _MISS_TICKETS:
                self._pass_tickets.clear()
            found = StatTicket(template_id, template, tables, "miss", reason)  # a miss not looked up
            found.tally = self.stats.tally(self.cache_id, template_id, template, tables)
            self._pass_tickets[template_id] = found
        return found

    def counted_ticket(self, ticket: StatTicket) -> StatTicket:
        """`ticket` (of a status other than a miss, with nothing in it that depends on the text)
        counted in its template's tally as `record` would count it in full: a session's
        remembered keyed write (proxy/writes.py) is counted so at every write of a mix."""
        if ticket.status == "miss":
            return ticket  # a miss's is miss_ticket's (its latency is sampled)
        tally = self.stats.tally(self.cache_id, ticket.template_id, ticket.template, ticket.tables)
        return StatTicket(ticket.template_id, ticket.template, ticket.tables, ticket.status, ticket.reason, tally)

    def record_passed(self, ticket: StatTicket) -> bool:
        """Count a read of a bypassed template (`pass_ticket`) at once, as `record` counts it
        when it completes (its latency is not timed); False (not counted): `record` must, when
        it completes (debug logging logs every read's latency, or a ticket without a tally)."""
        tally = ticket.tally
        if tally is None or not ticket.reason or log.isEnabledFor(logging.DEBUG):
            return False
        self.stats.passed(tally, ticket.reason)
        return True

    def record(self, ticket: StatTicket, latency_s: float, bytes_served: int) -> None:
        tally = ticket.tally
        if tally is not None and not log.isEnabledFor(logging.DEBUG):
            if ticket.status != "miss":
                self.stats.other(tally, ticket.status, ticket.reason or None)  # a write's (counted_ticket)
                return
            if ticket.reason:
                # A bypassed read (pass_ticket): counted in its template's tally, with its reason.
                self.stats.passed(tally, ticket.reason)
                return
            if not self.cacheability.suppressed:
                # A plain miss (miss_ticket), the first sighting of most texts: counted in its
                # template's tally (a few int operations), folded in before anyone reads them.
                self.stats.miss(tally, latency_s)
                return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "query cache=%s status=%s template_id=%s latency_ms=%.3f template=%r",
                self.cache_id,
                ticket.status,
                ticket.template_id,
                latency_s * 1000,
                ticket.template[:200],
            )
        self.stats.record(
            self.cache_id,
            ticket.template_id,
            ticket.template,
            ticket.tables,
            ticket.status,
            latency_s,
            bytes_served,
            # Only a miss of a template being suppressed has a reason to look up (one dict test).
            reason=ticket.reason or (self._miss_reason(ticket) if self.cacheability.suppressing else None),
        )

    def record_hit(self, tally: HitTally, latency_s: float, bytes_served: int) -> None:
        """A hit answered from a session's hit memo: counted in its tally (stats.HitTally)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "query cache=%s status=hit template_id=%s latency_ms=%.3f template=%r",
                self.cache_id, tally.template_id, latency_s * 1000, tally.template[:200],
            )  # fmt: skip
        self.stats.hit(tally, latency_s, bytes_served)

    def _miss_reason(self, ticket: StatTicket) -> str | None:
        if ticket.status != "miss" or not self.cacheability.suppressing:
            return None
        return self.cacheability.explain(ticket.template_id)

    def purge(self) -> int:
        self._sightings[:] = bytes(_SIGHT_SLOTS)
        self._sighted = 0
        self.cacheability.forget()
        self.bypass.forget()
        return self.store.purge()

    def close(self) -> None:
        self.store.close()

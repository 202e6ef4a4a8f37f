"""A template whose entries are evicted before anyone reads them stops being captured, and
is probed again later (cache/cacheability.py); its structures stay bounded."""

from __future__ import annotations

import hashlib

from neonpoly.cache import cacheability
from neonpoly.cache.cacheability import Cacheability
from neonpoly.cache.capture import Capture, StatTicket
from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.store import MemoryStore
from neonpoly.stats import StatsRecorder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(clock: Clock, admit_after: int = 1) -> QueryCache:
    store = MemoryStore(max_bytes=1 << 22, clock=clock)
    return QueryCache("c", store, StatsRecorder(clock), clock=clock, admit_after=admit_after)


def _key(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=32).digest()


def _miss(cache: QueryCache, key: bytes, template: str, table: str = "t") -> bool:
    """What the session does on a miss: look up, admit, store what was captured."""
    if cache.lookup(key) is not None:
        return False  # (a sketch collision admitted it at its first sighting)
    if not cache.admit(key, template):
        return False
    capture = Capture(key, "app", frozenset({table}), template, cache.stamp("app", {table}))
    capture.frames.append(b"rows")
    cache.store_capture(capture)
    return True


def _write_until_refused(cache: QueryCache, template: str, key: bytes) -> int:
    """Store a miss, let a write evict it unread, look it up again; how many were stored
    before the template stopped being captured."""
    stored = 0
    while _miss(cache, key, template):
        stored += 1
        cache.invalidate("app", frozenset({"t"}), False)  # a write evicts it before any read
        assert stored <= cacheability.WINDOW + 1, "never stopped capturing"
    return stored


def test_a_template_never_read_before_its_eviction_stops_being_captured() -> None:
    clock = Clock()
    cache = _cache(clock)
    assert _write_until_refused(cache, "written", _key(1)) == cacheability.WINDOW
    reason = cache.capture_refusal("written")
    assert reason is not None and "evicted before anyone read them" in reason
    # The miss is counted with that reason for SHOW QUERIES and the console.
    cache.record(StatTicket("written", "SELECT ?", ("t",), "miss"), 0.001, 0)
    (tpl,) = cache.stats.snapshot("c").templates
    assert tpl.last_status == "miss" and tpl.last_reason == reason

    # Another template of the same table, read before the writes, keeps being captured.
    for _ in range(3 * cacheability.WINDOW):
        assert _miss(cache, _key(2), "read")
        assert cache.lookup(_key(2)) == b"rows"
        cache.invalidate("app", frozenset({"t"}), False)
    assert cache.capture_refusal("read") is None

    # After the backoff it is probed; while the writes go on, the backoff doubles ...
    clock.now += cacheability.FIRST_BACKOFF
    assert 1 <= _write_until_refused(cache, "written", _key(1)) <= cacheability.WINDOW + 1
    clock.now += cacheability.FIRST_BACKOFF
    assert not cache.admit(_key(1), "written")  # 2 s this time
    # ... and once the writes stop, the probe succeeds and it is captured again for good.
    clock.now += cacheability.FIRST_BACKOFF
    for i in range(3 * cacheability.WINDOW):
        assert _miss(cache, _key(10 + i), "written")
        assert cache.lookup(_key(10 + i)) == b"rows"
    assert cache.capture_refusal("written") is None
    clock.now += 1000
    assert cache.admit(_key(3), "written")


def test_an_entry_read_only_by_a_hit_memo_counts_as_read() -> None:
    """A hit memo reads an entry through `QueryCache.serves` (the entry it was handed when
    its miss was stored), never `lookup`: that first read counts, and the later ones (which
    skip the call) change nothing, so a template read between its writes is captured on."""
    clock = Clock()
    cache = _cache(clock)
    for _ in range(3 * cacheability.WINDOW):
        capture = Capture(_key(1), "app", frozenset({"t"}), "memo", cache.stamp("app", {"t"}))
        capture.frames.append(b"rows")
        entry = cache.store_capture(capture)
        assert entry is not None
        for _ in range(3):
            assert cache.serves(_key(1), entry)
        cache.invalidate("app", frozenset({"t"}), False)  # a write evicts it, read
        assert not cache.serves(_key(1), entry) and cache.lookup(_key(1)) is None
    assert cache.capture_refusal("memo") is None
    assert cache.admit(_key(1), "memo")


def test_admission_still_waits_for_the_nth_sighting() -> None:
    cache = _cache(Clock(), admit_after=2)
    assert not cache.admit(_key(1), "q")
    assert cache.admit(_key(1), "q")
    assert not cache.admit(_key(2), "q")


def test_the_unread_bound_in_production_is_the_stated_one() -> None:
    """The bound test below runs with a small bound passed in; production keeps 65,536 (the
    module's docstring), and a QueryCache builds its record with that default."""
    assert cacheability.MAX_UNREAD == 65_536
    assert Cacheability(Clock()).max_unread == cacheability.MAX_UNREAD
    assert _cache(Clock()).cacheability.max_unread == cacheability.MAX_UNREAD


def test_structures_stay_bounded_under_distinct_queries() -> None:
    """More distinct query texts and keys than any limit below, through the in-process
    classes: every structure that grows with them stays under its stated limit. The unread
    keys' bound is passed in small (the same code as production's 65,536, which would take
    72k keys and half a minute); the others are exceeded as they are."""
    from neonpoly.cache import policy, query_cache
    from neonpoly.stats import MAX_TEMPLATES_PER_CACHE

    clock = Clock()
    cache = _cache(clock, admit_after=2)
    unread_bound = 2048
    cache.cacheability = Cacheability(clock, max_unread=unread_bound)
    n = 12_000
    # Every limit below is exceeded by the stream, or the test would prove nothing.
    assert n > max(unread_bound, cacheability.MAX_TEMPLATES, policy.MEMO_SIZE, MAX_TEMPLATES_PER_CACHE)
    for i in range(n):
        sql = f"SELECT * FROM t{i % 50} WHERE name = 'v{i}'"
        info = policy.classify(sql)
        key = _key(i)
        _miss(cache, key, info.template_id + str(i % 9000), table=f"t{i % 50}")
        _miss(cache, key, info.template_id + str(i), table=f"t{i % 50}")  # admitted: stored
        cache.record(StatTicket(info.template_id + str(i), sql, ("t",), "miss"), 0.001, 0)
        if i % 7 == 0:
            cache.invalidate("app", frozenset({f"t{i % 50}"}), False)
    sizes = cache.cacheability.sizes()
    assert sizes["unread"] == unread_bound  # reached, and held there
    assert sizes["scores"] <= cacheability.MAX_TEMPLATES
    assert len(cache._digests) <= query_cache._DIGESTS_LIMIT
    assert len(cache._sightings) == query_cache._SIGHT_SLOTS  # fixed
    assert len(policy._exact) <= policy.MEMO_SIZE and len(policy._shapes) <= policy.MEMO_SIZE
    assert policy.memo_chars() <= policy.MEMO_MAX_TOTAL_CHARS
    (counters,) = cache.stats._caches.values()
    assert len(counters.templates) <= MAX_TEMPLATES_PER_CACHE + 1
    assert cache.store.usage().bytes <= cache.store.usage().max_bytes


def test_the_relation_book_stays_bounded() -> None:
    from neonpoly.cache.relations import MAX_RELATIONS, RelationBook

    assert _cache(Clock()).relations.max_relations == MAX_RELATIONS == 16_384  # production's; small below
    bound = 512
    book = RelationBook(max_relations=bound)
    for i in range(3 * bound):
        book.learn("app", [f"t{i}"], [("r", f"t{i}", f"t{i}", False, None), ("w", f"t{i}", f"t{i}", False, None)])
        assert book.known_relations() <= bound
    # A forgotten relation is simply unknown again: asked about, never guessed.
    assert book.resolve("app", ["t0"]) is None
    assert book.reach("app", ["t0"]) is None

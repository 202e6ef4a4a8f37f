"""A template's lookups are judged per window of misses (cache/bypass.py): too few hits and it
is bypassed, sampled by probes, ended by a hit or by time, counted in its stats as misses
with the reason; scores stay bounded. The proxy's side: tests/proxy/test_lookup_bypass.py."""

from __future__ import annotations

import hashlib

from neonpoly.cache import bypass
from neonpoly.cache.bypass import Bypass, LookupScore
from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.store import MemoryStore
from neonpoly.stats import StatsRecorder
from neonpoly.tui import format as fmt
from tests.unit.stats_clock import FakeClock, template


def _cache(clock: FakeClock, **settings: float) -> QueryCache:
    cache = QueryCache("c1", MemoryStore(max_bytes=1 << 20, clock=clock), StatsRecorder(clock), clock=clock)
    cache.bypass = Bypass(clock, **settings)  # type: ignore[arg-type]
    return cache


def _key(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=32).digest()


def _passes(cache: QueryCache, score: LookupScore, reads: int) -> list[bool]:
    """Which of the next reads pass through (the session's question before its key)."""
    return [score.bypassed and cache.bypass.passes(score) for _ in range(reads)]


def test_the_defaults_bypass_at_most_five_hits_beside_a_window_of_misses() -> None:
    assert (bypass.WINDOW, bypass.MAX_HIT_RATE, bypass.PROBE_EVERY, bypass.BYPASS_FOR) == (512, 0.01, 16, 30.0)
    for hits, bypassed in ((5, True), (6, False)):
        cache = _cache(FakeClock())
        score = cache.bypass.score("t")
        score.hits = hits
        for n in range(bypass.WINDOW):
            assert not score.bypassed
            cache.lookup_entry(_key(n), score)
        assert score.bypassed is bypassed


def test_a_bypassed_template_is_probed_one_read_in_n_and_expires() -> None:
    clock = FakeClock()
    cache = _cache(clock, window=4, probe_every=3, bypass_for=10.0)
    score = cache.bypass.score("t")
    for n in range(4):
        cache.lookup_entry(_key(n), score)
    assert cache.lookup_refusal("t") == "not looked up: 0.0% of its last 4 lookups hit; 1 in 3 still looked up"
    assert _passes(cache, score, 6) == [True, True, False, True, True, False]
    clock.now += 10.0
    assert _passes(cache, score, 3) == [True, True, False]  # the probe saw the time up: judged afresh
    assert cache.lookup_refusal("t") is None and score.left == 4 and score.hits == 0


def test_any_hit_ends_the_bypass_at_the_next_read() -> None:
    cache = _cache(FakeClock(), window=2, probe_every=8)
    score = cache.bypass.score("t")
    cache.lookup_entry(_key(1), score)
    cache.lookup_entry(_key(2), score)
    assert score.bypassed
    score.hits += 1  # a hit memo's hit (QueryCache.serves), or a probe's
    assert cache.lookup_refusal("t") is None  # looked up from its next read
    assert _passes(cache, score, 1) == [False] and not score.bypassed


def test_a_purge_forgets_every_bypass_and_scores_stay_bounded() -> None:
    cache = _cache(FakeClock(), window=1, max_templates=3)
    scores = []
    for i in range(5):
        scores.append(cache.bypass.score(f"t{i}"))
        cache.lookup_entry(_key(i), scores[-1])
    assert cache.bypass.sizes() == {"scores": 3, "bypassed": 3, "passed": 0}
    assert [s.bypassed for s in scores] == [False, False, True, True, True]  # forgotten: only evidence lost
    cache.purge()
    assert not any(s.bypassed for s in scores) and cache.bypass.sizes()["bypassed"] == 0


def test_bypassed_reads_count_as_misses_with_their_reason_in_the_templates_stats() -> None:
    clock = FakeClock()
    cache = _cache(clock, window=1)
    score = cache.bypass.score("t1")
    cache.lookup_entry(_key(1), score)
    cache.record(cache.miss_ticket("t1", "SELECT ?", ("t",)), 0.001, 0)
    ticket = cache.pass_ticket(score, "t1", "SELECT ?", ("t",))
    assert cache.pass_ticket(score, "t1", "SELECT ?", ("t",)) is ticket  # one per template and bypass
    for _ in range(3):
        cache.record(ticket, 0.001, 0)
    got = template(cache.stats)
    # Misses: cacheable reads the origin answered (the hit rate stays honest), with the reason.
    assert dict(got.by_status) == {"miss": 4} and (got.hits, got.misses) == (0, 4)
    assert (got.last_status, got.last_reason) == ("miss", score.reason)
    assert cache.stats.snapshot().totals.passthrough == 0
    # The console shows the reason itself, not the status's generic meaning.
    assert fmt.status_explanation(got.last_status, got.last_reason) == score.reason
    # A miss after them (a probe) is the template's last status again, with no reason.
    cache.record(cache.miss_ticket("t1", "SELECT ?", ("t",)), 0.001, 0)
    got = template(cache.stats)
    assert (got.last_status, got.last_reason, dict(got.by_status)) == ("miss", None, {"miss": 5})


def test_a_memo_skips_only_the_reads_passes_would_pass_and_leaves_probes_and_hits_to_it() -> None:
    """`skips` (a session's memo, proxy/passes.py) before `passes` (the full path it falls back
    to): the same reads pass, the same probes are looked up, a hit still ends the bypass."""
    clock = FakeClock()
    cache = _cache(clock, window=4, probe_every=3, bypass_for=10.0)
    score = cache.bypass.score("t")
    for n in range(4):
        cache.lookup_entry(_key(n), score)
    seen = [cache.bypass.skips(score) or (score.bypassed and cache.bypass.passes(score)) for _ in range(6)]
    assert seen == [True, True, False, True, True, False] and cache.bypass.passed == 4
    score.hits = 1  # a hit memo's hit
    assert not cache.bypass.skips(score) and score.bypassed and score.skipped == 0  # nothing changed
    assert not cache.bypass.passes(score) and not score.bypassed

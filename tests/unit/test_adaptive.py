"""Adaptive TTL: learned only from what neonpoly did not see (refetches that changed)."""

from __future__ import annotations

from neonpoly.cache.adaptive import AdaptiveTTL
from neonpoly.cache.capture import Capture
from neonpoly.cache.invalidation import GenerationStamp
from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.store import MemoryStore
from neonpoly.stats import StatsRecorder


def test_nothing_learned_keeps_the_cache_ttl() -> None:
    learner = AdaptiveTTL()
    assert learner.ttl(["a"], 300.0, "q") == 300.0
    assert learner.ttl([], 300.0) == 300.0
    assert learner.explain("q") == "auto"


def test_refetches_that_change_shorten_the_template_ttl() -> None:
    learner = AdaptiveTTL(min_ttl=1.0)
    for _ in range(20):
        learner.on_refetch("stable", changed=False)
        learner.on_refetch("moving", changed=True)
    assert learner.ttl(["t"], 300.0, "stable") == 300.0
    assert learner.ttl(["t"], 300.0, "moving") < 100.0
    assert learner.ttl(["t"], 0.5, "moving") >= 0.375  # never above the cache's TTL, never below its floor
    assert learner.change_rate("moving") > 0.9
    assert "without a write through neonpoly" in learner.explain("moving")


def _capture(cache: QueryCache, payload: bytes) -> Capture:
    capture = Capture(b"k" * 32, "app", frozenset({"t"}), "tpl", cache.stamp("app", {"t"}))
    capture.frames.append(payload)
    return capture


def test_a_change_explained_by_a_write_through_neonpoly_teaches_nothing() -> None:
    seen: list[bool] = []
    store = MemoryStore(max_bytes=1 << 20)
    cache = QueryCache("c", store, StatsRecorder())
    cache.on_refetch = lambda template_id, changed: seen.append(changed)
    cache.store_capture(_capture(cache, b"one"))
    cache.invalidate("app", frozenset({"t"}), False)  # a write through neonpoly
    cache.store_capture(_capture(cache, b"two"))
    assert seen == []  # the stamp moved: the write explains the change
    cache.store_capture(_capture(cache, b"three"))  # same stamp, new answer: someone else wrote
    cache.store_capture(_capture(cache, b"three"))
    assert seen == [True, False]


def test_stamps_compare_by_value() -> None:
    a = GenerationStamp("app", 1, 0, (("t", 2),))
    assert a == GenerationStamp("app", 1, 0, (("t", 2),))


def test_a_refetch_is_compared_with_the_answer_stored_before_whatever_its_size() -> None:
    """Small answers are kept whole, larger ones by their digest (QueryCache.store_capture):
    either way, an unchanged refetch is told from a changed one, across the two sizes too."""
    seen: list[bool] = []
    cache = QueryCache("c", MemoryStore(max_bytes=1 << 20), StatsRecorder())
    cache.on_refetch = lambda template_id, changed: seen.append(changed)
    small, large = b"x" * 10, b"y" * 1000
    for payload in (small, small, large, large, b"y" * 999 + b"z", small, bytes(small)):
        cache.store_capture(_capture(cache, payload))
    assert seen == [False, True, False, True, True, False]

"""StatsRecorder with an injected clock."""

from __future__ import annotations

import json

import pytest

from neonpoly.stats import (
    MAX_TEMPLATES_PER_CACHE,
    OTHER_TEMPLATE_ID,
    SERIES_SECONDS,
    StatsRecorder,
)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


TABLES = ("public.users",)


def rec(stats: StatsRecorder, status: str, latency: float, *, cache: str = "c1",
        tpl: str = "t1", **kw: object) -> None:
    stats.record(cache, tpl, "SELECT * FROM users WHERE id = $1", TABLES, status, latency,
                 **kw)  # type: ignore[arg-type]


def test_counts_hit_rate_and_statuses() -> None:
    stats = StatsRecorder(FakeClock())
    rec(stats, "miss", 0.010)
    rec(stats, "hit", 0.001, bytes_served=100)
    rec(stats, "hit", 0.001, bytes_served=50)
    rec(stats, "transaction", 0.02, reason="inside BEGIN")
    snap = stats.snapshot("c1")
    assert snap.totals.calls == 4 and snap.totals.hits == 2 and snap.totals.misses == 1
    # hits / (hits + misses): the pass-through query had no chance to hit, so it does not count.
    assert snap.totals.passthrough == 1 and snap.totals.hit_rate == pytest.approx(2 / 3)
    assert snap.totals.bytes_served == 150
    (t,) = snap.templates
    assert t.hit_rate == pytest.approx(2 / 3)
    assert t.by_status == (("hit", 2), ("miss", 1), ("transaction", 1))
    assert t.last_status == "transaction" and t.last_reason == "inside BEGIN"
    assert t.template == "SELECT * FROM users WHERE id = $1" and t.tables == TABLES


def test_time_saved_uses_miss_p50_or_origin_time() -> None:
    stats = StatsRecorder(FakeClock())
    rec(stats, "hit", 0.001)  # no miss seen yet: nothing known to have been saved
    for _ in range(3):
        rec(stats, "miss", 0.100)
    rec(stats, "hit", 0.001)
    rec(stats, "hit", 0.001, origin_time_s=0.050)
    t = stats.snapshot().templates[0]
    assert t.miss_p50_s == pytest.approx(0.1, rel=0.1)
    assert t.time_saved_s == pytest.approx((0.1 - 0.001) + (0.05 - 0.001), rel=0.1)
    assert stats.snapshot().totals.time_saved_s == t.time_saved_s


def test_percentiles_are_bounded_error() -> None:
    stats = StatsRecorder(FakeClock())
    for i in range(1, 1001):
        rec(stats, "miss", i / 1000)  # 1 ms .. 1 s uniform
    t = stats.snapshot().templates[0]
    assert t.miss_p50_s == pytest.approx(0.5, rel=0.12)
    assert t.miss_p95_s == pytest.approx(0.95, rel=0.12)
    assert t.hit_p50_s is None


def test_series_per_second_and_window() -> None:
    clock = FakeClock()
    stats = StatsRecorder(clock)
    rec(stats, "hit", 0.001)
    rec(stats, "miss", 0.01, cache="c2")
    clock.now += 1
    rec(stats, "bypass", 0.01)
    snap = stats.snapshot()
    assert len(snap.series.hits) == SERIES_SECONDS
    assert snap.series.start_second == int(clock.now) - SERIES_SECONDS + 1
    assert snap.series.hits[-2:] == (1, 0)
    assert snap.series.misses[-2:] == (1, 0)
    assert snap.series.passthrough[-2:] == (0, 1)
    c1 = stats.snapshot("c1").series
    assert c1.misses[-2:] == (0, 0) and c1.hits[-2:] == (1, 0)
    clock.now += SERIES_SECONDS  # the old seconds scroll out, even where slots are reused
    rec(stats, "miss", 0.01)
    snap = stats.snapshot()
    assert sum(snap.series.hits) == 0 and sum(snap.series.passthrough) == 0
    assert snap.series.misses[-1] == 1


def test_per_cache_global_forget_reset_and_ttl() -> None:
    stats = StatsRecorder(FakeClock())
    rec(stats, "hit", 0.001, cache="a")
    rec(stats, "miss", 0.001, cache="b", tpl="t2")
    stats.set_ttl("b", "t2", 30.0)
    stats.set_ttl("b", "unknown", 30.0)  # ignored
    assert stats.snapshot().caches == ("a", "b")
    assert stats.snapshot().totals.calls == 2
    assert stats.snapshot("b").templates[0].ttl == 30.0
    assert stats.snapshot("nope").totals.calls == 0
    stats.forget_cache("a")
    assert stats.snapshot().totals.calls == 1
    stats.reset()
    assert stats.snapshot().totals.calls == 0 and sum(stats.snapshot().series.misses) == 0


def test_templates_past_the_cap_fold_into_other() -> None:
    stats = StatsRecorder(FakeClock())
    for i in range(MAX_TEMPLATES_PER_CACHE + 5):
        stats.record("c", f"t{i}", f"SELECT {i}", (), "miss", 0.001)
    snap = stats.snapshot("c")
    assert len(snap.templates) == MAX_TEMPLATES_PER_CACHE + 1
    other = next(t for t in snap.templates if t.template_id == OTHER_TEMPLATE_ID)
    assert other.calls == 5


def test_snapshot_is_frozen_and_json_ready() -> None:
    stats = StatsRecorder(FakeClock())
    rec(stats, "hit", 0.001)
    snap = stats.snapshot()
    with pytest.raises(AttributeError):
        snap.totals.calls = 5  # type: ignore[misc]
    data = json.loads(json.dumps(snap.to_dict()))
    assert data["totals"]["hits"] == 1 and data["templates"][0]["template_id"] == "t1"


def test_ttl_decided_before_the_first_query_is_kept() -> None:
    rec = StatsRecorder(clock=lambda: 1000.0)
    rec.set_ttl("c", "t1", 42.0)  # the policy decides before the query is counted
    rec.record("c", "t1", "SELECT ?", (), "miss", 0.001)
    assert rec.snapshot("c").templates[0].ttl == 42.0


def test_hit_rate_is_zero_before_any_cacheable_lookup() -> None:
    stats = StatsRecorder(FakeClock())
    rec(stats, "bypass", 0.01)
    snap = stats.snapshot()
    assert snap.totals.hit_rate == 0.0 and snap.templates[0].hit_rate == 0.0


def test_a_latency_falls_in_the_bucket_the_log_formula_gives() -> None:
    """The hot paths find a latency's histogram bucket by bisecting `_BOUNDS`: the same bucket
    as the log formula, at every bucket's edge (one ulp either side) and in between."""
    import math
    import random
    from bisect import bisect_right as _bisect

    from neonpoly.stats import _BOUNDS, _HIST_MIN_S, _bucket_by_log

    edges = [_HIST_MIN_S, *_BOUNDS]
    samples = [0.0, -1.0, 1e-9, 1e9, 1e300]
    for edge in edges:
        samples += [math.nextafter(edge, 0.0), edge, math.nextafter(edge, math.inf)]
    rng = random.Random(5)
    samples += [_HIST_MIN_S * 10 ** rng.uniform(-1, 9) for _ in range(20_000)]
    assert [_bisect(_BOUNDS, s) for s in samples] == [_bucket_by_log(s) for s in samples]
    assert [_bisect(_BOUNDS, e) for e in _BOUNDS] == list(range(1, len(_BOUNDS) + 1))

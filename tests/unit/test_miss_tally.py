"""Plain misses are counted in their template's tally (a few int operations per miss, like
memo hits: tests/unit/test_hit_tally.py) and folded in before anyone reads the counters:
every view must show exactly what one `record` per miss would have shown."""

from __future__ import annotations

import logging

import pytest

from neonpoly.cache.cacheability import WINDOW
from neonpoly.cache.capture import StatTicket
from neonpoly.cache.entry import CacheStore
from neonpoly.cache.query_cache import QueryCache
from neonpoly.stats import StatsRecorder
from tests.unit.stats_clock import FakeClock, template

SQL = "SELECT * FROM users WHERE id = ?"
TABLES = ("public.users",)


def test_tallied_misses_and_hits_show_as_recorded_ones_in_every_order() -> None:
    clock = FakeClock()
    # `reckoned` is given each second's hits before its misses once there were misses before
    # that second (the hits are priced by those), its misses first otherwise (priced by the
    # second's own): what a tally reckons, without a fold at each change of kind.
    recorded, reckoned, tallied = StatsRecorder(clock), StatsRecorder(clock), StatsRecorder(clock)
    tally = tallied.tally("c1", "t1", SQL, TABLES)
    # Runs of misses and hits, a second changing in the middle of a run.
    steps = [("miss", 0.010), ("miss", 0.020), ("hit", 0.001), ("hit", 0.002), ("miss", 0.040),
             ("tick", 0), ("miss", 0.030), ("hit", 0.001), ("miss", 0.005)]  # fmt: skip
    second: list[tuple[str, float]] = []
    for kind, latency in [*steps, ("tick", 0)]:
        if kind == "tick":
            missed_before = template(reckoned).misses if reckoned.snapshot().templates else 0
            for k, lat in sorted(second, key=lambda s: (s[0] == "hit") != bool(missed_before)):
                reckoned.record("c1", "t1", SQL, TABLES, k, lat, 10 if k == "hit" else 0)
            second = []
            clock.now += 1
            continue
        second.append((kind, latency))
        recorded.record("c1", "t1", SQL, TABLES, kind, latency, 10 if kind == "hit" else 0)
        if kind == "hit":
            tallied.hit(tally, latency, 10)
        else:
            tallied.miss(tally, latency)
    clock.now -= 1
    want, got = template(recorded), template(tallied)
    assert (got.calls, got.hits, got.misses, got.by_status) == (want.calls, want.hits, want.misses, want.by_status)
    assert (got.misses, got.hits) == (5, 3)
    assert (got.miss_p50_s, got.miss_p95_s, got.hit_p50_s) == (want.miss_p50_s, want.miss_p95_s, want.hit_p50_s)
    assert (got.last_status, got.last_seen, got.bytes_served) == ("miss", want.last_seen, 30)
    assert abs(got.time_saved_s - template(reckoned).time_saved_s) < 1e-9
    assert got.time_saved_s != want.time_saved_s  # the steps tell the two reckonings apart
    got_totals, want_totals = tallied.snapshot().totals, recorded.snapshot().totals
    assert abs(got_totals.time_saved_s - reckoned.snapshot().totals.time_saved_s) < 1e-9  # summed in another order
    assert (got_totals.calls, got_totals.misses, got_totals.hits, got_totals.by_status) == (
        want_totals.calls, want_totals.misses, want_totals.hits, want_totals.by_status
    )  # fmt: skip
    assert tallied.snapshot().series == recorded.snapshot().series


def test_a_recorded_status_after_tallied_misses_comes_after_them() -> None:
    stats = StatsRecorder(FakeClock())
    tally = stats.tally("c1", "t1", SQL, TABLES)
    stats.miss(tally, 0.01)
    stats.record("c1", "t1", SQL, TABLES, "transaction", 0.01)
    got = template(stats)
    assert (got.misses, got.calls, got.last_status) == (1, 2, "transaction")


def test_reset_drops_tallied_misses() -> None:
    stats = StatsRecorder(FakeClock())
    tally = stats.tally("c1", "t1", SQL, TABLES)
    stats.miss(tally, 0.01)
    stats.reset()
    assert stats.snapshot().totals.misses == 0
    stats.miss(tally, 0.01)
    assert stats.snapshot().totals.misses == 1


class _NoStore:
    """Only what `QueryCache.record` and `miss_ticket` touch: nothing."""


def _cache(stats: StatsRecorder) -> QueryCache:
    store: CacheStore = _NoStore()  # type: ignore[assignment]
    return QueryCache("c1", store, stats)


def test_a_caches_plain_misses_are_tallied_and_shown_by_every_reader() -> None:
    stats = StatsRecorder(FakeClock())
    cache = _cache(stats)
    ticket = cache.miss_ticket("t1", SQL, TABLES)
    assert cache.miss_ticket("t1", SQL, TABLES) is ticket  # one per template
    for _ in range(3):
        cache.record(ticket, 0.01, 0)
    assert not stats._caches  # tallied, not recorded one by one
    assert (template(stats).misses, stats.snapshot().totals.misses) == (3, 3)


def test_misses_with_a_reason_are_recorded_with_it() -> None:
    stats = StatsRecorder(FakeClock())
    cache = _cache(stats)
    for i in range(WINDOW):  # its entries die unread: not stored for a while
        cache.cacheability.stored(bytes([i]), "t1")
        cache.cacheability.missed(bytes([i]))
    assert cache.cacheability.suppressing
    cache.record(cache.miss_ticket("t1", SQL, TABLES), 0.01, 0)
    got = template(stats)
    assert got.misses == 1 and got.last_reason is not None and "not stored" in got.last_reason
    cache.record(StatTicket("t1", SQL, TABLES, "miss", "a reason"), 0.01, 0)
    assert template(stats).last_reason == "a reason"


def test_every_miss_is_logged_while_debugging(caplog: pytest.LogCaptureFixture) -> None:
    stats = StatsRecorder(FakeClock())
    cache = _cache(stats)
    with caplog.at_level(logging.DEBUG, logger="neonpoly.cache"):
        cache.record(cache.miss_ticket("t1", SQL, TABLES), 0.01, 0)
    assert any("status=miss" in r.getMessage() for r in caplog.records)
    assert template(stats).misses == 1


def test_a_tally_dropped_by_the_bound_counts_again_in_the_same_second(monkeypatch: pytest.MonkeyPatch) -> None:
    import neonpoly.stats

    monkeypatch.setattr(neonpoly.stats, "MAX_TALLIES", 3)
    stats = StatsRecorder(FakeClock())  # the clock never moves: no second change to lean on
    first = stats.tally("c1", "t0", SQL, TABLES)
    stats.miss(first, 0.01)
    for i in range(1, 4):  # the third new one drops them all (folded first)
        stats.miss(stats.tally("c1", f"t{i}", SQL, TABLES), 0.01)
    stats.miss(first, 0.01)
    stats.hit(first, 0.001, 10)
    assert stats.snapshot().totals.misses == 5
    assert stats.snapshot().totals.hits == 1
    stats.forget_cache("c1")
    stats.miss(first, 0.01)
    assert (stats.snapshot().totals.misses, stats.snapshot().totals.hits) == (1, 0)


def test_the_kind_counted_last_in_a_second_is_the_last_status() -> None:
    stats = StatsRecorder(FakeClock())
    tally = stats.tally("c1", "t1", SQL, TABLES)
    for kinds, last in ((("miss", "hit"), "hit"), (("hit", "miss", "hit", "miss"), "miss")):
        for kind in kinds:
            if kind == "hit":
                stats.hit(tally, 0.001, 10)
            else:
                stats.miss(tally, 0.01)
        assert template(stats).last_status == last


def test_a_seconds_slow_misses_do_not_price_its_many_hits() -> None:
    """1000 memo hits, then two slow misses in the same second: the hits are priced by the
    1 ms miss before that second, not by the two slow ones (which once made the console show
    some 2,000 s saved)."""
    clock = FakeClock()
    stats = StatsRecorder(clock)
    tally = stats.tally("c1", "t1", SQL, TABLES)
    stats.miss(tally, 0.001)
    clock.now += 1
    for _ in range(1000):
        stats.hit(tally, 0.0001, 10)
    stats.miss(tally, 2.0)
    stats.miss(tally, 2.0)
    got = template(stats)
    assert (got.hits, got.misses, got.last_status) == (1000, 3, "miss")
    assert 0 < got.time_saved_s < 1.0  # about 1000 x (1 ms - 0.1 ms)

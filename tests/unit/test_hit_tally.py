"""Hits answered from a session's hit memo are counted in a `HitTally` (a few int operations
per hit) and folded into the counters later: every view must show exactly what one `record`
per hit would have shown."""

from __future__ import annotations

from neonpoly.stats import SERIES_SECONDS, StatsRecorder
from tests.unit.stats_clock import FakeClock, template

SQL = "SELECT * FROM users WHERE id = $1"
TABLES = ("public.users",)


def test_tallied_hits_show_as_recorded_hits() -> None:
    clock = FakeClock()
    recorded, tallied = StatsRecorder(clock), StatsRecorder(clock)
    for stats in (recorded, tallied):
        stats.record("c1", "t1", SQL, TABLES, "miss", 0.010)
    tally = tallied.tally("c1", "t1", SQL, TABLES)
    for latency, size in ((0.001, 100), (0.002, 50), (0.001, 10)):
        recorded.record("c1", "t1", SQL, TABLES, "hit", latency, size)
        tallied.hit(tally, latency, size)
    want, got = template(recorded), template(tallied)
    assert (
        (got.calls, got.hits, got.misses, got.bytes_served)
        == (want.calls, want.hits, want.misses, 160)
        == (4, 3, 1, 160)
    )
    assert (got.hit_p50_s, got.hit_p95_s, got.last_status) == (want.hit_p50_s, want.hit_p95_s, "hit")
    assert abs(got.time_saved_s - want.time_saved_s) < 1e-9
    got_totals, want_totals = tallied.snapshot().totals, recorded.snapshot().totals
    assert abs(got_totals.time_saved_s - want_totals.time_saved_s) < 1e-9  # summed in another order
    assert (got_totals.calls, got_totals.hits, got_totals.by_status) == (
        want_totals.calls,
        want_totals.hits,
        want_totals.by_status,
    )
    assert tallied.snapshot().series == recorded.snapshot().series


def test_a_later_miss_stays_the_last_status() -> None:
    stats = StatsRecorder(FakeClock())
    tally = stats.tally("c1", "t1", SQL, TABLES)
    stats.hit(tally, 0.001, 10)
    stats.record("c1", "t1", SQL, TABLES, "miss", 0.010)
    assert template(stats).last_status == "miss"
    assert template(stats).hits == 1


def test_hits_land_in_the_second_they_happened() -> None:
    clock = FakeClock()
    stats = StatsRecorder(clock)
    tally = stats.tally("c1", "t1", SQL, TABLES)
    stats.hit(tally, 0.001, 10)
    stats.hit(tally, 0.001, 10)
    clock.now += 1
    stats.hit(tally, 0.001, 10)
    clock.now += 1
    series = stats.snapshot("c1").series
    assert series.hits[-3:] == (2, 1, 0)
    assert len(series.hits) == SERIES_SECONDS


def test_reset_and_forget_drop_what_was_tallied() -> None:
    stats = StatsRecorder(FakeClock())
    tally = stats.tally("c1", "t1", SQL, TABLES)
    stats.hit(tally, 0.001, 10)
    stats.reset()
    assert stats.snapshot().totals.hits == 0
    stats.hit(tally, 0.001, 10)  # the memo keeps its tally: counted after a reset too
    assert stats.snapshot().totals.hits == 1
    stats.hit(tally, 0.001, 10)
    stats.forget_cache("c1")
    assert stats.snapshot().totals.hits == 0


def test_tallied_writes_show_as_recorded_writes() -> None:
    # A remembered write's ticket is counted in its template's tally (StatsRecorder.other):
    # every view shows what one `record` per write would have shown, across seconds and a
    # change of status, the last one's status and reason the template's.
    clock = FakeClock()
    recorded, tallied = StatsRecorder(clock), StatsRecorder(clock)
    sql = "UPDATE t SET v = ? WHERE id = ?"
    tally = tallied.tally("c1", "w1", sql, TABLES)
    steps = ((0.1, "uncacheable", "writes t"), (0.2, "uncacheable", "writes t"), (0.1, "transaction", "in BEGIN"),
             (1.0, "uncacheable", "writes t"), (0.1, "uncacheable", "writes t, again"))  # fmt: skip
    for step, status, reason in steps:
        clock.now += step
        recorded.record("c1", "w1", sql, TABLES, status, 0.002, reason=reason)
        tallied.other(tally, status, reason)
    want, got = template(recorded), template(tallied)
    shown = [(s.calls, s.by_status, s.last_status, s.last_reason) for s in (got, want)]
    assert shown[0] == shown[1] == (5, (("transaction", 1), ("uncacheable", 4)), "uncacheable", "writes t, again")
    assert tallied.snapshot().series == recorded.snapshot().series
    assert tallied.snapshot().totals.passthrough == recorded.snapshot().totals.passthrough == 5

"""admin/reports.py: a worker's report survives JSON, and several add up as each figure means."""

from __future__ import annotations

import json

from neonpoly.admin.reports import decode_report, encode, merge
from neonpoly.freshness.changefeed import FeedStatus
from neonpoly.service import CacheReport, ServiceReport, TemplateReport
from neonpoly.stats import TemplateStats, Totals


def _totals(hits: int, misses: int, other: int = 0) -> Totals:
    by_status = tuple(sorted({"hit": hits, "miss": misses, **({"uncacheable": other} if other else {})}.items()))
    calls = hits + misses + other
    return Totals(calls, hits, misses, other, hits / (hits + misses), by_status, hits * 0.001, hits * 10)


def _report(hits: int, misses: int, *, feed: str, p50: float, seen: float) -> ServiceReport:
    totals = _totals(hits, misses, 1)
    feeds = (FeedStatus("o", "app", "live", "", 1.0, 5, None, 2, 2, 0, 0, 1, "poll", "test_decoding", "s", None),)
    cache = CacheReport("c1", True, "auto", "h:1", 300.0, 3, 300, 1000, 2, totals, feed, feeds if feed == "on" else ())
    stats = TemplateStats(
        "c1", "t1", "SELECT $1", ("t",), hits + misses, hits, misses, 0.5, (("hit", hits), ("miss", misses)),
        p50, p50, p50, p50, 0.1, 100, seen, "hit", None, 300.0,
    )  # fmt: skip
    return ServiceReport((cache,), totals, (TemplateReport(stats, 300.0, f"seen {seen}"),))


def test_a_report_survives_json() -> None:
    report = _report(3, 2, feed="on", p50=0.001, seen=10.0)
    assert decode_report(json.loads(json.dumps(encode(report)))) == report


def test_reports_add_up() -> None:
    own = _report(3, 1, feed="off: another worker runs it", p50=0.001, seen=10.0)
    other = _report(1, 1, feed="on", p50=0.003, seen=20.0)
    merged = merge(own, [decode_report(json.loads(json.dumps(encode(other))))])
    assert merged.totals.hits == 4 and merged.totals.misses == 2 and merged.totals.calls == 8
    assert merged.totals.hit_rate == 4 / 6
    assert dict(merged.totals.by_status) == {"hit": 4, "miss": 2, "uncacheable": 2}
    (cache,) = merged.caches
    assert (cache.entries, cache.bytes, cache.max_bytes, cache.connections) == (6, 600, 2000, 4)
    assert cache.change_feed == "on" and len(cache.feeds) == 1  # the worker running the feed describes it
    (template,) = merged.templates
    assert template.stats.calls == 6 and template.stats.hits == 4
    assert abs((template.stats.hit_p50_s or 0) - (0.001 * 3 + 0.003 * 1) / 4) < 1e-12  # weighted by hits
    assert template.ttl_source == "seen 20.0"  # the latest worker's word on the TTL

"""Counters behind every view of the cache (TUI, CLI, admin console, metrics).

`StatsRecorder.record` runs once per query on the proxy's event loop, so it only bumps ints
and one log-bucket histogram; anything costly (percentiles, series windows, sorting) happens
in `snapshot`. Stats only ever receive query *templates*, never literal values.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right as _bisect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

Clock = Callable[[], float]

SERIES_SECONDS = 900  # 15 minutes of per-second buckets
MAX_TEMPLATES_PER_CACHE = 10_000
OTHER_TEMPLATE_ID = "(other)"  # where templates past the cap are folded, to bound memory
HIT = "hit"
MISS = "miss"
# The last of a tally's reads was one not looked up (cache/bypass.py): counted as a miss (a
# cacheable read the origin answered, so the hit rate stays the share of cacheable reads
# served from cache), its reason shown as the template's last.
_NOT_LOOKED_UP = "miss, not looked up"
_OTHER = "other"  # the last was of another status (`StatsRecorder.other`): the tally's `other_status`

# Log-bucket latency histogram: 1 µs .. ~190 s in steps of 20%, so any percentile is
# within ~10% of the truth whatever the number of samples.
_HIST_MIN_S = 1e-6
_HIST_RATIO = 1.2
_HIST_LOG_RATIO = math.log(_HIST_RATIO)
_HIST_BUCKETS = 105


def _bucket_by_log(latency_s: float) -> int:
    if latency_s <= _HIST_MIN_S:
        return 0
    i = int(math.log(latency_s / _HIST_MIN_S) / _HIST_LOG_RATIO) + 1
    return i if i < _HIST_BUCKETS else _HIST_BUCKETS - 1


def _least(i: int) -> float:
    """The least latency `_bucket_by_log` puts in bucket i or above (a power nudged by ulps)."""
    x = _HIST_MIN_S * _HIST_RATIO ** (i - 1)
    while _bucket_by_log(x) >= i:
        x = math.nextafter(x, 0.0)
    while _bucket_by_log(x) < i:
        x = math.nextafter(x, math.inf)
    return x


# Where each bucket past 0 starts: a latency's bucket is `_bisect(_BOUNDS, latency_s)`, one
# C call, exactly `_bucket_by_log`'s for ~0.6k instructions less a hit (no log, int(), division).
_BOUNDS = [_least(i) for i in range(1, _HIST_BUCKETS)]


def _bucket_value(i: int) -> float:
    if i == 0:
        return _HIST_MIN_S
    # Geometric middle of [min*r^(i-1), min*r^i).
    return float(_HIST_MIN_S * _HIST_RATIO ** (i - 0.5))


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _HIST_BUCKETS
        self.total = 0

    def add(self, latency_s: float) -> None:
        self.counts[_bisect(_BOUNDS, latency_s)] += 1
        self.total += 1

    def quantile(self, q: float) -> float | None:
        if self.total == 0:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return _bucket_value(i)
        return _bucket_value(_HIST_BUCKETS - 1)


class _Series:
    """Ring of per-second hit/miss/pass-through counts; a slot is reset when reused."""

    __slots__ = ("hits", "misses", "passthrough", "seconds")

    def __init__(self) -> None:
        self.seconds = [-1] * SERIES_SECONDS
        self.hits = [0] * SERIES_SECONDS
        self.misses = [0] * SERIES_SECONDS
        self.passthrough = [0] * SERIES_SECONDS

    def add(self, second: int, status: str, n: int = 1, *, late: bool = False) -> None:
        i = second % SERIES_SECONDS
        if self.seconds[i] != second:
            if late and self.seconds[i] > second:
                return  # counts folded late, for a second whose slot a later one took: gone
            self.seconds[i] = second
            self.hits[i] = self.misses[i] = self.passthrough[i] = 0
        if status == HIT:
            self.hits[i] += n
        elif status == MISS:
            self.misses[i] += n
        else:
            self.passthrough[i] += n

    def window(self, now_second: int) -> SeriesSnapshot:
        start = now_second - SERIES_SECONDS + 1
        hits: list[int] = []
        misses: list[int] = []
        passthrough: list[int] = []
        for s in range(start, now_second + 1):
            i = s % SERIES_SECONDS
            live = self.seconds[i] == s
            hits.append(self.hits[i] if live else 0)
            misses.append(self.misses[i] if live else 0)
            passthrough.append(self.passthrough[i] if live else 0)
        return SeriesSnapshot(start, tuple(hits), tuple(misses), tuple(passthrough))


class _TemplateCounters:
    __slots__ = ("by_status", "bytes_served", "calls", "hit_latency", "last_reason",
                 "last_seen", "last_status", "miss_latency", "miss_p50", "tables",
                 "template", "time_saved_s", "ttl")

    def __init__(self, template: str, tables: tuple[str, ...]) -> None:
        self.template = template
        self.tables = tables
        self.calls = 0
        self.by_status: dict[str, int] = {}
        self.hit_latency = _Histogram()
        self.miss_latency = _Histogram()
        self.miss_p50: float | None = None  # cached; reset to None when a miss arrives
        self.time_saved_s = 0.0
        self.bytes_served = 0
        self.last_seen = 0.0
        self.last_status = ""
        self.last_reason: str | None = None
        self.ttl: float | None = None


class _CacheCounters:
    __slots__ = ("by_status", "bytes_served", "calls", "series", "templates", "time_saved_s")

    def __init__(self) -> None:
        self.templates: dict[str, _TemplateCounters] = {}
        self.calls = 0
        self.by_status: dict[str, int] = {}
        self.time_saved_s = 0.0
        self.bytes_served = 0
        self.series = _Series()


# -- snapshots (what renderers get) --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SeriesSnapshot:
    start_second: int  # epoch second of the first element; one element per second
    hits: tuple[int, ...]
    misses: tuple[int, ...]
    passthrough: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TemplateStats:
    cache_id: str
    template_id: str
    template: str
    tables: tuple[str, ...]
    calls: int
    hits: int
    misses: int
    hit_rate: float  # see `hit_rate`
    by_status: tuple[tuple[str, int], ...]  # sorted by status word
    hit_p50_s: float | None
    hit_p95_s: float | None
    miss_p50_s: float | None
    miss_p95_s: float | None
    time_saved_s: float
    bytes_served: int
    last_seen: float
    last_status: str
    last_reason: str | None
    ttl: float | None


@dataclass(frozen=True, slots=True)
class Totals:
    calls: int
    hits: int
    misses: int
    passthrough: int
    hit_rate: float  # see `hit_rate`
    by_status: tuple[tuple[str, int], ...]
    time_saved_s: float
    bytes_served: int


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    cache_id: str | None  # None: every cache
    taken_at: float
    caches: tuple[str, ...]
    totals: Totals
    templates: tuple[TemplateStats, ...]  # most called first
    series: SeriesSnapshot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hit_rate(hits: int, misses: int) -> float:
    """The one definition every view shows: hits / (hits + misses), the share of cacheable
    lookups answered from the cache, as PolyScale reported it. Pass-through queries (writes,
    transactions, bypassed statements) never had a chance to hit, so counting them would make
    a write-heavy app look like a bad cache. 0.0 before any cacheable lookup; renderers that
    must tell "none yet" from 0% check hits + misses themselves."""
    cacheable = hits + misses
    return hits / cacheable if cacheable else 0.0


def _totals(calls: int, by_status: dict[str, int], saved: float, served: int) -> Totals:
    hits = by_status.get(HIT, 0)
    misses = by_status.get(MISS, 0)
    return Totals(
        calls,
        hits,
        misses,
        calls - hits - misses,
        hit_rate(hits, misses),
        tuple(sorted(by_status.items())),
        saved,
        served,
    )


class HitTally:
    """Hits of one template answered from a session's hit memo (proxy/hits.py), and plain
    misses of it (a first sighting must cost next to nothing) and its reads passed through while
    its lookups are bypassed (cache/bypass.py): the hot paths, so each is a
    few int operations here, folded into the recorder's counters by the next `snapshot` or
    `record` of the template, or as soon as the second changes (the per-second series stays
    exact). A tally holds the hits and the misses of one second both (folding at every change
    of kind cost each miss between hits two folds); its hits' time saved is reckoned against
    the misses before that second, or, when there were none, against the second's own.
    Made by `StatsRecorder.tally`, counted by `StatsRecorder.hit` and `StatsRecorder.miss`."""

    __slots__ = ("buckets", "bytes_served", "cache_id", "count", "epoch", "last", "last_kind", "latency_s",
                 "miss_buckets", "misses", "other_reason", "other_status", "others", "pass_reason", "passes",
                 "second", "tables", "template", "template_id")  # fmt: skip

    def __init__(self, cache_id: str, template_id: str, template: str, tables: tuple[str, ...]) -> None:
        self.cache_id = cache_id
        self.template_id = template_id
        self.template = template
        self.tables = tables
        self.second = -1  # the second the counts below belong to
        self.count = 0
        self.bytes_served = 0
        self.latency_s = 0.0
        self.last = 0.0
        self.buckets: dict[int, int] = {}  # hit latency histogram bucket -> hits
        self.misses = 0
        self.miss_buckets: dict[int, int] = {}  # miss latency histogram bucket -> misses
        self.passes = 0  # reads of a bypassed template (cache/bypass.py), passed through
        self.pass_reason = ""  # why, as the last of them said
        self.others = 0  # requests of another status (a remembered write's), all of this one:
        self.other_status = ""
        self.other_reason: str | None = None
        self.last_kind = HIT  # the status of the last one counted (the template's last status)
        self.epoch = -1  # the recorder's `_epoch` when registered: another, and it registers again


def _empty(tally: HitTally) -> None:
    tally.count = tally.bytes_served = tally.misses = tally.passes = tally.others = 0
    tally.latency_s = 0.0
    tally.buckets = {}
    tally.miss_buckets = {}


# Tallies kept (one per cache and template served from memos or missed); past it they are folded and
# dropped, and a memo's tally registers again on its next hit.
MAX_TALLIES = 4 * MAX_TEMPLATES_PER_CACHE


class StatsRecorder:
    """Per cache and per template counters. Not thread-safe: use from the event loop."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._caches: dict[str, _CacheCounters] = {}
        self._series = _Series()
        self._early_ttl: dict[tuple[str, str], float | None] = {}
        self._tallies: dict[tuple[str, str], HitTally] = {}
        # Bumped whenever tallies are dropped: one still counted (a hit memo's, a template's miss
        # ticket) registers again at its next count, so no snapshot ever misses what it holds.
        self._epoch = 0

    def record(self, cache_id: str, template_id: str, template: str, tables: tuple[str, ...],
               status: str, latency_s: float, bytes_served: int = 0,
               origin_time_s: float | None = None, *, reason: str | None = None) -> None:
        if self._tallies:
            pending = self._tallies.get((cache_id, template_id))
            if pending is not None and (pending.count or pending.misses or pending.passes or pending.others):
                self._fold(pending)  # hits and misses counted before this come first
        now = self._clock()
        cache = self._caches.get(cache_id)
        if cache is None:
            cache = self._caches[cache_id] = _CacheCounters()
        tpl = cache.templates.get(template_id)
        if tpl is None:
            if len(cache.templates) >= MAX_TEMPLATES_PER_CACHE:
                template_id, template, tables = OTHER_TEMPLATE_ID, OTHER_TEMPLATE_ID, ()
                tpl = cache.templates.get(template_id)
            if tpl is None:
                tpl = cache.templates[template_id] = _TemplateCounters(template, tables)
                tpl.ttl = self._early_ttl.pop((cache_id, template_id), tpl.ttl)

        tpl.calls += 1
        counts = tpl.by_status
        counts[status] = counts.get(status, 0) + 1
        tpl.last_seen = now
        tpl.last_status = status
        tpl.last_reason = reason
        cache.calls += 1
        counts = cache.by_status
        counts[status] = counts.get(status, 0) + 1

        if status in (HIT, MISS):
            # _Histogram.add written out: this runs for every hit and miss.
            bucket = _bisect(_BOUNDS, latency_s)
            histogram = tpl.hit_latency if status == HIT else tpl.miss_latency
            histogram.counts[bucket] += 1
            histogram.total += 1
        if status == HIT:
            typical = origin_time_s
            if typical is None:
                if tpl.miss_p50 is None:
                    tpl.miss_p50 = tpl.miss_latency.quantile(0.5)
                typical = tpl.miss_p50
            # Saved = what the origin would have taken minus what the hit took.
            saved = typical - latency_s if typical is not None and typical > latency_s else 0.0
            tpl.time_saved_s += saved
            cache.time_saved_s += saved
            tpl.bytes_served += bytes_served
            cache.bytes_served += bytes_served
        elif status == MISS:
            tpl.miss_p50 = None

        second = int(now)
        cache.series.add(second, status)
        self._series.add(second, status)

    def tally(self, cache_id: str, template_id: str, template: str, tables: tuple[str, ...]) -> HitTally:
        """The tally a hit memo counts this template's hits in (see `hit`)."""
        found = self._tallies.get((cache_id, template_id))
        if found is None:
            found = HitTally(cache_id, template_id, template, tables)
            self._register(found)
        return found

    def hit(self, tally: HitTally, latency_s: float, bytes_served: int) -> None:
        """One hit of a memo: counted in its tally, as `record(..., HIT, ...)` would count it."""
        now = self._clock()
        second = int(now)
        if second != tally.second or tally.epoch != self._epoch:
            self._new_second(tally, second)
        tally.count += 1
        tally.last_kind = HIT
        tally.bytes_served += bytes_served
        tally.latency_s += latency_s
        tally.last = now
        bucket = _bisect(_BOUNDS, latency_s)
        buckets = tally.buckets
        buckets[bucket] = buckets.get(bucket, 0) + 1

    def _new_second(self, tally: HitTally, second: int) -> None:
        """A tally's first count in a new second (or since a reset): what it holds is folded
        in first, and it is registered again if the bound or a reset dropped it. Called only
        then: the hot paths test the second inline (a call less per hit)."""
        if tally.count or tally.misses or tally.passes or tally.others:
            self._fold(tally)
        tally.second = second
        if self._tallies.get((tally.cache_id, tally.template_id)) is not tally:
            self._register(tally)  # dropped by the bound or a reset: counted again
        tally.epoch = self._epoch

    def miss(self, tally: HitTally, latency_s: float) -> None:
        """One plain miss (no reason to show): counted in its tally, as `record(..., MISS,
        ...)` would count it."""
        now = self._clock()
        second = int(now)
        if second != tally.second or tally.epoch != self._epoch:
            self._new_second(tally, second)
        tally.misses += 1
        tally.last_kind = MISS
        tally.last = now
        bucket = _bisect(_BOUNDS, latency_s)
        buckets = tally.miss_buckets
        buckets[bucket] = buckets.get(bucket, 0) + 1

    def passed(self, tally: HitTally, reason: str) -> None:
        """One read of a bypassed template, passed through (its latency is the origin's, not
        timed): counted in its tally as a miss with this reason, as `record(..., MISS, ...,
        reason=reason)` would count it (no latency sample)."""
        now = self._clock()
        second = int(now)
        if second != tally.second or tally.epoch != self._epoch:
            self._new_second(tally, second)
        tally.passes += 1
        tally.pass_reason = reason
        tally.last_kind = _NOT_LOOKED_UP
        tally.last = now

    def other(self, tally: HitTally, status: str, reason: str | None) -> None:
        """One request of another status than a hit or a miss (a write decided from its memo,
        proxy/writes.py: every write of a mix pays this): counted in its tally, as `record(...,
        status, ..., reason=reason)` would count it (no latency sample: it has none)."""
        now = self._clock()
        second = int(now)
        if second != tally.second or tally.epoch != self._epoch or (tally.others and tally.other_status != status):
            self._new_second(tally, second)  # (another status than those held: they are folded first)
        tally.others += 1
        tally.other_status = status
        tally.other_reason = reason
        tally.last_kind = _OTHER
        tally.last = now

    def _register(self, tally: HitTally) -> None:
        if len(self._tallies) >= MAX_TALLIES:
            self._fold_all()
            self._tallies.clear()
            self._epoch += 1
        self._tallies[(tally.cache_id, tally.template_id)] = tally

    def _fold_all(self) -> None:
        for tally in self._tallies.values():
            if tally.count or tally.misses or tally.passes or tally.others:
                self._fold(tally)

    def _fold(self, t: HitTally) -> None:
        """Add a tally's misses, then its passes, then its hits, to the counters, as one `record` each would
        have (time saved: what the origin would have taken for the hits minus what they took,
        in one sum); the status of the one counted last stays the template's last."""
        n = t.count
        cache = self._caches.get(t.cache_id)
        if cache is None:
            cache = self._caches[t.cache_id] = _CacheCounters()
        template_id = t.template_id
        tpl = cache.templates.get(template_id)
        if tpl is None:
            template, tables = t.template, t.tables
            if len(cache.templates) >= MAX_TEMPLATES_PER_CACHE:
                template_id, template, tables = OTHER_TEMPLATE_ID, OTHER_TEMPLATE_ID, ()
                tpl = cache.templates.get(template_id)
            if tpl is None:
                tpl = cache.templates[template_id] = _TemplateCounters(template, tables)
                tpl.ttl = self._early_ttl.pop((t.cache_id, template_id), tpl.ttl)
        typical: float | None = None
        if t.misses:
            if n:  # the hits are priced by the misses before this second's, when there are any:
                # a few slow misses after a second's many hits must not price all of them
                typical = tpl.miss_p50 if tpl.miss_p50 is not None else tpl.miss_latency.quantile(0.5)
            self._fold_misses(t, cache, tpl)
        if t.passes:
            self._count_run(cache, tpl, MISS, t.passes, t.last, t.second, {}, None)
            t.passes = 0
        if n:
            self._fold_hits(t, cache, tpl, typical)
        if t.others:
            self._count_run(cache, tpl, t.other_status, t.others, t.last, t.second, {}, None)
            t.others = 0
        # Counted by kind, but the template's last status is the one counted last.
        kind = t.last_kind
        if kind is _NOT_LOOKED_UP:
            tpl.last_status, tpl.last_reason = MISS, t.pass_reason
        elif kind is _OTHER:
            tpl.last_status, tpl.last_reason = t.other_status, t.other_reason
        else:
            tpl.last_status, tpl.last_reason = kind, None

    def _fold_hits(self, t: HitTally, cache: _CacheCounters, tpl: _TemplateCounters, typical: float | None) -> None:
        n = t.count
        self._count_run(cache, tpl, HIT, n, t.last, t.second, t.buckets, tpl.hit_latency)
        if typical is None:
            if tpl.miss_p50 is None:
                tpl.miss_p50 = tpl.miss_latency.quantile(0.5)
            typical = tpl.miss_p50
        saved = typical * n - t.latency_s if typical is not None and typical * n > t.latency_s else 0.0
        tpl.time_saved_s += saved
        cache.time_saved_s += saved
        tpl.bytes_served += t.bytes_served
        cache.bytes_served += t.bytes_served
        t.count = t.bytes_served = 0
        t.latency_s = 0.0
        t.buckets = {}

    def _fold_misses(self, t: HitTally, cache: _CacheCounters, tpl: _TemplateCounters) -> None:
        self._count_run(cache, tpl, MISS, t.misses, t.last, t.second, t.miss_buckets, tpl.miss_latency)
        tpl.miss_p50 = None
        t.misses = 0
        t.miss_buckets = {}

    def _count_run(
        self,
        cache: _CacheCounters,
        tpl: _TemplateCounters,
        status: str,
        n: int,
        last: float,
        second: int,
        buckets: dict[int, int],
        histogram: _Histogram | None,
    ) -> None:
        """A tally's run of `n` answers of one status, counted as `n` records would have been."""
        tpl.calls += n
        tpl.by_status[status] = tpl.by_status.get(status, 0) + n
        tpl.last_seen = last
        tpl.last_status = status
        tpl.last_reason = None
        cache.calls += n
        cache.by_status[status] = cache.by_status.get(status, 0) + n
        if histogram is not None:
            for bucket, count in buckets.items():
                histogram.counts[bucket] += count
            histogram.total += n
        cache.series.add(second, status, n, late=True)
        self._series.add(second, status, n, late=True)

    def set_ttl(self, cache_id: str, template_id: str, ttl: float | None) -> None:
        cache = self._caches.get(cache_id)
        tpl = cache.templates.get(template_id) if cache else None
        if tpl is not None:
            tpl.ttl = ttl
        else:
            # The TTL of a new template is decided before its first query is counted.
            if len(self._early_ttl) >= 1024:
                self._early_ttl.clear()
            self._early_ttl[(cache_id, template_id)] = ttl

    def forget_cache(self, cache_id: str) -> None:
        self._caches.pop(cache_id, None)
        for key in [k for k in self._tallies if k[0] == cache_id]:
            _empty(self._tallies.pop(key))
        self._epoch += 1

    def reset(self) -> None:
        self._caches.clear()
        for tally in self._tallies.values():  # memos keep them: emptied, not dropped
            _empty(tally)
        self._series = _Series()
        self._early_ttl.clear()

    def snapshot(self, cache_id: str | None = None) -> StatsSnapshot:
        self._fold_all()
        now = self._clock()
        if cache_id is None:
            chosen = dict(self._caches)
            series = self._series
        else:
            one = self._caches.get(cache_id)
            chosen = {cache_id: one} if one is not None else {}
            series = one.series if one is not None else _Series()
        templates = [self._template_stats(cid, tid, t)
                     for cid, cache in chosen.items() for tid, t in cache.templates.items()]
        templates.sort(key=lambda t: (-t.calls, t.cache_id, t.template_id))
        by_status: dict[str, int] = {}
        for cache in chosen.values():
            for status, n in cache.by_status.items():
                by_status[status] = by_status.get(status, 0) + n
        totals = _totals(sum(c.calls for c in chosen.values()), by_status,
                         sum(c.time_saved_s for c in chosen.values()),
                         sum(c.bytes_served for c in chosen.values()))
        return StatsSnapshot(cache_id, now, tuple(sorted(self._caches)), totals,
                             tuple(templates), series.window(int(now)))

    @staticmethod
    def _template_stats(cache_id: str, template_id: str, t: _TemplateCounters) -> TemplateStats:
        hits = t.by_status.get(HIT, 0)
        misses = t.by_status.get(MISS, 0)
        return TemplateStats(
            cache_id=cache_id, template_id=template_id, template=t.template, tables=t.tables,
            calls=t.calls, hits=hits, misses=misses, hit_rate=hit_rate(hits, misses),
            by_status=tuple(sorted(t.by_status.items())),
            hit_p50_s=t.hit_latency.quantile(0.5), hit_p95_s=t.hit_latency.quantile(0.95),
            miss_p50_s=t.miss_latency.quantile(0.5), miss_p95_s=t.miss_latency.quantile(0.95),
            time_saved_s=t.time_saved_s, bytes_served=t.bytes_served, last_seen=t.last_seen,
            last_status=t.last_status, last_reason=t.last_reason, ttl=t.ttl,
        )

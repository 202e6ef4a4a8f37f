"""Reports of several worker processes as one (`serve --workers N`).

Each worker owns its counters and its cache directory, so the figures a reader shows are sums:
a worker sends its `service.report()` as JSON (`encode`), the one answering the admin console
or a scrape of /metrics rebuilds the others' (`decode`) and adds them to its own (`merge`).

The codec is generic over the report's dataclasses (read from their type hints), so a field
added to a report travels without a change here. Merging follows each figure's meaning:
counters and sizes add up, a rate is recomputed from the summed counters, a template's latency
quantiles are the average of the workers' weighted by how many hits (misses) each measured
(quantiles do not add; this is an approximation and says so nowhere else), and what describes
the shared origin (its change feed, which one worker runs) is taken from the worker running it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Sequence
from typing import Any

from neonpoly.service import CacheReport, ServiceReport, TemplateReport
from neonpoly.stats import TemplateStats, Totals, hit_rate

# --- the codec ------------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """A report (any of its dataclasses) as JSON-ready lists, dicts and scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(tp: Any, value: Any) -> Any:
    """The inverse of `encode` for the type `tp` (a report dataclass, or any field's type)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return decode(options[0], value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in value)
        return tuple(decode(a, v) for a, v in zip(args, value, strict=True))
    if origin is list:
        return [decode(typing.get_args(tp)[0], v) for v in value]
    if origin is dict:
        key, item = typing.get_args(tp)
        return {decode(key, k): decode(item, v) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return tp(**{f.name: decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value})
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def decode_report(value: Any) -> ServiceReport:
    report = decode(ServiceReport, value)
    assert isinstance(report, ServiceReport)
    return report


# --- merging -------------------------------------------------------------------------------


def _statuses(parts: Sequence[tuple[tuple[str, int], ...]]) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for by_status in parts:
        for status, n in by_status:
            counts[status] = counts.get(status, 0) + n
    return tuple(sorted(counts.items()))


def merge_totals(parts: Sequence[Totals]) -> Totals:
    hits = sum(t.hits for t in parts)
    misses = sum(t.misses for t in parts)
    return Totals(
        calls=sum(t.calls for t in parts),
        hits=hits,
        misses=misses,
        passthrough=sum(t.passthrough for t in parts),
        hit_rate=hit_rate(hits, misses),
        by_status=_statuses([t.by_status for t in parts]),
        time_saved_s=sum(t.time_saved_s for t in parts),
        bytes_served=sum(t.bytes_served for t in parts),
    )


def _weighted(pairs: Sequence[tuple[float | None, int]]) -> float | None:
    known = [(v, w) for v, w in pairs if v is not None and w > 0]
    weight = sum(w for _, w in known)
    return sum(v * w for v, w in known) / weight if weight else None


def _merge_caches(parts: Sequence[CacheReport]) -> CacheReport:
    # A worker that still serves the cache (one that removed it reports no origin), and of
    # those the one that runs the origin's change feed, describes it.
    serving = [c for c in parts if c.origin] or list(parts)
    feeding = next((c for c in serving if c.change_feed.startswith("on")), serving[0])
    return dataclasses.replace(
        feeding,
        is_default=any(c.is_default for c in parts),
        entries=sum(c.entries for c in parts),
        bytes=sum(c.bytes for c in parts),
        max_bytes=sum(c.max_bytes for c in parts),
        connections=sum(c.connections for c in parts),
        totals=merge_totals([c.totals for c in parts]),
    )


def _merge_templates(parts: Sequence[TemplateReport]) -> TemplateReport:
    stats = [p.stats for p in parts]
    latest = max(parts, key=lambda p: p.stats.last_seen)
    s = latest.stats
    hits = sum(t.hits for t in stats)
    misses = sum(t.misses for t in stats)
    merged = TemplateStats(
        cache_id=s.cache_id,
        template_id=s.template_id,
        template=s.template,
        tables=s.tables,
        calls=sum(t.calls for t in stats),
        hits=hits,
        misses=misses,
        hit_rate=hit_rate(hits, misses),
        by_status=_statuses([t.by_status for t in stats]),
        hit_p50_s=_weighted([(t.hit_p50_s, t.hits) for t in stats]),
        hit_p95_s=_weighted([(t.hit_p95_s, t.hits) for t in stats]),
        miss_p50_s=_weighted([(t.miss_p50_s, t.misses) for t in stats]),
        miss_p95_s=_weighted([(t.miss_p95_s, t.misses) for t in stats]),
        time_saved_s=sum(t.time_saved_s for t in stats),
        bytes_served=sum(t.bytes_served for t in stats),
        last_seen=s.last_seen,
        last_status=s.last_status,
        last_reason=s.last_reason,
        ttl=s.ttl,
    )
    return TemplateReport(merged, latest.ttl, latest.ttl_source)


def merge(own: ServiceReport, others: Sequence[ServiceReport]) -> ServiceReport:
    """Every worker's figures as one report; `own` (the answering worker's) comes first, so
    what is not summed (the invalidation plane's state) is its own."""
    reports = [own, *others]
    caches: dict[str, list[CacheReport]] = {}
    for report in reports:
        for c in report.caches:
            caches.setdefault(c.cache_id, []).append(c)
    templates: dict[tuple[str, str], list[TemplateReport]] = {}
    for report in reports:
        for t in report.templates:
            templates.setdefault((t.stats.cache_id, t.stats.template_id), []).append(t)
    merged_templates = sorted(
        (_merge_templates(parts) for parts in templates.values()), key=lambda t: (-t.stats.calls, t.stats.template_id)
    )
    return dataclasses.replace(
        own,
        caches=tuple(_merge_caches(caches[cid]) for cid in sorted(caches)),
        totals=merge_totals([r.totals for r in reports]),
        templates=tuple(merged_templates),
    )

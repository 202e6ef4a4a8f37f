"""Adaptive TTL ("Auto" mode): learn how long a template's result may live from its tables' writes.

Writes seen through neonpoly already evict what they touch, so the TTL guards against the
writes neonpoly does *not* see (other clients of the origin). A table that neonpoly sees
written often is likely written often elsewhere too, so its results should live briefly; a
table never written may keep results for the cache's whole TTL.

Per table we keep an exponentially weighted mean of the interval between writes. The interval
used is the larger of that mean and the time since the last write, so a table whose writes
stop drifts back to the maximum TTL instead of staying short for ever. Then

    ttl(table) = clamp(factor * interval, min_ttl, max_ttl)

and a template over several tables takes the lowest. A write whose tables are unknown (DDL,
TRUNCATE, unparseable) counts as a write to every table of every database.

Writes neonpoly sees are only half the story: when an expired entry is fetched again and
the origin's answer has changed although no write went through neonpoly, someone writes
behind its back. Per template we keep a running rate of such changed refetches and shorten
the TTL by up to `refetch_weight` of it (a template whose refetches always change lives a
quarter as long with the default weight of 0.75).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_FACTOR = 0.5
DEFAULT_MIN_TTL = 1.0
# Weight of the newest interval in the running mean: reacts within a handful of writes.
_ALPHA = 0.3
_EVERYTHING = "\x00*"  # cannot collide with a table name
_MAX_TABLES = 100_000


@dataclass(slots=True)
class _WriteRate:
    last: float
    mean_interval: float | None = None
    writes: int = 1


class AdaptiveTTL:
    """Write-rate learner shared by every cache of a proxy (tables are per origin, and two
    caches of one origin see the same tables)."""

    def __init__(
        self,
        *,
        factor: float = DEFAULT_FACTOR,
        min_ttl: float = DEFAULT_MIN_TTL,
        clock: Callable[[], float] = time.monotonic,
        refetch_weight: float = 0.75,
    ) -> None:
        self.factor = factor
        self.min_ttl = min_ttl
        self.clock = clock
        self.refetch_weight = refetch_weight
        self._tables: dict[str, _WriteRate] = {}
        self._changed: dict[str, float] = {}  # template id -> running rate of changed refetches

    def on_write(self, database: str, tables: frozenset[str], everything: bool) -> None:
        """The QueryCache.on_write hook: one write through neonpoly touched these tables."""
        now = self.clock()
        names: Iterable[str] = (_EVERYTHING,) if everything else tables
        for name in names:
            self._note(name, now)

    def _note(self, name: str, now: float) -> None:
        rate = self._tables.get(name)
        if rate is None:
            if len(self._tables) >= _MAX_TABLES:
                self._tables.pop(next(iter(self._tables)))
            self._tables[name] = _WriteRate(now)
            return
        interval = max(now - rate.last, 0.0)
        if rate.mean_interval is None:
            rate.mean_interval = interval
        else:
            rate.mean_interval += _ALPHA * (interval - rate.mean_interval)
        rate.last = now
        rate.writes += 1

    def interval(self, table: str) -> float | None:
        """The write interval used for `table`, or None if it was never written."""
        now = self.clock()
        best: float | None = None
        for name in (table, _EVERYTHING):
            rate = self._tables.get(name)
            if rate is None:
                continue
            if rate.mean_interval is None:
                continue  # one write is an event, not a rate (a CREATE TABLE must not shorten every TTL)
            value = max(rate.mean_interval, now - rate.last)
            if best is None or value < best:
                best = value
        return best

    def on_refetch(self, template_id: str, changed: bool) -> None:
        """The QueryCache.on_refetch hook: an expired entry was fetched again."""
        if len(self._changed) >= _MAX_TABLES and template_id not in self._changed:
            self._changed.pop(next(iter(self._changed)))
        rate = self._changed.get(template_id, 0.0)
        self._changed[template_id] = rate + _ALPHA * ((1.0 if changed else 0.0) - rate)

    def change_rate(self, template_id: str) -> float:
        return self._changed.get(template_id, 0.0)

    def ttl(self, tables: Iterable[str], max_ttl: float, template_id: str | None = None) -> float:
        """The learned TTL for a template reading `tables`, within [min_ttl, max_ttl]."""
        low = min(self.min_ttl, max_ttl)
        if template_id is not None and template_id in self._changed:
            max_ttl = max(low, max_ttl * (1.0 - self.refetch_weight * self._changed[template_id]))
        # A query without tables (SELECT 1) is only touched by "everything" writes.
        names = list(tables) or [_EVERYTHING]
        result = max_ttl
        for table in names:
            interval = self.interval(table)
            if interval is not None:
                result = min(result, max(low, min(max_ttl, self.factor * interval)))
        return result

    def writes(self, table: str) -> int:
        rate = self._tables.get(table)
        return 0 if rate is None else rate.writes

"""Adaptive TTL ("Auto" mode): learn how long a template's result may live from what neonpoly
did *not* see.

Writes that go through neonpoly already evict what they touch before the writer hears back,
so they say nothing about how stale an entry can get: letting them shorten TTLs only made a
fresh query miss again after a CREATE TABLE and an INSERT (Time To First Hit lost). The TTL
guards against the other writers of the origin (another app, the SQL editor, a migration).
Their only trace is an expired entry fetched again whose answer changed although no write
through neonpoly touched its tables in between (the entry's generation stamp is unchanged).

Per template we keep a running rate of such changed refetches and shorten the TTL by up to
`refetch_weight` of it: a template whose refetches always change lives a quarter as long
with the default weight of 0.75; one whose refetches never change keeps the cache's TTL.

**With the change feed live**, the other writers are seen too: every commit on the origin
evicts what it changed (by key where the rows say so) before the next hit, and a feed that
stops evicts its database, so nothing stored under its protection outlives it. The TTL is
then a safety net, not the freshness mechanism: in auto mode a template whose tables the
feed follows (`RelationBook.followed`: permanent tables and views over them; an unlogged
table's changes never reach the stream) is capped by the feed's TTL (`FeedSettings.ttl`,
default one hour) instead of the cache's, still shortened by the refetch rate above (under
a live feed a changed refetch means a change the feed did not carry). The moment the feed is
not live (starting, reconnecting, idle, standby, off) the cache's TTL applies again; the
policy asks at every decision (cache/rules.py), never from a memo of another state.

The feed's table rates need no TTL of their own: under the feed an entry lives until the
next change of what it read, however long its TTL, and a template whose entries the feed
keeps evicting before anyone reads them stops being captured (cache/cacheability.py), which
is what a short TTL on a hot table would have bought.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_MIN_TTL = 1.0
# Weight of the newest refetch in the running rate: reacts within a handful of refetches.
_ALPHA = 0.3
_MAX_TEMPLATES = 100_000


class AdaptiveTTL:
    """Refetch-change learner shared by every cache of a proxy."""

    def __init__(self, *, min_ttl: float = DEFAULT_MIN_TTL, refetch_weight: float = 0.75) -> None:
        self.min_ttl = min_ttl
        self.refetch_weight = refetch_weight
        self._changed: dict[str, float] = {}  # template id -> running rate of changed refetches

    def on_refetch(self, template_id: str, changed: bool) -> None:
        """The QueryCache.on_refetch hook: an expired entry was fetched again with no write
        through neonpoly in between; `changed` when its answer differs."""
        if len(self._changed) >= _MAX_TEMPLATES and template_id not in self._changed:
            self._changed.pop(next(iter(self._changed)))
        rate = self._changed.get(template_id, 0.0)
        self._changed[template_id] = rate + _ALPHA * ((1.0 if changed else 0.0) - rate)

    def change_rate(self, template_id: str) -> float:
        return self._changed.get(template_id, 0.0)

    def ttl(self, tables: Iterable[str], max_ttl: float, template_id: str | None = None) -> float:
        """The learned TTL for a template, within [min_ttl, max_ttl]."""
        rate = self._changed.get(template_id, 0.0) if template_id is not None else 0.0
        if rate <= 0.0:
            return max_ttl
        low = min(self.min_ttl, max_ttl)
        return max(low, max_ttl * (1.0 - self.refetch_weight * rate))

    def explain(self, template_id: str) -> str:
        """Why the template's TTL is what it is, for SHOW QUERIES and the console."""
        rate = self._changed.get(template_id, 0.0)
        if rate < 0.005:
            return "auto"
        return f"auto: shortened, refetched answers changed {rate:.0%} of the time without a write through neonpoly"

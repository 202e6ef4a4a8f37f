"""Lookup bypass: a template whose lookups never hit stops being looked up.

A read that may be cached costs the proxy a key (a hash of the identity and the request), a
store lookup, an admission count and a miss's bookkeeping, all before it is forwarded. For a
template whose requests are nearly all first sightings (pgbench -S over a million rows, a
query by a fresh id every time) none of that ever pays: the cache cannot help, so it gets out
of the way. The cacheability score (cacheability.py) stops *capturing* a template whose stored
entries die unread; this stops *looking it up* at all when its lookups do not hit. Per (cache,
template), kept by `QueryCache.bypass`:

* every lookup's outcome is counted on the template's `LookupScore` (a miss: one decrement of
  `left`; a hit, also from a session's hit memo: one increment of `hits`);
* when `WINDOW` lookups missed, the template is judged: fewer than `MAX_HIT_RATE` of its
  lookups hit (at most 5 hits beside 512 misses) and it is **bypassed**: its reads are
  forwarded as pass-through forwards them (no key, no lookup, no admission, no capture),
  counted as misses (cacheable reads the origin answered) with the reason;
* while bypassed, 1 in `PROBE_EVERY` of its reads still takes the full path (looked up,
  counted for admission, captured), and any hit (a probe's, or a hit memo's) ends the bypass
  at its next read; so does `BYPASS_FOR` seconds passing (seen at the next probe): then the
  template is judged from scratch, on a new window.

Recovery: a template whose workload turns hot is looked up in full again at its first read
after a probe hits. With the default admission (stored on the 2nd sighting) a probe hits
once a key was probed three times: about 1,000 reads of a hot set of 200 keys, and at most
`BYPASS_FOR` (30 s) + one probe after it was bypassed, whatever the workload, since expiry
starts a new window. A template is never bypassed before `WINDOW` of its lookups missed, so
a new query still hits on its third run.

Only reads the cache would have looked up are bypassed: the session decides them as before
(writes, invalidation, transactions, identity are untouched) and a bypassed read is a
pass-through to the origin: always fresh. Bounded: at most `MAX_TEMPLATES` scores a cache
(the oldest dropped first; a dropped score only loses evidence: a hit memo still counting on
it counts for nothing until its template's new score is judged).
"""

from __future__ import annotations

from collections.abc import Callable

# Misses in a window: large enough that a test or an app's warm-up never bypasses (a new text
# hits on its 3rd run), small enough to judge a few hundred milliseconds of a busy template
# (512 misses at ~5k reads a second: 0.1 s of full-path cost per judgement).
WINDOW = 512
# Under this share of hits the lookups cost more than they save: a miss's full path costs
# about 2-3 times a pass-through's CPU (issue 10: 60-80 vs 16-28 µs), a hit saves a round trip.
MAX_HIT_RATE = 0.01
# While bypassed, 1 read in this many still takes the full path: recovery is sampled at
# 1/16 of the reads, for ~6% of the full path's extra cost (a power of two: the brief's).
PROBE_EVERY = 16
# Seconds a bypass lasts at most before the template is judged from scratch: a window's full
# path (0.1 s of a busy template) every 30 s is under 1% of its reads.
BYPASS_FOR = 30.0
MAX_TEMPLATES = 4096


class LookupScore:
    """One template's lookups in one cache. Read and counted by QueryCache and the session's
    memos (attribute increments; `Bypass` judges)."""

    __slots__ = ("batch_reason", "bypassed", "hits", "left", "reason", "skipped", "until")

    def __init__(self, window: int) -> None:
        self.left = window  # misses left before the window is judged
        self.hits = 0  # hits in this window (while bypassed: any ends it)
        self.bypassed = False
        self.skipped = 0  # bypassed reads since the last probe
        self.until = 0.0  # bypassed until (clock time)
        self.reason = ""  # why it is bypassed, made once per bypass (its stats tickets' reason)
        # The reason of the other statements of its batches (not looked up with it): theirs
        # must not claim this template's hit rate as their own.
        self.batch_reason = ""


class Bypass:
    """The lookup scores of one cache's templates, and their judgements."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        window: int = WINDOW,
        max_hit_rate: float = MAX_HIT_RATE,
        probe_every: int = PROBE_EVERY,
        bypass_for: float = BYPASS_FOR,
        max_templates: int = MAX_TEMPLATES,
    ) -> None:
        self.clock = clock
        self.window = max(1, window)
        self.max_hit_rate = max_hit_rate
        self.probe_every = max(1, probe_every)
        self.bypass_for = bypass_for
        self.max_templates = max_templates
        self._scores: dict[str, LookupScore] = {}
        self.passed = 0  # reads passed through unlooked-up, ever (counted as misses in the stats)

    def score(self, template_id: str) -> LookupScore:
        """The template's score (asked once per full-path read, kept by memos)."""
        found = self._scores.get(template_id)
        if found is None:
            if len(self._scores) >= self.max_templates:
                self._end(self._scores.pop(next(iter(self._scores))))  # the oldest made, forgotten
            found = self._scores[template_id] = LookupScore(self.window)
        return found

    def passes(self, score: LookupScore) -> bool:
        """A read of a bypassed template (`score.bypassed`, which the caller checked): True
        when it passes through unlooked-up, False when it takes the full path (a probe, or
        the bypass ended: a hit since it began, or its time is up)."""
        if score.hits:
            self._end(score)
            return False
        score.skipped += 1
        if score.skipped < self.probe_every:
            self.passed += 1
            return True
        score.skipped = 0
        if self.clock() >= score.until:
            self._end(score)
        return False

    def skips(self, score: LookupScore) -> bool:
        """`passes` for a read of a bypassed template when it passes through (True, counted
        as `passes` counts it); False, with nothing changed, when `passes` would decide more
        (a probe, or the bypass ended): the caller then asks `passes` on the full path."""
        if score.hits or score.skipped + 1 >= self.probe_every:
            return False
        score.skipped += 1
        self.passed += 1
        return True

    def judge(self, score: LookupScore) -> None:
        """A window's misses were counted (`score.left` is 0): bypass the template when its
        hits were too few; a window of probes while bypassed only starts a new one."""
        score.left = self.window
        if score.bypassed:
            return  # its hits (none, or the bypass would have ended) end it at its next read
        hits = score.hits
        looked = hits + self.window
        if hits < self.max_hit_rate * looked:
            score.bypassed = True
            score.skipped = 0
            score.until = self.clock() + self.bypass_for
            score.reason = (
                f"not looked up: {hits / looked:.1%} of its last {looked} lookups hit; "
                f"1 in {self.probe_every} still looked up"
            )
            score.batch_reason = "not looked up: in a batch led by a read whose template's lookups do not hit"
        score.hits = 0

    def _end(self, score: LookupScore) -> None:
        score.bypassed = False
        score.left = self.window
        score.hits = 0
        score.skipped = 0

    def explain(self, template_id: str) -> str | None:
        """Why reads of this template are not looked up, or None when they are (a hit since
        the bypass began ends it at the next read: looked up then)."""
        score = self._scores.get(template_id)
        return score.reason if score is not None and score.bypassed and not score.hits else None

    def forget(self) -> None:
        """Every score starts afresh (a purge: what was learned of the lookups is gone)."""
        for score in self._scores.values():
            self._end(score)  # memos keep theirs: reset, not dropped

    def sizes(self) -> dict[str, int]:
        bypassed = sum(1 for s in self._scores.values() if s.bypassed)
        return {"scores": len(self._scores), "bypassed": bypassed, "passed": self.passed}

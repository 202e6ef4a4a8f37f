"""What the tally tests share: a clock they move by hand, and the one template a snapshot holds."""

from __future__ import annotations

from neonpoly.stats import StatsRecorder, TemplateStats


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def template(stats: StatsRecorder, cache: str = "c1") -> TemplateStats:
    (found,) = stats.snapshot(cache).templates
    return found

"""Adaptive TTL: learned from the interval between writes seen through neonpoly."""

from __future__ import annotations

from neonpoly.cache.adaptive import AdaptiveTTL


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_never_written_gets_the_maximum() -> None:
    learner = AdaptiveTTL(clock=Clock())
    assert learner.ttl(["a"], 300.0) == 300.0
    assert learner.ttl([], 300.0) == 300.0
    assert learner.interval("a") is None


def test_frequent_writes_shorten_ttl_within_bounds() -> None:
    clock = Clock()
    learner = AdaptiveTTL(factor=0.5, min_ttl=2.0, clock=clock)
    for _ in range(10):
        learner.on_write("db", frozenset({"hot"}), False)
        clock.now += 1.0
    assert learner.ttl(["hot"], 300.0) == 2.0  # 0.5 * 1 s, clamped to the minimum
    assert learner.ttl(["cold", "hot"], 300.0) == 2.0  # the lowest table wins
    for _ in range(10):
        learner.on_write("db", frozenset({"warm"}), False)
        clock.now += 60.0
    assert 25.0 < learner.ttl(["warm"], 300.0) <= 30.0 + 1e-9
    assert learner.ttl(["warm"], 10.0) == 10.0  # never above the cache's TTL
    assert learner.writes("hot") == 10


def test_ttl_recovers_when_writes_stop() -> None:
    clock = Clock()
    learner = AdaptiveTTL(factor=0.5, min_ttl=1.0, clock=clock)
    for _ in range(5):
        learner.on_write("db", frozenset({"t"}), False)
        clock.now += 1.0
    assert learner.ttl(["t"], 300.0) == 1.0
    clock.now += 1000.0
    assert learner.ttl(["t"], 300.0) == 300.0


def test_unknown_writes_touch_every_table() -> None:
    clock = Clock()
    learner = AdaptiveTTL(factor=0.5, min_ttl=1.0, clock=clock)
    learner.on_write("db", frozenset(), True)
    clock.now += 4.0
    # One write (a CREATE TABLE, say) is an event, not a rate: nothing shortens yet.
    assert learner.ttl(["anything"], 300.0) == 300.0
    learner.on_write("db", frozenset(), True)
    assert learner.ttl(["anything"], 300.0) == 2.0
    assert learner.ttl([], 300.0) == 2.0


def test_refetches_that_change_shorten_the_template_ttl() -> None:
    learner = AdaptiveTTL(min_ttl=1.0, clock=lambda: 0.0)
    assert learner.ttl(["t"], 300.0, "stable") == 300.0
    for _ in range(20):
        learner.on_refetch("stable", changed=False)
        learner.on_refetch("moving", changed=True)
    assert learner.ttl(["t"], 300.0, "stable") == 300.0
    assert learner.ttl(["t"], 300.0, "moving") < 100.0
    assert learner.change_rate("moving") > 0.9

"""The cheap check a hit memo serves its repeats on (proxy/hits.py): `CacheStore.holds` and
`QueryCache.serves` say yes only while `get`/`lookup` would answer with that very entry, so
every event that makes a lookup miss makes the memo go back to the full path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.store import CacheEntry, CacheStore, DisabledStore, DiskStore, MemoryStore, TieredStore, open_store
from neonpoly.stats import StatsRecorder
from tests.unit.test_store import FakeClock, make_entry

KEY = b"k" * 32


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tiered(tmp_path: Path, clock: FakeClock) -> Iterator[TieredStore]:
    store = open_store(tmp_path / "cache", 64 << 20, 8 << 20, clock)
    assert isinstance(store, TieredStore)
    yield store
    store.close()


def _replace(store: CacheStore, clock: FakeClock) -> None:
    store.put(KEY, make_entry(store, clock, payload=b"newer rows"))


EVENTS: dict[str, Callable[[CacheStore, FakeClock], object]] = {
    "a write to its table": lambda s, c: s.invalidate_tables("app", ["public.users"]),
    "its database evicted (DDL)": lambda s, c: s.invalidate_database("app"),
    "everything evicted": lambda s, c: s.invalidate_everything(),
    "purge": lambda s, c: s.purge(),
    "purge of its table": lambda s, c: s.purge_tables(["public.users"]),
    # Removes the entry without moving any generation: only the entry's own presence tells.
    "purge of its template": lambda s, c: s.purge_template("tpl1"),
    "TTL expiry": lambda s, c: setattr(c, "now", c.now + 60.0),
    "another entry stored for the key": _replace,
}


@pytest.mark.parametrize("event", list(EVENTS))
def test_an_entry_is_held_only_until_an_event_makes_get_answer_otherwise(
    tiered: TieredStore, clock: FakeClock, event: str
) -> None:
    entry = make_entry(tiered, clock)
    tiered.put(KEY, entry)
    assert tiered.holds(KEY, entry)
    assert tiered.get(KEY) is entry
    EVENTS[event](tiered, clock)
    assert not tiered.holds(KEY, entry)
    assert tiered.get(KEY) is not entry


def test_an_entry_just_before_its_ttl_is_still_held(tiered: TieredStore, clock: FakeClock) -> None:
    entry = make_entry(tiered, clock, ttl=60.0)
    tiered.put(KEY, entry)
    clock.now += 59.9
    assert tiered.holds(KEY, entry)
    assert not tiered.holds(KEY, make_entry(tiered, clock))  # an equal entry is not the one held


def test_stores_that_cannot_tell_cheaply_never_hold(tmp_path: Path, clock: FakeClock) -> None:
    disk = DiskStore(tmp_path / "disk", 64 << 20, clock=clock)
    try:
        entry = make_entry(disk, clock)
        disk.put(KEY, entry)
        assert not disk.holds(KEY, entry)  # a disk read makes a new object: the memo asks get()
    finally:
        disk.close()
    assert not DisabledStore("off").holds(KEY, entry)


def _cache(clock: FakeClock) -> tuple[QueryCache, CacheEntry]:
    store = MemoryStore(8 << 20, clock=clock)
    cache = QueryCache("c1", store, StatsRecorder(), clock=clock)
    entry = make_entry(store, clock)
    store.put(KEY, entry)
    return cache, entry


def test_serves_asks_the_plane_gate_every_time(clock: FakeClock) -> None:
    cache, entry = _cache(clock)
    assert cache.serves(KEY, entry) and cache.lookup_entry(KEY) is entry
    cache.serve_gate = lambda: False  # this node is not provably caught up with the others
    assert not cache.serves(KEY, entry)
    assert cache.lookup_entry(KEY) is None and cache.lookup(KEY) is None
    cache.serve_gate = lambda: True
    assert cache.serves(KEY, entry)


def test_serves_follows_a_write_through_the_cache(clock: FakeClock) -> None:
    cache, entry = _cache(clock)
    cache.invalidate("app", frozenset({"public.users"}), everything=False)
    assert not cache.serves(KEY, entry)
    assert cache.lookup_entry(KEY) is None

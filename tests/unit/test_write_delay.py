"""The disk tier's delayed write-behind: what the 90/10 mix's speed rests on.

Under a read/write mix, most entries of a hot key are made stale by a write before long:
written to disk at once, each would cost the writer thread a sqlite write (and the event
loop the GIL). Delayed, one per key, they are dropped unwritten when stale; the rest reach
disk in a batch, and always before a barrier (flush, purge, close). The delay here is an
hour, so nothing is written unless a barrier says so: decisions, not timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from neonpoly.cache.store import CacheEntry, CacheStore, DiskStore, MemoryStore, TieredStore

HOUR = 3600.0


def entry(store: CacheStore, payload: bytes = b"rows", tables: tuple[str, ...] = ("public.users",)) -> CacheEntry:
    return CacheEntry(
        payload=payload, database="app", tables=frozenset(tables), template_id="tpl",
        stamp=store.stamp("app", tables), created_at=1_000.0, ttl=600.0,
    )  # fmt: skip


def clock() -> float:
    return 1_000.0


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskStore]:
    store = DiskStore(tmp_path / "d", 64 << 20, clock=clock, write_delay=HOUR)
    yield store
    store.close()


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[TieredStore]:
    store = TieredStore(
        MemoryStore(8 << 20, clock=clock), DiskStore(tmp_path / "t", 64 << 20, clock=clock, write_delay=HOUR)
    )
    yield store
    store.close()


def test_a_delayed_entry_is_served_before_it_reaches_disk(disk: DiskStore) -> None:
    e = entry(disk)
    disk.put(b"k", e)
    assert b"k" not in disk._cache  # not written yet
    assert disk.get(b"k") == e
    assert disk.usage().entries == 1  # counted as stored
    disk.flush()
    assert b"k" in disk._cache


def test_an_entry_made_stale_before_its_write_is_never_written(disk: DiskStore) -> None:
    disk.put(b"k", entry(disk))
    disk.invalidate_tables("app", ["public.users"])
    assert disk.get(b"k") is None
    assert disk.usage().entries == 0
    disk.flush()
    assert b"k" not in disk._cache


def test_one_write_per_key_the_last_put_wins(disk: DiskStore) -> None:
    disk.put(b"k", entry(disk, b"first"))
    disk.put(b"k", entry(disk, b"second"))
    assert disk.usage().pending_writes == 1
    disk.flush()
    got = disk.get(b"k")
    assert got is not None and got.payload == b"second"


def test_close_writes_what_was_delayed(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "d", 64 << 20, clock=clock, write_delay=HOUR)
    store.put(b"k", entry(store))
    store.close()
    again = DiskStore(tmp_path / "d", 64 << 20, clock=clock, write_delay=HOUR)
    try:
        got = again.get(b"k")
        assert got is not None and got.payload == b"rows"
    finally:
        again.close()


def test_a_purge_writes_delayed_entries_first_and_removes_them(disk: DiskStore) -> None:
    disk.put(b"k", entry(disk))
    assert disk.purge_template("tpl") == 1  # the purge saw it: written, then removed
    assert disk.get(b"k") is None
    assert b"k" not in disk._cache


def test_a_purge_counts_the_delayed_entries_it_makes_stale(disk: DiskStore) -> None:
    disk.put(b"k", entry(disk))
    disk.put(b"o", entry(disk, tables=("public.orders",)))
    assert disk.usage().entries == 2
    assert disk.purge_tables(["public.users"]) == 1  # "Entries 2", then "Purged 1"
    assert disk.get(b"k") is None and disk.get(b"o") is not None
    assert disk.purge() == 1
    disk.flush()
    assert len(disk._cache) == 0


def test_a_key_found_stale_in_memory_is_not_read_from_disk_again(tiered: TieredStore) -> None:
    tiered.put(b"k", entry(tiered))
    tiered.flush()
    assert b"k" in tiered.l2._present
    tiered.invalidate_tables("app", ["public.users"])
    assert tiered.get(b"k") is None  # the memory copy is stale: so is the disk's
    assert b"k" not in tiered.l2._present  # later lookups of the key skip the disk read
    assert tiered.get(b"k") is None


def test_a_key_found_stale_in_memory_drops_its_delayed_write(tiered: TieredStore) -> None:
    tiered.put(b"k", entry(tiered))
    tiered.invalidate_tables("app", ["public.users"])
    assert tiered.get(b"k") is None
    assert tiered.l2.usage().pending_writes == 0


def test_a_round_writes_only_the_entries_that_lasted_a_whole_delay(tmp_path: Path) -> None:
    """A key stored again within the delay (a hot key re-captured after each write) waits for
    the next round; barriers still write it."""
    now = [1_000.0]
    store = DiskStore(tmp_path / "d", 64 << 20, clock=lambda: now[0], write_delay=100.0)
    try:
        old, new = entry(store, b"old"), entry(store, b"new")
        new.created_at = 1_050.0
        store.put(b"o", old)
        store.put(b"n", new)
        now[0] = 1_120.0
        store._write_delayed(everything=False)  # what a round of the writer does when due
        assert b"o" in store._cache and b"n" not in store._cache
        got = store.get(b"n")
        assert got is not None and got.payload == b"new"  # served meanwhile, as delayed
        assert store.usage().pending_writes == 1
        now[0] = 1_150.0
        store._write_delayed(everything=False)
        assert b"n" in store._cache and store.usage().pending_writes == 0
        young = entry(store, b"x")
        young.created_at = now[0]
        store.put(b"x", young)
        store.flush()  # a barrier: written however young
        assert b"x" in store._cache
    finally:
        store.close()

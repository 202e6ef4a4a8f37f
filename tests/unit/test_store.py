"""Cache stores against a real diskcache in tmp_path, with an injected clock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from neonpoly.cache.store import (
    CacheEntry,
    CacheStore,
    DisabledStore,
    DiskStore,
    MemoryStore,
    TieredStore,
    destroy_store_dir,
    open_store,
)


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_entry(store: CacheStore, clock: FakeClock, *, payload: bytes = b"rows",
               db: str = "app", tables: tuple[str, ...] = ("public.users",),
               template: str = "tpl1", ttl: float = 60.0) -> CacheEntry:
    return CacheEntry(payload=payload, database=db, tables=frozenset(tables),
                      template_id=template, stamp=store.stamp(db, tables),
                      created_at=clock(), ttl=ttl)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tiered(tmp_path: Path, clock: FakeClock) -> Iterator[CacheStore]:
    store = open_store(tmp_path / "cache", 64 << 20, 8 << 20, clock)
    assert isinstance(store, TieredStore)
    yield store
    store.close()


def reopen(tmp_path: Path, clock: FakeClock) -> TieredStore:
    store = open_store(tmp_path / "cache", 64 << 20, 8 << 20, clock)
    assert isinstance(store, TieredStore)
    return store


def test_ttl_expiry_with_injected_clock(tiered: CacheStore, clock: FakeClock) -> None:
    tiered.put(b"k", make_entry(tiered, clock, ttl=10))
    assert tiered.get(b"k") is not None
    clock.now += 9.99
    assert tiered.get(b"k") is not None
    clock.now += 0.02
    assert tiered.get(b"k") is None


def test_invalidation_race_stamp_then_invalidate_then_put(tiered: CacheStore,
                                                         clock: FakeClock) -> None:
    entry = make_entry(tiered, clock)  # miss sent
    tiered.invalidate_tables("app", ["public.users"])  # a write lands meanwhile
    tiered.put(b"k", entry)  # the stale result arrives
    tiered.flush()
    assert tiered.get(b"k") is None
    assert tiered.usage().entries == 0


def test_invalidation_after_put_is_synchronous(tiered: CacheStore, clock: FakeClock) -> None:
    tiered.put(b"u", make_entry(tiered, clock))
    tiered.put(b"o", make_entry(tiered, clock, tables=("public.orders",)))
    tiered.put(b"x", make_entry(tiered, clock, db="other"))
    tiered.invalidate_tables("app", ["public.users"])
    assert tiered.get(b"u") is None
    assert tiered.get(b"o") is not None and tiered.get(b"x") is not None
    tiered.invalidate_database("app")
    assert tiered.get(b"o") is None and tiered.get(b"x") is not None


def test_write_behind_rechecks_generation(tmp_path: Path, clock: FakeClock) -> None:
    disk = DiskStore(tmp_path / "d", 64 << 20, clock=clock)
    try:
        gate_open = threading.Event()

        def hold() -> None:  # keeps the writer busy so the put stays queued
            gate_open.wait()
        disk._jobs.put(hold)
        disk.put(b"k", make_entry(disk, clock))
        disk.invalidate_tables("app", ["public.users"])
        gate_open.set()
        disk.flush()
        assert b"k" not in disk._cache  # the eviction won: nothing written at all
    finally:
        disk.close()


def test_l1_hit_does_not_need_disk_and_disk_hit_promotes(tiered: CacheStore,
                                                        clock: FakeClock) -> None:
    assert isinstance(tiered, TieredStore)
    tiered.put(b"k", make_entry(tiered, clock, payload=b"x" * 1000))
    tiered.flush()
    tiered.l1.clear()
    got = tiered.get(b"k")
    assert got is not None and got.payload == b"x" * 1000
    assert tiered.l1.get(b"k") == got


def test_persistence_across_restart(tmp_path: Path, clock: FakeClock) -> None:
    store = reopen(tmp_path, clock)
    store.put(b"fresh", make_entry(store, clock, ttl=100))
    store.put(b"short", make_entry(store, clock, ttl=5, tables=("public.other",)))
    store.put(b"written", make_entry(store, clock, tables=("public.orders",)))
    store.flush()
    store.invalidate_tables("app", ["public.orders"])
    store.close()

    clock.now += 10
    store = reopen(tmp_path, clock)
    try:
        fresh = store.get(b"fresh")
        assert fresh is not None and fresh.payload == b"rows"
        assert fresh.tables == frozenset({"public.users"})
        assert store.get(b"short") is None
        assert store.get(b"written") is None
    finally:
        store.close()


def test_unclean_shutdown_treats_old_entries_as_stale(tmp_path: Path, clock: FakeClock) -> None:
    store = reopen(tmp_path, clock)
    store.put(b"k", make_entry(store, clock))
    store.flush()
    # Simulate a crash: the writer stops but the clean flag is never written.
    store.l2._jobs.put(None)
    store.l2._writer.join()
    store.l2._cache.close()
    again = reopen(tmp_path, clock)
    try:
        assert again.get(b"k") is None
    finally:
        again.close()


def test_corrupt_record_is_a_miss_and_deleted(tmp_path: Path, clock: FakeClock) -> None:
    store = reopen(tmp_path, clock)
    store.put(b"good", make_entry(store, clock))
    store.put(b"other", make_entry(store, clock))
    store.close()
    with diskcache.Cache(str(tmp_path / "cache")) as raw:
        raw.set(b"garbage", b"\x00not a record at all")
        raw.set(b"pickled", {"a": 1})
        good = raw.get(b"good")
        raw.set(b"flipped", good[:-1] + bytes([good[-1] ^ 1]))
        raw.set(b"moved", raw.get(b"other"))  # valid record, but for another key
    store = reopen(tmp_path, clock)
    try:
        for key in (b"garbage", b"pickled", b"flipped", b"moved"):
            assert store.get(key) is None
        store.flush()
        for key in (b"garbage", b"pickled", b"flipped", b"moved"):
            assert key not in store.l2._cache
        assert store.get(b"good") is not None
    finally:
        store.close()


def test_corrupt_database_file_disables_with_one_warning(
        tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "cache.db").write_bytes(b"this is not sqlite" * 100)
    with caplog.at_level(logging.WARNING):
        store = open_store(directory, 1 << 20, 1 << 20, clock)
    assert isinstance(store, DisabledStore)
    assert "unusable" in store.disabled_reason
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    store.put(b"k", make_entry(store, clock))
    assert store.get(b"k") is None and not store.accepts(1)


def test_unwritable_directory_disables(tmp_path: Path, clock: FakeClock,
                                       caplog: pytest.LogCaptureFixture) -> None:
    # Root ignores chmod, so put a plain file where the directory should be.
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        store = open_store(blocker, 1 << 20, 1 << 20, clock)
    assert isinstance(store, DisabledStore)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_purge_counts_live_entries(tiered: CacheStore, clock: FakeClock) -> None:
    tiered.put(b"a", make_entry(tiered, clock))
    tiered.put(b"b", make_entry(tiered, clock, tables=("public.orders",)))
    tiered.put(b"c", make_entry(tiered, clock, ttl=1))
    tiered.flush()
    clock.now += 2  # c is expired: removed but not counted
    assert tiered.purge() == 2
    assert tiered.get(b"a") is None and tiered.get(b"b") is None
    assert tiered.purge() == 0


def test_entries_shown_are_the_entries_a_purge_removes(clock: FakeClock) -> None:
    store = MemoryStore(1 << 20, clock=clock)
    store.put(b"a", make_entry(store, clock))
    store.put(b"b", make_entry(store, clock, tables=("public.orders",)))
    store.put(b"c", make_entry(store, clock, ttl=1))
    assert store.usage().entries == 3
    clock.now += 2  # c expired: out of Entries and of the purge count alike
    store.invalidate_tables("app", ["public.orders"])  # b is stale, still stored and shown
    shown = store.usage().entries
    assert shown == 2 and store.purge() == shown
    assert store.usage().entries == 0


def test_purge_tables_and_template_only_remove_theirs(tiered: CacheStore,
                                                      clock: FakeClock) -> None:
    tiered.put(b"u1", make_entry(tiered, clock, template="t1"))
    tiered.put(b"u2", make_entry(tiered, clock, db="other", template="t2"))
    tiered.put(b"o1", make_entry(tiered, clock, tables=("public.orders",), template="t1"))
    tiered.put(b"o2", make_entry(tiered, clock, tables=("public.orders",), template="t3"))
    tiered.flush()
    assert tiered.purge_tables(["public.users"]) == 2
    assert tiered.get(b"u1") is None and tiered.get(b"u2") is None
    assert tiered.purge_template("t1") == 1
    assert tiered.get(b"o1") is None
    assert tiered.get(b"o2") is not None


def test_purge_tables_drops_misses_in_flight(tiered: CacheStore, clock: FakeClock) -> None:
    entry = make_entry(tiered, clock, db="other")
    tiered.purge_tables(["public.users"])
    tiered.put(b"late", entry)
    assert tiered.get(b"late") is None


def test_memory_lru_byte_bound(clock: FakeClock) -> None:
    store = MemoryStore(3 * (1000 + 1 + 256), clock=clock)
    for k in (b"a", b"b", b"c"):
        store.put(k, make_entry(store, clock, payload=b"x" * 1000))
    assert store.get(b"a") is not None  # a is now most recently used
    store.put(b"d", make_entry(store, clock, payload=b"x" * 1000))
    assert store.get(b"b") is None
    assert all(store.get(k) is not None for k in (b"a", b"c", b"d"))
    assert store.usage().bytes <= store.max_bytes


def test_oversized_entries_are_refused(tiered: CacheStore, clock: FakeClock) -> None:
    assert isinstance(tiered, TieredStore)
    limit = tiered.l1.max_entry_bytes
    assert tiered.accepts(limit) and not tiered.accepts(limit + 1)
    tiered.put(b"big", make_entry(tiered, clock, payload=b"x" * (limit + 1)))
    tiered.flush()
    assert tiered.get(b"big") is None


def test_large_payload_round_trips_through_file_storage(tiered: CacheStore,
                                                        clock: FakeClock) -> None:
    assert isinstance(tiered, TieredStore)
    payload = bytes(range(256)) * 1024  # 256 KiB: diskcache keeps it in a file
    tiered.put(b"big", make_entry(tiered, clock, payload=payload))
    tiered.flush()
    tiered.l1.clear()
    got = tiered.get(b"big")
    assert got is not None and got.payload == payload
    assert tiered.purge_template("tpl1") == 1


def test_usage_reports_entries(tiered: CacheStore, clock: FakeClock) -> None:
    tiered.put(b"a", make_entry(tiered, clock))
    tiered.flush()
    usage = tiered.usage()
    assert usage.entries == 1 and usage.l1_entries == 1 and usage.bytes > 0


def test_destroy_store_dir(tmp_path: Path, clock: FakeClock) -> None:
    store = reopen(tmp_path, clock)
    store.close()
    destroy_store_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    destroy_store_dir(tmp_path / "cache")  # already gone: fine
    unrelated = tmp_path / "home"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError):
        destroy_store_dir(unrelated)
    assert (unrelated / "notes.txt").exists()


def test_disk_store_stays_under_its_size_bound(tmp_path: Path) -> None:
    """diskcache's per-set culling is off (it cost a third of the CPU); the writer culls in bulk."""
    store = DiskStore(tmp_path / "bounded", max_bytes=2 << 20)
    try:
        gens = store.generations
        for i in range(2000):  # 2000 x 4 KiB = 8 MiB into a 2 MiB cache
            entry = CacheEntry(b"x" * 4096, "app", frozenset({"t"}), "tpl", gens.stamp("app", ["t"]), time.time(), 600)
            store.put(i.to_bytes(4, "big") * 8, entry)
        store.flush()
        assert store._cache.volume() < 4 << 20  # within diskcache's sqlite overhead of the bound
        assert store.usage().entries < 2000
    finally:
        store.close()


def test_tiered_put_checks_once_for_both_tiers(tiered: CacheStore, clock: FakeClock) -> None:
    # TieredStore.put checks size, TTL and generations once, then inserts into each tier:
    # a stale or expired entry is held by neither (not just refused when read).
    assert isinstance(tiered, TieredStore)
    stale = make_entry(tiered, clock)
    tiered.invalidate_tables("app", ["public.users"])
    tiered.put(b"stale", stale)
    expired = make_entry(tiered, clock, ttl=1)
    clock.now += 1
    tiered.put(b"expired", expired)
    assert tiered.l1._entries == {} and tiered.l2.usage().pending_writes == 0
    tiered.put(b"live", make_entry(tiered, clock))
    assert list(tiered.l1._entries) == [b"live"] and tiered.l2.usage().pending_writes == 1
    assert tiered.get(b"live") is not None


def test_tiered_put_with_tiers_on_other_clocks_asks_each(tmp_path: Path, clock: FakeClock) -> None:
    # Only tiers sharing one clock share one check: here the disk's clock says expired.
    later = FakeClock(clock.now + 100)
    disk = DiskStore(tmp_path / "d", 64 << 20, clock=later)
    store = TieredStore(MemoryStore(8 << 20, clock=clock), disk)
    try:
        store.put(b"k", make_entry(store, clock, ttl=10))
        assert store.l1.get(b"k") is not None
        assert disk.usage().pending_writes == 0  # not even held to be written
    finally:
        store.close()

"""Where cached results live: a bounded memory L1 in front of a diskcache L2.

An L1 hit never touches disk, and `put` never writes disk on the caller's thread (the disk
tier writes behind). This module assembles the tiers; each lives in its own module:

* entry.py: `CacheEntry`, `StoreUsage`, the `CacheStore` interface, shared generations;
* memory.py: `MemoryStore`, the L1;
* disk.py: `DiskStore`, the L2, and its write-behind thread;
* record.py: how an entry is laid out on disk.

The names other modules use are importable from here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from neonpoly.cache.disk import DiskStore, destroy_store_dir
from neonpoly.cache.entry import (
    DEFAULT_MAX_ENTRY_BYTES,
    CacheEntry,
    CacheStore,
    Clock,
    EntryFilter,
    GenerationsFacade,
    StoreUsage,
    is_live,
)
from neonpoly.cache.invalidation import TableGenerations
from neonpoly.cache.memory import MemoryStore

__all__ = [
    "CacheEntry",
    "CacheStore",
    "DisabledStore",
    "DiskStore",
    "MemoryStore",
    "StoreUsage",
    "TieredStore",
    "destroy_store_dir",
    "open_store",
]

log = logging.getLogger(__name__)


class TieredStore(GenerationsFacade):
    """Memory L1 in front of a disk L2 sharing one set of (persisted) generations."""

    def __init__(self, l1: MemoryStore, l2: DiskStore) -> None:
        self.l1 = l1
        self.l2 = l2
        self.generations = l2.generations
        l1.bind_generations(l2.generations)
        # Asked for every repeat of a hit: the L1's own method, one call less.
        self.holds = l1.holds  # type: ignore[method-assign]

    def accepts(self, size: int) -> bool:
        return self.l1.accepts(size) and self.l2.accepts(size)

    def get(self, key: bytes) -> CacheEntry | None:
        entry = self.l1.get(key)
        if entry is None:
            if self.l1.stale_key is key:  # a write made it stale: so is its copy on disk
                self.l1.stale_key = None
                self.l2.forget(key)  # and so for the next lookups of the key, until stored again
                return None
            entry = self.l2.get(key)
            if entry is not None:
                self.l1.put(key, entry)
        return entry

    def holds(self, key: bytes, entry: CacheEntry) -> bool:
        return self.l1.holds(key, entry)  # an entry served from memory is in the L1 (see __init__)

    def put(self, key: bytes, entry: CacheEntry) -> None:
        # Both tiers check the same things against the same clock and generations (open_store
        # gives them one clock; the L1 uses the L2's generations): checked once here. A miss
        # stored per re-capture under a read/write mix pays this.
        size = len(entry.payload)
        l1, l2 = self.l1, self.l2
        if l1._clock is not l2._clock or l1.generations is not l2.generations:
            l1.put(key, entry)
            l2.put(key, entry)
            return
        if not is_live(entry, l1._clock(), l1.generations):
            return
        if size <= l1.max_entry_bytes:
            l1.insert(key, entry, size)
        if size <= l2.max_entry_bytes:
            l2.delay(key, entry, size)

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        return self.l1._remove_where(match, view) | self.l2._remove_where(match, view)

    def usage(self) -> StoreUsage:
        disk, mem = self.l2.usage(), self.l1.usage()
        return StoreUsage(disk.entries, disk.bytes, disk.max_bytes, mem.entries, mem.bytes, disk.pending_writes)

    def flush(self) -> None:
        self.l2.flush()

    def close(self) -> None:
        self.l2.close()
        self.l1.clear()


class DisabledStore(GenerationsFacade):
    """Stands in when the cache directory is unusable: everything passes through."""

    def __init__(self, reason: str) -> None:
        self.disabled_reason = reason
        self.generations = TableGenerations()

    def accepts(self, size: int) -> bool:
        return False

    def get(self, key: bytes) -> CacheEntry | None:
        return None

    def put(self, key: bytes, entry: CacheEntry) -> None:
        pass

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        return set()

    def usage(self) -> StoreUsage:
        return StoreUsage(0, 0, 0)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_store(
    directory: Path, max_bytes: int, l1_bytes: int, clock: Clock = time.time, *, max_entry_bytes: int | None = None
) -> CacheStore:
    """The default tiered store, or a `DisabledStore` (one warning, no exception) when the
    directory cannot hold a cache: a proxy without its cache still serves queries."""
    limit = max_entry_bytes or min(DEFAULT_MAX_ENTRY_BYTES, max(1, l1_bytes // 2))
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        l2 = DiskStore(Path(directory), max_bytes, clock=clock, max_entry_bytes=limit)
    except Exception as exc:
        reason = f"cache directory {directory} is unusable: {type(exc).__name__}: {exc}"
        log.warning("%s; caching disabled", reason)
        return DisabledStore(reason)
    return TieredStore(MemoryStore(l1_bytes, clock=clock, max_entry_bytes=limit), l2)

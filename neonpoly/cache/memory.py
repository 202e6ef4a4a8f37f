"""The memory tier: a bounded LRU by bytes, the L1 of the tiered store (and alone in tests)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from neonpoly.cache.entry import (
    DEFAULT_MAX_ENTRY_BYTES,
    CacheEntry,
    Clock,
    EntryFilter,
    GenerationsFacade,
    StoreUsage,
    is_live,
)
from neonpoly.cache.invalidation import TableGenerations

# Rough per-entry bookkeeping cost in the L1, so many tiny entries still count against memory.
_L1_ENTRY_OVERHEAD = 256


class MemoryStore(GenerationsFacade):
    """Bounded LRU by bytes. Used alone in tests and as the L1 of `TieredStore`."""

    def __init__(
        self,
        max_bytes: int,
        *,
        clock: Clock = time.time,
        max_entry_bytes: int | None = None,
        generations: TableGenerations | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes or DEFAULT_MAX_ENTRY_BYTES, max_bytes)
        self.generations = generations or TableGenerations()
        self._clock = clock
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._bytes = 0
        # The key a get() just found stale (TieredStore.get then spares the L2 read: the
        # disk's copy is that same entry or an older one). Only ever spares a read, so a race
        # on it costs at most a miss.
        self.stale_key: bytes | None = None
        # Purges may run off-loop (admin in a worker thread); an uncontended lock costs ~50 ns.
        self._lock = threading.Lock()

    def bind_generations(self, generations: TableGenerations) -> None:
        """Adopt another store's generations; existing entries are dropped since their stamps
        belong to the old counters."""
        with self._lock:
            self.generations = generations
            self._entries.clear()
            self._bytes = 0

    def accepts(self, size: int) -> bool:
        return size <= self.max_entry_bytes

    @staticmethod
    def _cost(key: bytes, entry: CacheEntry) -> int:
        return len(key) + entry.size + _L1_ENTRY_OVERHEAD

    def get(self, key: bytes) -> CacheEntry | None:
        if key not in self._entries:  # a miss, most often: one dict lookup is atomic, no lock
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if is_live(entry, self._clock(), self.generations):
                self._entries.move_to_end(key)
                return entry
            del self._entries[key]
            self._bytes -= self._cost(key, entry)
            self.stale_key = key
            return None

    def holds(self, key: bytes, entry: CacheEntry) -> bool:
        # get() without its fallbacks: the entry is still the key's and still live (TTL by the
        # store's clock, generations); a stale one is left for get() to drop. No lock: each
        # step is one atomic dict operation. A purge in another thread (which removes under
        # the lock) either came first (the entry is gone: not held, or KeyError) or comes
        # after this hit, as it would after get().
        if self._entries.get(key) is not entry:
            return False
        if not (self._clock() < entry.created_at + entry.ttl and self.generations.is_current(entry.stamp)):
            return False
        try:
            self._entries.move_to_end(key)
        except KeyError:
            return False
        return True

    def put(self, key: bytes, entry: CacheEntry) -> None:
        size = len(entry.payload)
        if size > self.max_entry_bytes or not is_live(entry, self._clock(), self.generations):
            return
        self.insert(key, entry, size)

    def insert(self, key: bytes, entry: CacheEntry, size: int) -> None:
        """`put` of an entry the caller checked as `put` checks it (its `size`, accepted, and
        live by this store's clock and generations): TieredStore checks once for both tiers."""
        cost = len(key) + size + _L1_ENTRY_OVERHEAD
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._cost(key, old)
            self._entries[key] = entry
            self._bytes += cost
            while self._bytes > self.max_bytes and self._entries:
                k, e = self._entries.popitem(last=False)
                self._bytes -= self._cost(k, e)

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        now = self._clock()
        live: set[bytes] = set()
        with self._lock:
            for key, entry in list(self._entries.items()):
                if match(entry):
                    if entry.fresh_at(now):  # counted as usage() counts: every unexpired entry
                        live.add(key)
                    del self._entries[key]
                    self._bytes -= self._cost(key, entry)
        return live

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def usage(self) -> StoreUsage:
        now = self._clock()
        with self._lock:
            for key, entry in [(k, e) for k, e in self._entries.items() if not e.fresh_at(now)]:
                del self._entries[key]  # expired: out of the count, as out of a purge's
                self._bytes -= self._cost(key, entry)
            count = len(self._entries)
        return StoreUsage(count, self._bytes, self.max_bytes, count, self._bytes)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.clear()

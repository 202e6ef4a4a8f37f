"""What a cache store holds and offers: entries, usage, the `CacheStore` interface, and
the generation bookkeeping every store shares.

Validity is decided on read (TTL by the injected clock, generation stamp), so stale entries
are refused even when their physical deletion has not happened yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from neonpoly.cache.invalidation import GenerationStamp, TableGenerations

Clock = Callable[[], float]
DEFAULT_MAX_ENTRY_BYTES = 8 * 1024 * 1024


# Not frozen: one is made for every stored miss, and a frozen dataclass's __init__ (one
# object.__setattr__ per field) costs four times a plain one's. Nothing changes one once made
# (the L1, the delayed writes and hit memos share it).
@dataclass(slots=True)
class CacheEntry:
    payload: bytes  # raw backend frames, replayed byte for byte
    database: str
    tables: frozenset[str]
    template_id: str
    stamp: GenerationStamp  # generations when the miss was sent
    created_at: float  # by the store's clock
    ttl: float  # seconds

    @property
    def size(self) -> int:
        return len(self.payload)

    def fresh_at(self, now: float) -> bool:
        return now < self.created_at + self.ttl


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Cheap, approximate usage. Disk figures are as of the last write-behind batch and count
    records not yet lazily deleted; `bytes` for disk is diskcache's volume (includes sqlite)."""

    entries: int
    bytes: int
    max_bytes: int
    l1_entries: int = 0
    l1_bytes: int = 0
    pending_writes: int = 0


class CacheStore(Protocol):
    generations: TableGenerations  # what entries are checked against (an invalidation plane observes it)

    def accepts(self, size: int) -> bool: ...
    def get(self, key: bytes) -> CacheEntry | None: ...
    def holds(self, key: bytes, entry: CacheEntry) -> bool: ...
    def put(self, key: bytes, entry: CacheEntry) -> None: ...
    def stamp(self, database: str, tables: Iterable[str]) -> GenerationStamp: ...
    def invalidate_tables(self, database: str, tables: Iterable[str]) -> None: ...
    def invalidate_database(self, database: str) -> None: ...
    def invalidate_everything(self) -> None: ...
    def purge(self) -> int: ...
    def purge_tables(self, tables: Iterable[str]) -> int: ...
    def purge_template(self, template_id: str) -> int: ...
    def usage(self) -> StoreUsage: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


EntryFilter = Callable[[CacheEntry], bool]


def is_live(entry: CacheEntry, now: float, gens: TableGenerations) -> bool:
    return entry.fresh_at(now) and gens.is_current(entry.stamp)


class GenerationsFacade:
    """Stamp/invalidate/purge shared by every store. A purge counts the unexpired entries it
    removed, which are the entries `usage()` shows (one truth: "Entries 1" then "Purged 1"),
    and bumps generations so in-flight misses cannot land after it."""

    generations: TableGenerations

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        raise NotImplementedError

    def stamp(self, database: str, tables: Iterable[str]) -> GenerationStamp:
        return self.generations.stamp(database, tables)

    def holds(self, key: bytes, entry: CacheEntry) -> bool:
        """True only when `get(key)` would now return this very entry, told without a copy
        or a disk read (a hit memo asks it for every repeat); False when that is not cheap
        to tell (the caller then asks `get`)."""
        return False

    def invalidate_tables(self, database: str, tables: Iterable[str]) -> None:
        self.generations.bump_tables(database, tables)

    def invalidate_database(self, database: str) -> None:
        self.generations.bump_database(database)

    def invalidate_everything(self) -> None:
        self.generations.bump_all()

    def purge(self) -> int:
        view = self.generations.copy()
        self.generations.bump_all()
        return len(self._remove_where(lambda e: True, view))

    def purge_tables(self, tables: Iterable[str]) -> int:
        names = frozenset(tables)
        view = self.generations.copy()
        self.generations.bump_tables_everywhere(names)
        return len(self._remove_where(lambda e: not e.tables.isdisjoint(names), view))

    def purge_template(self, template_id: str) -> int:
        # No generation per template: a miss already in flight for it may still be stored.
        view = self.generations.copy()
        return len(self._remove_where(lambda e: e.template_id == template_id, view))

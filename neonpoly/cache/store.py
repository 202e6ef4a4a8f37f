"""Where cached results live: a bounded memory L1 in front of a diskcache L2.

Callers run on the asyncio event loop, so: an L1 hit never touches disk, and `put` never
writes disk on the caller's thread (one background thread does the write-behind). Validity
is decided on read (TTL by the injected clock, generation stamp, checksum), so stale or corrupt
records are refused even when their physical deletion has not happened yet.

This is the only module that imports diskcache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import diskcache

from neonpoly.cache.invalidation import GenerationStamp, TableGenerations

log = logging.getLogger(__name__)

Clock = Callable[[], float]
DEFAULT_MAX_ENTRY_BYTES = 8 * 1024 * 1024
# Rough per-entry bookkeeping cost in the L1, so many tiny entries still count against memory.
_L1_ENTRY_OVERHEAD = 256
# Write-behind backlog cap: past it new writes stay L1-only instead of growing memory unbounded.
_MAX_PENDING_WRITES = 10_000
_WRITE_BATCH = 64
_STATE_FILE = "neonpoly-generations.json"
_DISKCACHE_DB = "cache.db"

# Record layout: MAGIC | version | blake2b(header + payload) | u32 header length | header | payload
_MAGIC = b"NPC"
_FORMAT_VERSION = 1
_DIGEST_SIZE = 16
_PREFIX = struct.Struct(f">3sB{_DIGEST_SIZE}sI")


@dataclass(frozen=True, slots=True)
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
    def accepts(self, size: int) -> bool: ...
    def get(self, key: bytes) -> CacheEntry | None: ...
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


class _Barrier:
    """A write-behind job that must run after everything queued before it is committed."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __call__(self) -> None:
        self.fn()


def _is_live(entry: CacheEntry, now: float, gens: TableGenerations) -> bool:
    return entry.fresh_at(now) and gens.is_current(entry.stamp)


class _GenerationsFacade:
    """Stamp/invalidate/purge shared by every store; purges judge liveness on a pre-bump copy
    so the count reflects what was servable, and bump so in-flight misses cannot land after."""

    generations: TableGenerations

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        raise NotImplementedError

    def stamp(self, database: str, tables: Iterable[str]) -> GenerationStamp:
        return self.generations.stamp(database, tables)

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


class MemoryStore(_GenerationsFacade):
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
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if _is_live(entry, self._clock(), self.generations):
                self._entries.move_to_end(key)
                return entry
            del self._entries[key]
            self._bytes -= self._cost(key, entry)
            return None

    def put(self, key: bytes, entry: CacheEntry) -> None:
        if not self.accepts(entry.size) or not _is_live(entry, self._clock(), self.generations):
            return
        cost = self._cost(key, entry)
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
                    if _is_live(entry, now, view):
                        live.add(key)
                    del self._entries[key]
                    self._bytes -= self._cost(key, entry)
        return live

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def usage(self) -> StoreUsage:
        return StoreUsage(len(self._entries), self._bytes, self.max_bytes, len(self._entries), self._bytes)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.clear()


# -- on-disk record codec -----------------------------------------------------------------


def encode_record(key: bytes, entry: CacheEntry) -> bytes:
    header = json.dumps(
        {
            "key": key.hex(),
            "db": entry.database,
            "tables": sorted(entry.tables),
            "tpl": entry.template_id,
            "stamp": entry.stamp.to_json(),
            "created": entry.created_at,
            "ttl": entry.ttl,
        },
        separators=(",", ":"),
    ).encode()
    digest = hashlib.blake2b(header, digest_size=_DIGEST_SIZE)
    digest.update(entry.payload)
    prefix = _PREFIX.pack(_MAGIC, _FORMAT_VERSION, digest.digest(), len(header))
    return b"".join((prefix, header, entry.payload))


def _entry_from_header(header: dict[str, Any], payload: bytes) -> CacheEntry:
    return CacheEntry(
        payload=payload,
        database=str(header["db"]),
        tables=frozenset(str(t) for t in header["tables"]),
        template_id=str(header["tpl"]),
        stamp=GenerationStamp.from_json(header["stamp"]),
        created_at=float(header["created"]),
        ttl=float(header["ttl"]),
    )


def decode_record(key: bytes, raw: object, *, verify: bool = True) -> CacheEntry | None:
    """The entry a record holds, or None when it is not a well-formed record for this key.

    With verify=False `raw` may be just a prefix (header scans for purges); the payload is
    then empty and the checksum is not checked."""
    if not isinstance(raw, bytes) or len(raw) < _PREFIX.size:
        return None
    try:
        magic, version, digest, header_len = _PREFIX.unpack_from(raw)
        if magic != _MAGIC or version != _FORMAT_VERSION:
            return None
        start = _PREFIX.size
        header_bytes = raw[start : start + header_len]
        payload = raw[start + header_len :] if verify else b""
        if verify:
            check = hashlib.blake2b(header_bytes, digest_size=_DIGEST_SIZE)
            check.update(payload)
            if check.digest() != digest:
                return None
        header = json.loads(header_bytes)
        if header["key"] != key.hex():
            return None
        return _entry_from_header(header, payload)
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def _read_prefix(value: object) -> object:
    """Enough of a stored value to parse its header without reading a large payload."""
    if hasattr(value, "read"):
        with value:  # type: ignore[attr-defined]
            head: bytes = value.read(_PREFIX.size)
            if len(head) < _PREFIX.size:
                return head
            header_len = _PREFIX.unpack_from(head)[3]
            rest: bytes = value.read(header_len)
            return head + rest
    return value


class DiskStore(_GenerationsFacade):
    """diskcache-backed store that survives restarts, together with its generations.

    Generations persist to a JSON file next to the sqlite db, written by the write-behind
    thread after every bump. The file carries a `clean` flag cleared while running: after a
    crash we cannot know whether every bump reached disk, so the history is treated as
    unknown and every older record becomes stale (a cache may forget, never serve stale)."""

    def __init__(
        self, directory: Path, max_bytes: int, *, clock: Clock = time.time, max_entry_bytes: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes or DEFAULT_MAX_ENTRY_BYTES, max_bytes)
        self._clock = clock
        # False until the directory proved writable: before that, a failure must reach the
        # caller (it disables the cache); after, a vanished directory means "removed".
        self._opened = False
        self._cache = diskcache.Cache(
            str(self.directory),
            size_limit=max_bytes,
            eviction_policy="least-recently-stored",  # -used would write on every read
            timeout=5,
            # diskcache would cull (and sum the volume) on every set: measured at a third of
            # the proxy's CPU under a miss-heavy load. The writer culls in bulk instead.
            cull_limit=0,
        )
        self._since_cull = 0
        self._bytes_since_cull = 0
        self._last_cull = time.monotonic()
        try:
            self.generations = self._load_generations()
            self._write_state(clean=False)  # also proves the directory is writable
            self._usage = (len(self._cache), self._cache.volume())
            # Which keys are on disk, so that a miss (the common case for a new query) costs
            # a set lookup on the event loop instead of a sqlite query. It may hold keys
            # diskcache has since evicted (a wasted lookup), never lack one it holds.
            self._present: set[bytes] = {k for k in self._cache.iterkeys() if isinstance(k, bytes)}
            self._opened = True
        except BaseException:
            self._cache.close()
            raise
        self._state_pending = threading.Event()
        self._closed = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Barrier | None] = queue.SimpleQueue()
        self.generations.set_listener(self._schedule_state_write)
        self._writer = threading.Thread(target=self._run_writer, name="neonpoly-cache-writer", daemon=True)
        self._writer.start()

    # -- generations state ---------------------------------------------------------------

    def _load_generations(self) -> TableGenerations:
        path = self.directory / _STATE_FILE
        try:
            state = json.loads(path.read_bytes())
            if state.get("clean") is True:
                return TableGenerations.from_state(state["generations"])
            log.info("cache %s was not closed cleanly; older entries are treated as stale", self.directory)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("unreadable generations state in %s; older entries are treated as stale", self.directory)
        return TableGenerations.with_unknown_history()

    def _write_state(self, *, clean: bool) -> None:
        path = self.directory / _STATE_FILE
        tmp = path.with_suffix(".tmp")
        if self._opened and not self.directory.is_dir():
            return  # the cache was removed (its directory deleted): nothing left to persist
        tmp.write_text(json.dumps({"clean": clean, "generations": self.generations.to_state()}))
        os.replace(tmp, path)

    def _schedule_state_write(self) -> None:
        # Coalesce bursts of bumps into one write; the flag is cleared before the snapshot.
        if not self._state_pending.is_set():
            self._state_pending.set()
            self._jobs.put(self._persist_state)

    def _persist_state(self) -> None:
        self._state_pending.clear()
        self._write_state(clean=False)

    # -- write-behind --------------------------------------------------------------------

    def _run_writer(self) -> None:
        while True:
            batch = [self._jobs.get()]
            while len(batch) < _WRITE_BATCH and not isinstance(batch[-1], _Barrier | None) and not self._jobs.empty():
                batch.append(self._jobs.get())
            last = batch[-1]
            writes = batch if not isinstance(last, _Barrier | None) else batch[:-1]
            # One sqlite transaction per batch: a commit per record costs ~100 us. Barriers
            # run after the commit, so whoever waits on them sees the writes.
            with self._transaction():
                for job in writes:
                    self._run_job(job)
            if last is None:
                return
            if isinstance(last, _Barrier):
                self._run_job(last)
            else:
                self._since_cull += len(writes)
                over = self._usage[1] + self._bytes_since_cull > self.max_bytes
                if (
                    over
                    or self._since_cull >= 1024
                    or (self._jobs.empty() and time.monotonic() - self._last_cull > 5.0)
                ):
                    self._cull()
                elif self._jobs.empty():
                    with contextlib.suppress(Exception):  # the count is cheap, the volume is not
                        self._usage = (len(self._cache), self._usage[1])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            ctx = self._cache.transact()
            ctx.__enter__()
        except Exception:
            yield  # no transaction: the writes still work, one commit each
            return
        try:
            yield
        finally:
            try:
                ctx.__exit__(None, None, None)
            except Exception:  # the writer thread must outlive a failed commit (disk full)
                log.exception("cache write-behind commit failed")

    def _run_job(self, job: Callable[[], None] | None) -> None:
        if job is None:
            return
        try:
            job()
        except Exception:
            if self._opened and not self.directory.is_dir():
                log.debug("cache %s was removed; write-behind job dropped", self.directory)
            else:
                log.exception("cache write-behind job failed")

    def _cull(self) -> None:
        """Expired entries out, and back under the size bound (what diskcache does per set)."""
        with contextlib.suppress(Exception):
            self._cache.cull()
        self._since_cull = 0
        self._bytes_since_cull = 0
        self._last_cull = time.monotonic()
        self._refresh_usage()

    def _refresh_usage(self) -> None:
        with contextlib.suppress(Exception):
            self._usage = (len(self._cache), self._cache.volume())
            if len(self._present) > 2 * self._usage[0] + 1024:  # evictions we did not see
                self._present = {k for k in self._cache.iterkeys() if isinstance(k, bytes)}

    def _write(self, key: bytes, entry: CacheEntry) -> None:
        # Re-check right before writing: an invalidation since put() always wins.
        if not self.generations.is_current(entry.stamp):
            return
        remaining = entry.created_at + entry.ttl - self._clock()
        if remaining <= 0:
            return
        self._present.add(key)
        self._bytes_since_cull += entry.size
        self._cache.set(key, encode_record(key, entry), expire=remaining)

    def _delete_if_unchanged(self, key: bytes, seen_prefix: bytes) -> None:
        # A newer put for the same key may have landed since the bad record was read.
        current = self._cache.get(key, default=None)
        if isinstance(current, bytes) and current[:64] != seen_prefix:
            return
        self._cache.delete(key)

    def _call_on_writer(self, fn: Callable[[], set[bytes]]) -> set[bytes]:
        """Run fn after every queued write, and wait for it (purges need their count)."""
        if self._closed:
            return fn()
        fut: Future[set[bytes]] = Future()

        def job() -> None:
            try:
                with self._transaction():
                    result = fn()
            except BaseException as exc:
                self._refresh_usage()
                fut.set_exception(exc)
                return
            # Usage first: whoever waits on the purge may ask for it next (SHOW CACHES).
            self._refresh_usage()
            fut.set_result(result)

        self._jobs.put(_Barrier(job))
        return fut.result()

    # -- CacheStore ----------------------------------------------------------------------

    def accepts(self, size: int) -> bool:
        return size <= self.max_entry_bytes

    def get(self, key: bytes) -> CacheEntry | None:
        if self._closed or key not in self._present:
            return None
        try:
            raw = self._cache.get(key, default=None)
        except Exception:
            log.warning("cache read failed", exc_info=True)
            return None
        if raw is None:
            return None
        entry = decode_record(key, raw)
        if entry is None or not _is_live(entry, self._clock(), self.generations):
            seen = raw[:64] if isinstance(raw, bytes) else b""
            self._jobs.put(partial(self._delete_if_unchanged, key, seen))
            return None
        return entry

    def put(self, key: bytes, entry: CacheEntry) -> None:
        if self._closed or not self.accepts(entry.size) or not _is_live(entry, self._clock(), self.generations):
            return
        if self._jobs.qsize() >= _MAX_PENDING_WRITES:
            return
        self._jobs.put(partial(self._write, key, entry))

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        def scan() -> set[bytes]:
            now = self._clock()
            live: set[bytes] = set()
            for key in list(self._cache.iterkeys()):
                try:
                    value = self._cache.get(key, default=None, read=True)
                    entry = decode_record(key, _read_prefix(value), verify=False) if isinstance(key, bytes) else None
                except OSError:
                    entry = None
                if entry is None:
                    self._cache.delete(key)  # corrupt or foreign: never servable anyway
                elif match(entry):
                    if _is_live(entry, now, view):
                        live.add(key)
                    self._cache.delete(key)
            return live

        return self._call_on_writer(scan)

    def usage(self) -> StoreUsage:
        entries, volume = self._usage
        return StoreUsage(entries, volume, self.max_bytes, pending_writes=self._jobs.qsize())

    def flush(self) -> None:
        if not self._closed:
            done = threading.Event()

            def finish() -> None:
                self._refresh_usage()  # so usage() right after flush() is exact
                done.set()

            self._jobs.put(_Barrier(finish))
            done.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._writer.join()
        self.generations.set_listener(None)
        try:
            self._write_state(clean=True)
        except OSError:
            log.warning("could not save cache generations to %s", self.directory, exc_info=True)
        self._cache.close()


class TieredStore(_GenerationsFacade):
    """Memory L1 in front of a disk L2 sharing one set of (persisted) generations."""

    def __init__(self, l1: MemoryStore, l2: DiskStore) -> None:
        self.l1 = l1
        self.l2 = l2
        self.generations = l2.generations
        l1.bind_generations(l2.generations)

    def accepts(self, size: int) -> bool:
        return self.l1.accepts(size) and self.l2.accepts(size)

    def get(self, key: bytes) -> CacheEntry | None:
        entry = self.l1.get(key)
        if entry is None:
            entry = self.l2.get(key)
            if entry is not None:
                self.l1.put(key, entry)
        return entry

    def put(self, key: bytes, entry: CacheEntry) -> None:
        self.l1.put(key, entry)
        self.l2.put(key, entry)

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


class DisabledStore(_GenerationsFacade):
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


def destroy_store_dir(directory: Path) -> None:
    """Delete a cache directory (integration removed). Refuses directories that do not look
    like a neonpoly cache, so a wrong path cannot wipe unrelated files."""
    path = Path(directory)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    markers = (path / _DISKCACHE_DB, path / _STATE_FILE)
    if any(path.iterdir()) and not any(m.exists() for m in markers):
        raise ValueError(f"{path} does not look like a neonpoly cache directory")
    shutil.rmtree(path)

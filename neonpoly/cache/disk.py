"""The disk tier: a diskcache store that survives restarts, written behind by one thread.

Callers run on the asyncio event loop, so `put` never writes disk on the caller's thread:
one background thread does the write-behind, in batches, and culls in bulk. Records are
checked on read (see record.py), so a corrupt one is refused and deleted.

Writes wait `WRITE_DELAY` seconds, one per key (the last put wins), and are written only if
still current then. Under a read/write mix most entries of a hot key are made stale by a write
within seconds: written at once, each cost the writer thread ~250 µs of sqlite and Python (and
the event loop the GIL); delayed, they are dropped unwritten, and the rest go in one batch.
A round writes only the entries that lasted a whole delay: a hot key re-captured after every
write would otherwise be written again each round (`_write_delayed`).
Nothing durable is lost: the generations are only trusted after a clean close(), which writes
every delayed entry first, and a get() finds a delayed entry as if it were on disk.

This is the only module that imports diskcache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import diskcache

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
from neonpoly.cache.record import decode_record, encode_record, read_prefix

log = logging.getLogger("neonpoly.cache.store")

# Delayed writes past which they are written at once (twice as many: new writes stay L1-only).
_MAX_PENDING_WRITES = 10_000
_MAX_DELAYED_BYTES = 64 << 20  # past this the delayed entries are written without waiting
_WRITE_BATCH = 64
WRITE_DELAY = 10.0
_STATE_FILE = "neonpoly-generations.json"
_DISKCACHE_DB = "cache.db"


class _Barrier:
    """A write-behind job that must run after everything queued before it is committed."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def __call__(self) -> None:
        self.fn()


def _wake() -> None:
    """A job that only wakes the writer (to start waiting for the delayed writes)."""


class DiskStore(GenerationsFacade):
    """diskcache-backed store that survives restarts, together with its generations.

    Generations persist to a JSON file next to the sqlite db, written by the write-behind
    thread after every bump. The file carries a `clean` flag cleared while running: after a
    crash we cannot know whether every bump reached disk, so the history is treated as
    unknown and every older record becomes stale (a cache may forget, never serve stale)."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        clock: Clock = time.time,
        max_entry_bytes: int | None = None,
        write_delay: float = WRITE_DELAY,
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
            # diskcache has since evicted (a wasted lookup), never lack one whose record may
            # still be served (keys found stale leave it: forget(), get()).
            self._present: set[bytes] = {k for k in self._cache.iterkeys() if isinstance(k, bytes)}
            self._opened = True
        except BaseException:
            self._cache.close()
            raise
        self._usage_checked = time.monotonic()
        self._closed = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Barrier | None] = queue.SimpleQueue()
        # Entries waiting to be written (WRITE_DELAY), by key, and when the oldest is due.
        self._delayed: dict[bytes, CacheEntry] = {}
        self._delayed_bytes = 0
        self._delayed_lock = threading.Lock()
        self._due: float | None = None
        self._write_delay = write_delay
        # No rewrite of the state on every bump: it was written unclean above, and an unclean
        # state is never loaded, so only the clean write at close() counts. (With per-key
        # generations, cache/keys.py, rewriting it on each write cost milliseconds per bump.)
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

    # -- write-behind --------------------------------------------------------------------

    def _run_writer(self) -> None:
        while True:
            due = self._due
            try:
                first = self._jobs.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                first = _wake  # the delayed writes are due
            batch = [first]
            while len(batch) < _WRITE_BATCH and not isinstance(batch[-1], _Barrier | None) and not self._jobs.empty():
                batch.append(self._jobs.get())
            last = batch[-1]
            ending = isinstance(last, _Barrier | None)
            # One sqlite transaction per batch: a commit per record costs ~100 us.
            with self._transaction():
                for job in batch[:-1] if ending else batch:
                    self._run_job(job)
            # Barriers run after the commit, so whoever waits on them sees the writes; a
            # barrier (a purge, flush, close) first writes every entry put before it.
            due = self._due
            if due is not None and (ending or time.monotonic() >= due):
                self._write_delayed(everything=ending)
            if last is None:
                return
            if isinstance(last, _Barrier):
                self._run_job(last)

    def _write_delayed(self, *, everything: bool = True) -> None:
        """Write the delayed entries still current: all of them (`everything`: a barrier, or
        too much held), or those put at least a delay ago, the rest kept for the next round.
        An entry of a key stored again within the delay is most often one a write makes
        stale again soon (a hot key under writes: the mix re-captures each every few
        seconds), and each round would write it again, ~100 µs of the writer's (and GIL)
        time per entry, to be dropped on disk at the next read. It reaches disk once it
        lasts a delay unchanged, or at the next barrier (close writes every one)."""
        with self._delayed_lock:
            delayed = self._delayed
            if everything or len(delayed) >= _MAX_PENDING_WRITES or self._delayed_bytes > _MAX_DELAYED_BYTES:
                entries, self._delayed = list(delayed.items()), {}
                self._delayed_bytes = 0
                self._due = None
            else:
                now = self._clock()
                ripe = now - self._write_delay
                entries = []
                for key, entry in list(delayed.items()):
                    if entry.created_at <= ripe or not is_live(entry, now, self.generations):
                        del delayed[key]
                        self._delayed_bytes -= entry.size
                        entries.append((key, entry))  # (a stale one is dropped by _write)
                self._due = time.monotonic() + self._write_delay if delayed else None
        for at in range(0, len(entries), _WRITE_BATCH):
            with self._transaction():
                for key, entry in entries[at : at + _WRITE_BATCH]:
                    self._run_job(partial(self._write, key, entry))
            self._since_cull += min(_WRITE_BATCH, len(entries) - at)
            over = self._usage[1] + self._bytes_since_cull > self.max_bytes
            if over or self._since_cull >= 1024 or time.monotonic() - self._last_cull > 5.0:
                self._cull()
        if entries:
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
        delayed = self._delayed.get(key)  # one dict lookup: atomic under the GIL
        if delayed is not None:
            return delayed if is_live(delayed, self._clock(), self.generations) else None
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
        if entry is None or not is_live(entry, self._clock(), self.generations):
            self._present.discard(key)  # stale now is stale for good: no more reads of it
            seen = raw[:64] if isinstance(raw, bytes) else b""
            self._jobs.put(partial(self._delete_if_unchanged, key, seen))
            return None
        return entry

    def put(self, key: bytes, entry: CacheEntry) -> None:
        size = len(entry.payload)
        if size > self.max_entry_bytes or not is_live(entry, self._clock(), self.generations):
            return
        self.delay(key, entry, size)

    def delay(self, key: bytes, entry: CacheEntry, size: int) -> None:
        """`put` of an entry the caller checked as `put` checks it (its `size`, accepted, and
        live by this store's clock and generations): TieredStore checks once for both tiers."""
        if self._closed:
            return
        with self._delayed_lock:
            delayed = self._delayed
            if (len(delayed) >= 2 * _MAX_PENDING_WRITES or self._delayed_bytes > 2 * _MAX_DELAYED_BYTES) and (
                key not in delayed
            ):
                return  # the writer is that far behind: new writes stay L1-only
            first = not delayed
            old = delayed.get(key)
            delayed[key] = entry
            self._delayed_bytes += size - (len(old.payload) if old is not None else 0)
            if first:
                self._due = time.monotonic() + self._write_delay
            elif self._delayed_bytes > _MAX_DELAYED_BYTES or len(delayed) >= _MAX_PENDING_WRITES:
                self._due = time.monotonic()  # too much held: written now
            else:
                return
        self._jobs.put(_wake)  # the writer starts waiting for them

    def forget(self, key: bytes) -> None:
        """The entry for this key was found stale (in the L1): so is any copy here, the same
        entry or an older one, so a get() need not read disk for it."""
        self._present.discard(key)
        with self._delayed_lock:
            old = self._delayed.pop(key, None)
            if old is not None:
                self._delayed_bytes -= old.size

    def _remove_where(self, match: EntryFilter, view: TableGenerations) -> set[bytes]:
        def scan() -> set[bytes]:
            now = self._clock()
            live: set[bytes] = set()
            for key in list(self._cache.iterkeys()):
                try:
                    value = self._cache.get(key, default=None, read=True)
                    entry = decode_record(key, read_prefix(value), verify=False) if isinstance(key, bytes) else None
                except OSError:
                    entry = None
                if entry is None:
                    self._cache.delete(key)  # corrupt or foreign: never servable anyway
                elif match(entry):
                    if entry.fresh_at(now):  # counted as usage() counts: every unexpired entry
                        live.add(key)
                    self._cache.delete(key)
            return live

        # Delayed entries the purge removes (a bump before it made them stale, so the writer
        # drops them instead of writing them): counted as usage() counted them just before.
        now = self._clock()
        with self._delayed_lock:
            delayed = list(self._delayed.items())
        waiting = {k for k, e in delayed if match(e) and e.fresh_at(now) and view.is_current(e.stamp)}
        return self._call_on_writer(scan) | waiting

    def usage(self) -> StoreUsage:
        # Expired entries leave the count within a second (on the writer), even when nothing
        # is written: Entries shows what a purge would remove, never entries already dead.
        now = time.monotonic()
        if not self._closed and now - self._usage_checked > 1.0:
            self._usage_checked = now
            self._jobs.put(self._expire)
        entries, volume = self._usage
        # Delayed entries count as stored (a purge writes them first, then removes them): the
        # live ones, of keys not on disk already.
        wall = self._clock()
        with self._delayed_lock:
            delayed = list(self._delayed.items())
        waiting = [e for k, e in delayed if k not in self._present and is_live(e, wall, self.generations)]
        return StoreUsage(
            entries + len(waiting),
            volume + sum(e.size for e in waiting),
            self.max_bytes,
            pending_writes=len(delayed),  # the queue holds no writes any more
        )

    def _expire(self) -> None:
        with contextlib.suppress(Exception):
            self._cache.expire()
        self._refresh_usage()

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

"""Table generations shared by the workers of one `serve --workers N` (one parent, one host):
a bump by one worker is seen by every other worker's next hit check, through memory, with no
message and no wake-up (PostgreSQL's own shared memory, pgpool-II's shmem query cache).

Without it a write's reply waited until every sibling said, through Redis, that it had applied
the write's bumps (freshness/plane.py, rule 1): two round trips and a wake-up of every sibling
per write. With it, a sibling cannot serve a hit a write made stale once the writer's bump is
in memory, which happens before the write is even sent to the origin; Redis carries the
bumps to other hosts only (freshness/redis_plane.py).

Layout of the region (a memfd the parent makes and passes to each worker): a header (magic,
rows, slots), one name per row (the plane's name of the worker owning it, written when it
joins), then `rows x slots` unsigned 64-bit counters. Row r is written by worker r alone (one
writer per counter: no lock between processes). A name of a table (origin, database, name)
hashes to one slot; its sibling part is the sum of the other rows' counters at that slot.
Counters only grow, so that sum moves whenever a sibling bumped the name (or another name
hashed to the same slot: an extra invalidation, never a missed one). Aligned 8-byte loads and
stores are single-copy atomic on x86-64 and AArch64, and a memoryview reads or writes a 'Q'
item with one of them, so a reader never sees half a counter.

After the counters, the holds of prepared transactions (cache/holds.py): a header (live
holds, records ever used, overflowed) and `HOLD_RECORDS` records, each one hold of one
(cache, gid): its origin, database, a bit set of the names it wrote (a name sets two of its
bits: another name setting them too only holds more) or "anything", and its gid for the
user to read. A hold is no worker's: a COMMIT PREPARED through any worker must end a hold
taken through another, so records are written under a lock of the holds' bytes (POSIX
record locks: the kernel drops a process's locks when it dies, so a worker killed while
holding one never blocks its siblings). Holds change at a PREPARE or COMMIT PREPARED, and
are read only while one is live (one load says whether), at a store: the lock costs nothing
on a hit.

A worker's death does not end its holds, on purpose: the transaction it prepared stays
prepared on the origin (COMMIT PREPARED may still come straight there), so dropping them
would let the others store what it wrote. The parent (control/workers.py) then stops the
whole set, and a new set starts with a new board: holds end as they do when one process
restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator

from neonpoly.cache.holds import HoldKey, held_reason

log = logging.getLogger("neonpoly.cache")

MAGIC = b"NPSIBGN2"
_HEADER = struct.Struct("<8sII")  # magic, rows, slots (16 bytes: the counters stay 8-aligned)
NAME_BYTES = 256  # a worker's plane name (longer ones are not written: it is then waited for)
DEFAULT_SLOTS = 1 << 16  # per row: 512 KiB a worker; collisions only cost hits
_MAX_MEMO = 1 << 20  # slot numbers memoised per origin before the memo starts over

Key = tuple[str, str]  # (database, name), as TableGenerations keys them

# Holds: a header of four words (live, used, overflowed, taken), then the records.
HOLD_RECORDS = 1024  # prepared transactions held at once (PostgreSQL's max_prepared_transactions is per server)
_HOLD_HEADER = 32
# state (0 free; held: the order of its last hold, `taken` right after it), key digest, origin,
# database, everything (0/1), the names' bits, gid
_RECORD = struct.Struct("<Q16sQQQ128s80s")
_BITS = 128 * 8
_LIVE, _USED, _OVERFLOW, _TAKEN = 0, 1, 2, 3


class SiblingBoard:
    """One process's mapping of the region: its own row (None in the parent, which only makes
    it) and every row's counters."""

    def __init__(self, buffer: mmap.mmap, fd: int, row: int | None) -> None:
        magic, rows, slots = _HEADER.unpack_from(buffer, 0)
        if magic != MAGIC or rows < 1 or slots < 1 or len(buffer) != _size(rows, slots):
            raise ValueError("not a neonpoly sibling board")
        if row is not None and not 0 <= row < rows:
            raise ValueError(f"row {row} of a board of {rows}")
        self._buffer = buffer
        self._fd = fd
        self.rows: int = rows
        self.slots: int = slots
        self.row = row
        base = _HEADER.size + rows * NAME_BYTES
        self.counters = memoryview(buffer)[base : base + rows * slots * 8].cast("Q")
        self._lock = threading.Lock()  # bumps from more than one thread of this process
        self._views: dict[str, BoardView] = {}
        self.holds_at = _holds_at(rows, slots)
        self.hold_words = memoryview(buffer)[self.holds_at : self.holds_at + _HOLD_HEADER].cast("Q")
        self._holds_lock = threading.Lock()  # POSIX record locks do not exclude this process's threads
        self._holds: dict[str, BoardHolds] = {}

    @classmethod
    def create(cls, rows: int, slots: int = DEFAULT_SLOTS) -> SiblingBoard:
        """A new, zeroed region (the parent's); `fileno()` is what the workers attach."""
        fd = os.memfd_create("neonpoly-generations")
        try:
            size = _size(rows, slots)
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
            _HEADER.pack_into(buffer, 0, MAGIC, rows, slots)
        except BaseException:
            os.close(fd)
            raise
        return cls(buffer, fd, None)

    @classmethod
    def attach(cls, fd: int, row: int) -> SiblingBoard:
        """Map the region the parent passed as `fd`, owning row `row`. Raises ValueError."""
        try:
            size = os.fstat(fd).st_size
            buffer = mmap.mmap(fd, size)
            # Passed down by the parent (pass_fds makes it inheritable): keep it from whatever
            # this worker starts in turn (pg_ctl, psql, a subprocess of a test).
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ValueError(f"cannot map the sibling board (fd {fd}): {exc}") from exc
        try:
            return cls(buffer, fd, row)
        except ValueError:
            buffer.close()
            raise

    def fileno(self) -> int:
        return self._fd

    # --- names: which plane nodes share this memory ----------------------------------------

    def join(self, node: str) -> None:
        """Say that the plane node `node` owns this row: siblings stop waiting for its
        acknowledgements and drop the table names of its entries. Call it only once every
        cache that may serve hits here reads the board, and only while Redis registers this
        process under that name (freshness/siblings.py `holds_name`)."""
        assert self.row is not None, "the parent owns no row"
        data = node.encode()
        if not data or len(data) > NAME_BYTES:
            return  # unnamed: the others keep waiting for it (slower, never stale)
        start = _HEADER.size + self.row * NAME_BYTES
        self._buffer[start : start + NAME_BYTES] = data.ljust(NAME_BYTES, b"\0")

    def leave(self) -> None:
        """This row names no node any more (its name is another process's: its siblings must
        wait for its acknowledgements and apply its entries in full)."""
        assert self.row is not None, "the parent owns no row"
        start = _HEADER.size + self.row * NAME_BYTES
        self._buffer[start : start + NAME_BYTES] = bytes(NAME_BYTES)

    def siblings(self) -> frozenset[str]:
        """The nodes of the other rows that joined."""
        names: set[str] = set()
        for row in range(self.rows):
            if row != self.row:
                start = _HEADER.size + row * NAME_BYTES
                name = bytes(self._buffer[start : start + NAME_BYTES]).rstrip(b"\0")
                if name:
                    names.add(name.decode(errors="replace"))
        return frozenset(names)

    # --- counters ------------------------------------------------------------------------

    def view(self, origin: str) -> BoardView:
        """The counters of one origin's names (its caches in every worker hash alike)."""
        view = self._views.get(origin)
        if view is None:
            view = self._views[origin] = BoardView(self, origin)
        return view

    def holds(self, origin: str) -> BoardHolds:
        """The holds of one origin's caches (cache/holds.py), in every worker."""
        holds = self._holds.get(origin)
        if holds is None:
            holds = self._holds[origin] = BoardHolds(self, origin)
        return holds

    @contextlib.contextmanager
    def locked_holds(self, kind: int) -> Iterator[mmap.mmap]:
        """The region, with the holds' bytes locked (fcntl.LOCK_SH to read, LOCK_EX to write)."""
        length = _HOLD_HEADER + HOLD_RECORDS * _RECORD.size
        with self._holds_lock:
            fcntl.lockf(self._fd, kind, length, self.holds_at)
            try:
                yield self._buffer
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, length, self.holds_at)

    def close(self) -> None:
        self._views.clear()
        self._holds.clear()
        self.hold_words.release()
        self.counters.release()
        self._buffer.close()
        os.close(self._fd)


class BoardView:
    """One origin's names on the board, as `TableGenerations` reads and the plane bumps them."""

    __slots__ = ("_lock", "_prefix", "counters", "mine", "others", "slot_of", "slots")

    def __init__(self, board: SiblingBoard, origin: str) -> None:
        self.slots: int = board.slots
        self.counters: memoryview = board.counters
        self.mine = -1 if board.row is None else board.row * board.slots
        self.others = tuple(r * board.slots for r in range(board.rows) if r != board.row)
        self.slot_of: dict[Key, int] = {}  # memo: a hit check costs one dict lookup per table
        self._prefix = origin.encode() + b"\0"
        self._lock = board._lock

    def slot(self, key: Key) -> int:
        """The key's slot (crc32: the same in every process, unlike hash())."""
        slot = zlib.crc32(b"%b%b\0%b" % (self._prefix, key[0].encode(), key[1].encode())) % self.slots
        memo = self.slot_of
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        memo[key] = slot
        return slot

    def sibling_part(self, key: Key) -> int:
        """What the other workers bumped this key by (and whatever shares its slot)."""
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self.slot(key)
        counters = self.counters
        total = 0
        for row in self.others:
            total += counters[row + slot]
        return total

    def bump(self, database: str, names: Iterable[str]) -> None:
        """This worker bumped these names: its siblings' next checks see it."""
        assert self.mine >= 0, "the parent owns no row"
        counters, mine = self.counters, self.mine
        with self._lock:  # read-modify-write of this process's own counters
            for name in names:
                key = (database, name)
                slot = self.slot_of.get(key)
                if slot is None:
                    slot = self.slot(key)
                counters[mine + slot] += 1

    def frozen(self) -> BoardView:
        """A detached copy of the counters as they are now (a purge's 'just before' view)."""
        copy = object.__new__(BoardView)
        copy.slots, copy.mine, copy.others = self.slots, -1, self.others
        copy.counters = memoryview(bytes(self.counters.cast("B"))).cast("Q")
        copy.slot_of, copy._prefix, copy._lock = {}, self._prefix, self._lock
        return copy


class BoardHolds:
    """One origin's holds on the board (a `PreparedHolds`, cache/holds.py), shared by every
    worker: taken through one, they hold in all; released through any, they end in all."""

    __slots__ = ("_board", "_origin", "_words")

    def __init__(self, board: SiblingBoard, origin: str) -> None:
        self._board = board
        self._origin = _digest8(origin.encode())
        self._words = board.hold_words

    def __bool__(self) -> bool:
        # One aligned load each: a hold is counted live before the eviction that follows it
        # reaches the counters, so a store whose stamp saw that eviction sees the hold too.
        return bool(self._words[_LIVE] or self._words[_OVERFLOW])

    def _records(self, buffer: mmap.mmap) -> Iterator[tuple[int, tuple[int, bytes, int, int, int, bytes, bytes]]]:
        base = self._board.holds_at + _HOLD_HEADER
        for index in range(min(self._words[_USED], HOLD_RECORDS)):
            at = base + index * _RECORD.size
            yield at, _RECORD.unpack_from(buffer, at)

    def taken(self) -> int:
        return self._words[_TAKEN]  # (an older value, read while a hold is written, keeps more)

    def hold(self, key: HoldKey, database: str, reach: frozenset[str] | None) -> None:
        digest, db = _key_digest(key), _digest8(database.encode())
        with self._board.locked_holds(fcntl.LOCK_EX) as buffer:
            order = self._words[_TAKEN] + 1
            self._words[_TAKEN] = order
            free = None
            for at, (state, found, origin, held_db, everything, bits, gid) in self._records(buffer):
                if state and found == digest and origin == self._origin:
                    wide = bool(everything) or reach is None or held_db != db  # as LocalHolds.hold
                    merged = bits if reach is None or wide else _bits(database, reach, bits)
                    _RECORD.pack_into(buffer, at, order, digest, origin, held_db, int(wide), merged, gid)
                    return
                if not state and free is None:
                    free = at
            if free is None and self._words[_USED] < HOLD_RECORDS:
                free = self._board.holds_at + _HOLD_HEADER + self._words[_USED] * _RECORD.size
                self._words[_USED] += 1
            if free is None:
                # Full: hold every read of every origin until the set restarts (never stale).
                log.warning("more than %d prepared transactions held at once: nothing is stored until neonpoly "
                            "restarts", HOLD_RECORDS)  # fmt: skip
                self._words[_OVERFLOW] = 1
                return
            bits = bytes(_BITS // 8) if reach is None else _bits(database, reach, bytes(_BITS // 8))
            shown = key[1].encode("utf-8", "replace")[: _RECORD.size - 176]
            # The body first, its state last: a worker killed in between left a free record.
            _RECORD.pack_into(buffer, free, 0, digest, self._origin, db, int(reach is None), bits, shown)
            buffer[free : free + 8] = order.to_bytes(8, "little")
            self._words[_LIVE] += 1

    def release(self, key: HoldKey, before: int | None = None) -> None:
        digest = _key_digest(key)
        with self._board.locked_holds(fcntl.LOCK_EX) as buffer:
            for at, (state, found, origin, *_) in self._records(buffer):
                if state and found == digest and origin == self._origin:
                    if before is not None and state > before:
                        return  # held again since the release was sent (PreparedHolds.release)
                    buffer[at : at + 8] = bytes(8)
                    self._words[_LIVE] -= 1
                    return

    def holding(self, database: str, tables: frozenset[str]) -> str | None:
        if self._words[_OVERFLOW]:
            return (
                f"not stored: more than {HOLD_RECORDS} prepared transactions were held at once; "
                "held until neonpoly restarts"
            )
        db = _digest8(database.encode())
        wanted = _bits(database, tables, bytes(_BITS // 8))
        want = int.from_bytes(wanted, "little")
        with self._board.locked_holds(fcntl.LOCK_SH) as buffer:
            for _, (state, _, origin, held_db, everything, bits, gid) in self._records(buffer):
                if state and origin == self._origin and (
                    everything or (held_db == db and _shares_a_name(database, tables, bits, want))
                ):
                    return held_reason(_gid(gid))
        return None

    def entries(self) -> list[tuple[HoldKey, str, frozenset[str] | None]]:
        return []  # read by no one: a board is the last keeper (QueryCache.share_holds)


def _key_digest(key: HoldKey) -> bytes:
    # 128 bits: a release finds its hold by this alone (two keys colliding would release both).
    text = b"%b\0%b" % (key[0].encode(), key[1].encode("utf-8", "surrogatepass"))
    return hashlib.blake2b(text, digest_size=16).digest()


def _digest8(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _name_bits(database: str, name: str) -> tuple[int, int]:
    h = _digest8(b"%b\0%b" % (database.encode(), name.encode()))
    return h % _BITS, (h >> 32) % _BITS


def _bits(database: str, names: Iterable[str], into: bytes) -> bytes:
    value = int.from_bytes(into, "little")
    for name in names:
        a, b = _name_bits(database, name)
        value |= (1 << a) | (1 << b)
    return value.to_bytes(_BITS // 8, "little")


def _shares_a_name(database: str, tables: Iterable[str], bits: bytes, want: int) -> bool:
    """Some name of `tables` has both its bits in `bits` (maybe another name's: holds more)."""
    held = int.from_bytes(bits, "little")
    if not held & want:
        return False
    for name in tables:
        a, b = _name_bits(database, name)
        if held >> a & 1 and held >> b & 1:
            return True
    return False


def _gid(shown: bytes) -> str:
    return shown.rstrip(b"\0").decode("utf-8", "replace")  # (cut at 80 bytes: maybe mid-character)


def _holds_at(rows: int, slots: int) -> int:
    return _HEADER.size + rows * NAME_BYTES + rows * slots * 8


def _size(rows: int, slots: int) -> int:
    return _holds_at(rows, slots) + _HOLD_HEADER + HOLD_RECORDS * _RECORD.size

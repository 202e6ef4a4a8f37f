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
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterable

MAGIC = b"NPSIBGN1"
_HEADER = struct.Struct("<8sII")  # magic, rows, slots (16 bytes: the counters stay 8-aligned)
NAME_BYTES = 256  # a worker's plane name (longer ones are not written: it is then waited for)
DEFAULT_SLOTS = 1 << 16  # per row: 512 KiB a worker; collisions only cost hits
_MAX_MEMO = 1 << 20  # slot numbers memoised per origin before the memo starts over

Key = tuple[str, str]  # (database, name), as TableGenerations keys them


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
        self.counters = memoryview(buffer)[base:].cast("Q")
        self._lock = threading.Lock()  # bumps from more than one thread of this process
        self._views: dict[str, BoardView] = {}

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

    def close(self) -> None:
        self._views.clear()
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


def _size(rows: int, slots: int) -> int:
    return _HEADER.size + rows * NAME_BYTES + rows * slots * 8

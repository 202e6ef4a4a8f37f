"""Table generations: how a write makes cached reads stale without touching them.

Every cached entry carries a `GenerationStamp` taken when its miss was *sent* to the origin.
A write bumps the generation of the tables it names (or the database epoch, or the global
epoch); an entry is current only while every number in its stamp still matches. That closes
the race where a read is in flight while a write lands: the read's result arrives carrying the
old numbers and is refused, both when stored and when served.

Counters are plain ints compared for equality, so "unknown history" (lost or untrusted state
after a crash) is handled by starting the global epoch at a random value that no earlier stamp
can hold.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neonpoly.cache.siblings import BoardView

STATE_VERSION = 1


# Not frozen: one is made for every captured miss, and a frozen dataclass's __init__ (one
# object.__setattr__ per field) costs four times a plain one's. Nothing changes one once made,
# so it hashes by value as a frozen one would.
@dataclass(slots=True, unsafe_hash=True)
class GenerationStamp:
    """The generation numbers an entry depends on, as they were when its miss was sent."""

    database: str
    global_epoch: int
    database_epoch: int
    tables: tuple[tuple[str, int], ...]  # sorted by table name, so equal sets compare equal

    def to_json(self) -> list[Any]:
        return [self.database, self.global_epoch, self.database_epoch,
                [[t, g] for t, g in self.tables]]

    @classmethod
    def from_json(cls, data: Any) -> GenerationStamp:
        """Rebuild a stamp read from disk; raises ValueError on anything malformed."""
        try:
            database, global_epoch, database_epoch, tables = data
            pairs = tuple((str(t), int(g)) for t, g in tables)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed generation stamp: {exc}") from exc
        if not isinstance(database, str) or not isinstance(global_epoch, int) \
                or not isinstance(database_epoch, int):
            raise ValueError("malformed generation stamp")
        return cls(database, global_epoch, database_epoch, pairs)


def _in_order(tables: Iterable[str]) -> tuple[str, ...]:
    """Table names sorted, as a stamp holds them: a read's names are a frozenset made once per
    shape of read (cache/keys.py read_names), so its order is remembered, not sorted per miss."""
    if not isinstance(tables, frozenset):
        return tuple(sorted(set(tables)))
    found = _ORDERS.get(tables)
    if found is None:
        if len(_ORDERS) >= 4096:
            _ORDERS.clear()
        found = _ORDERS[tables] = tuple(sorted(tables))
    return found


_ORDERS: dict[frozenset[str], tuple[str, ...]] = {}


class TableGenerations:
    """Per (database, table) generations, per-database epochs and a global epoch.

    Thread-safe: the event loop stamps and bumps while the store's write-behind thread checks
    stamps and snapshots state. Reads (`stamp`, `is_current`) take no lock because single dict
    lookups are atomic under the GIL; mutations and snapshots do.
    """

    __slots__ = ("_board", "_databases", "_global", "_lock", "_observer", "_on_change", "_tables")

    def __init__(self, global_epoch: int = 0) -> None:
        self._global = global_epoch
        self._databases: dict[str, int] = {}
        self._tables: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._on_change: Callable[[], None] | None = None
        self._observer: Callable[[tuple[Any, ...]], None] | None = None
        self._board: BoardView | None = None  # read by SharedTableGenerations only

    @classmethod
    def with_unknown_history(cls) -> TableGenerations:
        """Generations that no stamp from a previous run can match (state lost or untrusted)."""
        return cls(global_epoch=secrets.randbits(62))

    def set_listener(self, on_change: Callable[[], None] | None) -> None:
        """Called after every change that must be persisted (bumps, a newly seen database)."""
        self._on_change = on_change

    def observe(self, observer: Callable[[tuple[Any, ...]], None] | None) -> None:
        """Told every bump, as data (an invalidation plane shares them with other nodes):
        ("t", database, names), ("e", names) in every database, ("d", database), ("g",)."""
        self._observer = observer

    def _changed(self, bump: tuple[Any, ...] | None = None) -> None:
        listener = self._on_change
        if listener is not None:
            listener()
        observer = self._observer
        if observer is not None and bump is not None:
            observer(bump)

    def share(self, board: BoardView, *, forget: bool = True) -> None:
        """From now on, a table's generation also counts what sibling workers bumped it by
        (cache/siblings.py): their writes make this process's entries stale at once. Entries
        stamped before are forgotten (`forget`): their numbers did not count the siblings.

        The store made these generations before anyone knew of the board; the class changes in
        place (same slots) so the one-process hit check stays the plain method, no test added."""
        with self._lock:
            self._board = board
            if forget:
                self._global += 1
        self.__class__ = SharedTableGenerations

    # -- hot path -------------------------------------------------------------------------

    def _database_epoch(self, database: str) -> int:
        db_epoch = self._databases.get(database)
        if db_epoch is None:
            # Remember the database so a cross-database purge_tables can reach its tables.
            with self._lock:
                db_epoch = self._databases.setdefault(database, 0)
            self._changed()
        return db_epoch

    def stamp(self, database: str, tables: Iterable[str]) -> GenerationStamp:
        db_epoch = self._database_epoch(database)
        gens = self._tables
        pairs = tuple([(t, gens.get((database, t), 0)) for t in _in_order(tables)])
        return GenerationStamp(database, self._global, db_epoch, pairs)

    def is_current(self, stamp: GenerationStamp) -> bool:
        if stamp.global_epoch != self._global:
            return False
        if stamp.database_epoch != self._databases.get(stamp.database, 0):
            return False
        gens = self._tables
        db = stamp.database
        # A loop, not all() over a generator: this runs for every hit (a frame saved).
        for t, g in stamp.tables:  # noqa: SIM110
            if gens.get((db, t), 0) != g:
                return False
        return True

    # -- writes (rare) -------------------------------------------------------------------

    def bump_tables(self, database: str, tables: Iterable[str]) -> None:
        # Every write bumps (twice: when sent and when committed): no call or tuple for a
        # listener or observer that is not there.
        names = frozenset(tables)
        gens = self._tables
        with self._lock:
            if database not in self._databases:
                self._databases[database] = 0
            for t in names:
                key = (database, t)
                gens[key] = gens.get(key, 0) + 1
        if self._on_change is not None or self._observer is not None:
            self._changed(("t", database, names))

    def bump_tables_everywhere(self, tables: Iterable[str]) -> None:
        """Bump these tables in every database ever stamped (admin purge by table name)."""
        names = set(tables)
        with self._lock:
            for db in self._databases:
                for t in names:
                    key = (db, t)
                    self._tables[key] = self._tables.get(key, 0) + 1
        self._changed(("e", names))

    def bump_database(self, database: str) -> None:
        with self._lock:
            self._databases[database] = self._databases.get(database, 0) + 1
        self._changed(("d", database))

    def bump_all(self) -> None:
        with self._lock:
            self._global += 1
        self._changed(("g",))

    # -- persistence ---------------------------------------------------------------------

    def copy(self) -> TableGenerations:
        """A detached snapshot, e.g. to judge which entries were live just before a purge."""
        return TableGenerations.from_state(self.to_state())

    def to_state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "version": STATE_VERSION,
                "global": self._global,
                "databases": dict(self._databases),
                "tables": [[db, t, g] for (db, t), g in self._tables.items()],
            }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TableGenerations:
        """Inverse of `to_state`; raises ValueError when the state is not one we wrote."""
        try:
            if state["version"] != STATE_VERSION:
                raise ValueError(f"unsupported generations version {state['version']!r}")
            gens = cls(global_epoch=int(state["global"]))
            gens._databases = {str(db): int(e) for db, e in dict(state["databases"]).items()}
            gens._tables = {(str(db), str(t)): int(g) for db, t, g in state["tables"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed generations state: {exc}") from exc
        return gens


class SharedTableGenerations(TableGenerations):
    """Generations of a worker sharing a sibling board: a table's number is this process's
    own count plus the siblings' (`BoardView.sibling_part`). Both only grow, so a stamp's
    number matches again only if nobody bumped the table since."""

    __slots__ = ()

    def stamp(self, database: str, tables: Iterable[str]) -> GenerationStamp:
        db_epoch = self._database_epoch(database)
        gens, board = self._tables, self._board
        assert board is not None
        sibling = board.sibling_part
        pairs = tuple([(t, gens.get((database, t), 0) + sibling((database, t))) for t in _in_order(tables)])
        return GenerationStamp(database, self._global, db_epoch, pairs)

    def is_current(self, stamp: GenerationStamp) -> bool:
        if stamp.global_epoch != self._global:
            return False
        if stamp.database_epoch != self._databases.get(stamp.database, 0):
            return False
        gens, board = self._tables, self._board
        assert board is not None
        slot_of, counters, others = board.slot_of, board.counters, board.others
        db = stamp.database
        for t, g in stamp.tables:
            key = (db, t)
            slot = slot_of.get(key)
            if slot is None:
                slot = board.slot(key)
            n = gens.get(key, 0)
            for row in others:
                n += counters[row + slot]
            if n != g:
                return False
        return True

    def copy(self) -> TableGenerations:
        """A detached snapshot, siblings' counters included."""
        snapshot = TableGenerations.from_state(self.to_state())
        assert self._board is not None
        snapshot.share(self._board.frozen(), forget=False)
        return snapshot

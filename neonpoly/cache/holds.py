"""Holds of prepared transactions (two-phase commit): what a PREPARE TRANSACTION seen by
neonpoly wrote is not stored until a COMMIT or ROLLBACK PREPARED of its gid passes through
neonpoly (QueryCache.two_phase), because that COMMIT PREPARED may be run straight on the
origin, where no eviction follows it.

Two keepers, one contract: `LocalHolds`, in this process's memory (one neonpoly process),
and `BoardHolds` (cache/siblings.py), in the memory the workers of `serve --workers N`
share: a hold taken through one worker stops every worker storing what it wrote, and a
release through any worker ends it in all of them.
"""

from __future__ import annotations

from typing import Protocol

HoldKey = tuple[str, str]  # (the cache it was prepared through, gid): one gid per server
UNREADABLE = "\0unreadable"  # the gid of a text that may prepare, read by no parser (policy._unreadable)


class PreparedHolds(Protocol):
    """Where the holds of the caches in front of one origin live."""

    def __bool__(self) -> bool:
        """Any hold at all: the one test every store pays while none is held."""
        ...

    def hold(self, key: HoldKey, database: str, reach: frozenset[str] | None) -> None:
        """`key`'s transaction wrote `reach` in `database` (None: anything, in any database).
        Added to the key's hold, never replacing it: a failed PREPARE may reuse a prepared gid."""
        ...

    def taken(self) -> int:
        """How many holds were taken so far: read when a COMMIT or ROLLBACK PREPARED is sent,
        it tells its `release` which holds came after it (one aligned load, no lock)."""
        ...

    def release(self, key: HoldKey, before: int | None = None) -> None:
        """Its COMMIT or ROLLBACK PREPARED went through neonpoly (which evicted). Not when the
        key was held again after `before` (`taken()` when it was sent): its gid was free at
        the origin from the moment that ran, and another transaction prepared under it while
        its batch went on (a next statement waiting on a lock); that one's hold stays."""
        ...

    def holding(self, database: str, tables: frozenset[str]) -> str | None:
        """Why an answer reading `tables` in `database` must not be stored (None: it may be)."""
        ...

    def entries(self) -> list[tuple[HoldKey, str, frozenset[str] | None]]:
        """The holds, to move them to another keeper."""
        ...


def held_reason(gid: str) -> str:
    """The reason a held read's statistics show (SHOW QUERIES, the console): the user sees
    which prepared transaction keeps it from being stored, and what ends that."""
    if UNREADABLE in gid:  # (or a legacy-strings session's: "\0" + UNREADABLE)
        what = "a transaction prepared by a text neonpoly could not read"
        until = "neonpoly restarts"
    elif gid.startswith("\0"):
        what = f"prepared transaction {gid.lstrip(chr(0))!r} (its gid spelt in a way neonpoly cannot read exactly)"
        until = "neonpoly restarts"
    else:
        what = f"prepared transaction {gid!r}"
        until = "its COMMIT or ROLLBACK PREPARED passes through neonpoly"
    return f"not stored: {what} wrote what it reads; held until {until}"


class LocalHolds:
    """Holds in this process's memory: a neonpoly that shares no board."""

    __slots__ = ("_held", "_taken")

    def __init__(self) -> None:
        # key -> (database, reach, the order of its last hold: `taken()` right after it)
        self._held: dict[HoldKey, tuple[str, frozenset[str] | None, int]] = {}
        self._taken = 0

    def __bool__(self) -> bool:
        return bool(self._held)

    def taken(self) -> int:
        return self._taken

    def hold(self, key: HoldKey, database: str, reach: frozenset[str] | None) -> None:
        self._taken += 1
        held = self._held.get(key)
        if held is None:
            self._held[key] = (database, reach, self._taken)
        elif held[1] is not None and reach is not None and held[0] == database:
            self._held[key] = (database, held[1] | reach, self._taken)
        else:  # all of one database, or two databases: hold everything
            self._held[key] = (database, None, self._taken)

    def release(self, key: HoldKey, before: int | None = None) -> None:
        held = self._held.get(key)
        if held is not None and (before is None or held[2] <= before):
            del self._held[key]

    def holding(self, database: str, tables: frozenset[str]) -> str | None:
        # One that wrote anything holds every database: code may reach them all.
        for key, (held, reach, _) in self._held.items():
            if reach is None or (held == database and not reach.isdisjoint(tables)):
                return held_reason(key[1])
        return None

    def entries(self) -> list[tuple[HoldKey, str, frozenset[str] | None]]:
        return [(key, database, reach) for key, (database, reach, _) in self._held.items()]

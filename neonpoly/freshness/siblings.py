"""What sharing table generations in memory (cache/siblings.py) changes for one node of the
plane (plane.py, "Siblings"): its caches read the board, its table bumps go into it at once,
a write waits for no sibling's acknowledgement, and a sibling's table bumps read from Redis
are not applied again. Logic only; redis_plane.py calls it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from neonpoly.freshness.plane import Bump, generations

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.cache.siblings import SiblingBoard


class SiblingNodes:
    """The nodes that share this node's memory, and what that spares. `only`: every node of
    the plane is one of them (the workers' private redis-server), so table bumps are not
    published at all."""

    def __init__(self, board: SiblingBoard, only: bool, node: str) -> None:
        self.board = board
        self.only = only
        self.node = node
        self.named = False  # the board names this node (its siblings spare its acknowledgements)
        self.spared = 0  # acknowledgements not waited for
        self.unpublished = 0  # table bumps that went through the board alone

    def holds_name(self) -> None:
        """Redis registered this node under its name: only now does the board name it. A
        process refused as the twin of another host's node must never be taken for it: its
        siblings would drop that node's table bumps and stop waiting for its acknowledgements.
        (Every cache of this node reads the board from its attach on, before this.)"""
        if not self.named:
            self.board.join(self.node)
            self.named = True

    def lost_name(self) -> None:
        """Redis is out of reach or another process holds this node's name: the board names it
        again once a round registers it (meanwhile its siblings wait for it, as for any node)."""
        if self.named:
            self.board.leave()
            self.named = False

    def share(self, cache: QueryCache, origin: str) -> None:
        """Before the cache can serve a hit (its gate is not proven yet): its generations, and
        the holds of prepared transactions (a hold taken through one worker keeps every
        worker from storing what it wrote; released through any, it ends in all)."""
        generations(cache).share(self.board.view(origin))
        cache.share_holds(self.board.holds(origin))

    def names(self) -> frozenset[str]:
        """The other nodes on the board, read again each time (a row may stop naming one)."""
        return self.board.siblings()

    def carried(self, origin: str, op: tuple[Any, ...]) -> bool:
        """Put a local bump into shared memory, before the write goes to the origin and
        whatever becomes of Redis; True when it need not be published too."""
        if op[0] != "t":
            return False  # database-wide, global, purges: the receivers learn their catalog again
        self.board.view(origin).bump(op[1], op[2])
        if self.only:
            self.unpublished += 1
        return self.only

    def received(self, bump: Bump, node: str | None) -> Bump:
        """An entry from `node`: less its table names when it is a sibling (the board carried them)."""
        if bump.tables and node in self.names():
            return bump.without_tables()
        return bump

    def figures(self) -> tuple[tuple[str, ...], int, int]:
        """For PlaneStatus: the siblings, acknowledgements spared, bumps not published."""
        return tuple(sorted(self.names())), self.spared, self.unpublished

    def waited_for(self, bump: Bump, live: Sequence[str]) -> list[str]:
        """Whose acknowledgement a published bump waits for: not a sibling's, for table names."""
        if not bump.tables_only:
            return list(live)
        names = self.names()
        kept = [n for n in live if n not in names]
        self.spared += len(live) - len(kept)
        return kept

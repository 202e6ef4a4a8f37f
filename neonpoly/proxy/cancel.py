"""Cancels that wait for neonpoly's own lookup to end.

On a direct connection a CancelRequest stops the statement the client sent. Behind neonpoly
the origin may be running neonpoly's own catalog or identity lookup at that moment, ahead of
the client's statement (which may even be held until the identity is in): a signal sent
then would cancel the lookup, and the client's statement would run on. So the signal is
held here until the request at the head of the session's queue is the client's own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from neonpoly.proxy.pending import Pending


class CancelGate:
    def __init__(self, pending: deque[Pending]) -> None:
        self._pending = pending  # the session's queue: its head is what the origin runs now
        self._waiting: list[Callable[[], None]] = []  # each signals the origin once

    def __len__(self) -> int:
        return len(self._waiting)

    def hold(self, fire: Callable[[], None]) -> None:
        self._waiting.append(fire)

    def release(self, *, closed: bool) -> None:
        """Signal the origin for every held cancel, unless a lookup of neonpoly's own runs
        there now (called again when it ends); a closed session lets them all go."""
        head = self._pending[0] if self._pending else None
        if self._waiting and (closed or head is None or (head.lookup is None and head.identity is None)):
            fires, self._waiting = self._waiting, []
            for fire in fires:
                fire()

"""What every layer of a session shares: its connections, route and state, the queue of
requests the origin still has to answer, and the two ways out (to the client, to the origin).

See session.py for the layers built on it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from typing import TYPE_CHECKING

from neonpoly.proxy.cancel import CancelGate
from neonpoly.proxy.extended import StatementBook
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.state import STARTUP, Phase, SessionState

if TYPE_CHECKING:
    from neonpoly.proxy.routes import Route


class SessionCore:
    """The bottom layer of a Session: its shared state and the ways out."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.origin_transport: asyncio.Transport | None = None
        self.route: Route | None = None
        self.state = SessionState()
        self.phase: Phase = STARTUP
        self.cbuf = bytearray()  # client bytes not consumed yet (held while the identity is asked)
        self.obuf = bytearray()  # origin bytes not consumed yet (an incomplete frame)
        # Every request the origin still has to answer, in order, with the cache's answers
        # that wait their turn behind them (see pending.py).
        self.pending: deque[Pending] = deque()
        # Requests sent with no `Pending` awaiting ReadyForQuery: all of them without a cache
        # (relay.py); with one, a bypassed read passed from its memo, while nothing else is
        # outstanding (a simple Query: passes.py; a lone batch: batches.py `_pass_lone`).
        self.inflight = 0
        self.stream: Pending | None = None  # a batch forwarded before its Sync (Flush, COPY)
        self.batch_open = False  # extended messages forwarded with no Sync yet (a Flush)
        # Extended messages forwarded with no Sync since (a Flush, a stream), even when a simple
        # Query ended their transaction: after an error the origin skips everything to the Sync.
        self.unsynced = False
        self.book = StatementBook()  # the session's prepared statements (DEALLOCATE reaches them too)
        self.cancels = CancelGate(self.pending)
        # The key the client sees for cancels: the origin's real backend PID (so that
        # pg_terminate_backend, pg_stat_activity and NOTIFY agree with it) and a secret of
        # neonpoly's own, which routes a CancelRequest to this session's origin.
        self.proxy_key = (secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4))
        self.origin_key: tuple[int, bytes] | None = None
        self.bytes_out = 0
        self.outcome = "closed"  # how the session ended, for the log line
        self.closed = False
        # While a write's reply waits for the invalidation plane (other nodes applying its
        # bumps), what goes to the client is kept here, in order, and the holds not done.
        self.held: list[bytes] | None = None
        self.holds: set[asyncio.Future[None]] = set()

    def write_client(self, data: bytes) -> None:
        """Everything the client receives goes out here (the admin console's answers too)."""
        if data and not self.closed:
            if self.held is not None:
                self.held.append(data)
                return
            self.bytes_out += len(data)
            self.client.write(data)

    def hold_client(self, until: asyncio.Future[None]) -> None:
        """Keep what the client is sent from now on until `until` is done (and any earlier
        hold); then send it all, in order."""
        if until.done() and not self.holds:
            return
        if self.held is None:
            self.held = []
        self.holds.add(until)
        until.add_done_callback(self._hold_done)

    def _hold_done(self, until: asyncio.Future[None]) -> None:
        self.holds.discard(until)
        if self.holds or self.held is None:
            return
        data, self.held = b"".join(self.held), None
        self.write_client(data)

    def _write_origin(self, out: list[bytes]) -> None:
        if out and self.origin_transport is not None:
            self.origin_transport.write(b"".join(out))

    def close(self) -> None:
        """End the session (Session.close: both connections, the host, the log line)."""
        raise NotImplementedError

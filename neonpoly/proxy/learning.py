"""What a session learns about itself from the origin, in its own idle moments.

Cached answers are keyed by who the session is (identity.py: its roles, settings, search
path) and judged by what the catalog says about the relations a query reads
(cache/relations.py). Both are asked with an extended-protocol request of neonpoly's own in
the client's session, only where nothing is outstanding and no transaction or batch is open
there, so nothing of the client's is disturbed; the answers are read here, never forwarded.

While the identity is asked (one round trip, after login and after anything that changed
the session) client requests wait in `cbuf`, unless a cancel released them
(Session.when_cancellable).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from neonpoly import pgwire
from neonpoly.cache import relation_lookup
from neonpoly.pgwire import MSG_DATA_ROW, MSG_ERROR_RESPONSE, MSG_READY_FOR_QUERY, TX_IDLE
from neonpoly.proxy import identity
from neonpoly.proxy.core import SessionCore
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.state import READY

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache


class IdentityLearning(SessionCore):
    def __init__(self, client: asyncio.Transport) -> None:
        super().__init__(client)
        self.identity_inflight = False  # client requests wait until the identity is in
        self.hold_released = False  # a cancel came: requests no longer wait for the identity
        self.identity_epoch = 0  # the cache's DDL epoch when the identity was asked
        self.identity_changes = 0  # bumped by every _forget_identity
        self.identity_asked_at = 0  # identity_changes when the lookup in flight was sent
        self.relations_wanted: set[str] = set()  # read while they could not be looked up

    def _learn_when_idle(self) -> None:
        """At a point where nothing is outstanding at the origin and no transaction is open,
        ask what the session needs to know: its identity, relations read when they could not
        be looked up. Client requests wait for the identity (one round trip, after login and
        after anything that changed the session)."""
        if not self.relations_wanted and (self.state.identity is not None or self.identity_inflight):
            return  # nothing to ask: the common case, after every response
        cache = self.route.cache if self.route else None
        if (
            cache is None
            or self.closed
            or self.phase is not READY
            or self.pending
            or self.inflight  # a read passed from its memo (passes.py): its answer comes first
            or not self._at_boundary()
            or self.state.bypass is not None
        ):
            return
        out: list[bytes] = []
        if self.relations_wanted:
            names = cache.relations.unknown(self.state.database, self.relations_wanted)
            self.relations_wanted = set()
            if names or not cache.relations.knows_shadows(self.state.database):
                self._ask_relations(cache, names, out)
        if self.state.identity is None and not self.identity_inflight:
            self.identity_inflight = True
            settings = frozenset(cache.settings_read)
            self.identity_epoch = cache.ddl_epoch
            self.identity_asked_at = self.identity_changes
            self.pending.append(Pending(time.monotonic(), neutral=True, identity=settings))
            out.append(identity.request(settings))
        self._write_origin(out)

    def _ask_relations(self, cache: QueryCache, names: list[str], out: list[bytes]) -> None:
        """Ask the origin about relations (and, once per database, about the objects that
        shadow builtins) in this idle session, ahead of the request that needs the answer."""
        database = self.state.database
        with_shadows = not cache.relations.knows_shadows(database) or not cache.relations.knows_code_types(database)
        if not names and not with_shadows:
            return
        self.pending.append(Pending(time.monotonic(), neutral=True, lookup=names))
        out.append(
            pgwire.extended_request(
                identity.LOOKUP_STATEMENT,
                relation_lookup.LOOKUP_SQL,
                relation_lookup.lookup_params(names, with_shadows),
            )
        )

    def _at_boundary(self) -> bool:
        """No transaction and no extended batch open at the origin: neonpoly's own Parse/Bind/
        Sync would end the client's implicit transaction and replace its unnamed portal, or
        (`unsynced`) end what the origin skips after an error up to the client's Sync."""
        return self.state.tx_status == TX_IDLE and not self.batch_open and self.stream is None and not self.unsynced

    def _forget_identity(self) -> None:
        """Something may have changed who the session is: stop caching until the server says."""
        self.state.learned(None)
        self.identity_changes += 1  # an answer to a lookup asked before this is out of date

    def _parameter(self, body: bytes) -> None:
        """A ParameterStatus: a reported setting that changed changes who the session is."""
        if self.state.parameter(*pgwire.parse_parameter_status(body)):
            self._forget_identity()

    def _lookup_frame(self, item: Pending, mtype: int, body: bytes) -> None:
        """One frame of neonpoly's own catalog lookups: read, never forwarded."""
        cache = self.route.cache if self.route else None
        if mtype == MSG_DATA_ROW:
            item.rows.append(pgwire.parse_data_row(body))
        elif mtype == MSG_ERROR_RESPONSE:
            item.error = True
        elif mtype == MSG_READY_FOR_QUERY:
            self.pending.popleft()
            if item.identity is not None:
                self.identity_inflight = False
                self.hold_released = False
                current = self.identity_asked_at == self.identity_changes  # nothing changed it since
                if current and not item.error and item.rows and self.state.tx_status == TX_IDLE:
                    private = self.proxy_key[1] + (self.origin_key[1] if self.origin_key else b"")
                    self.state.learned(identity.parse(item.rows[0], private, item.identity, self.identity_epoch))
                else:
                    self.state.learned(None)
            elif cache is not None and item.lookup is not None:
                if item.error:
                    cache.relations.refuse(self.state.database, item.lookup)
                else:
                    cache.relations.learn(self.state.database, item.lookup, [_lookup_row(r) for r in item.rows])
            self.cancels.release(closed=self.closed)


def _lookup_row(row: list[bytes | None]) -> tuple[str, str, str, bool, str | None]:
    kind, root, relname, flag, definition = (row + [None] * 5)[:5]
    # "replace": a name the server sends in another encoding must not end the session.
    return (
        (kind or b"").decode(),
        (root or b"").decode("utf-8", "replace"),
        (relname or b"").decode("utf-8", "replace"),
        flag == b"true",
        None if definition is None else definition.decode("utf-8", "replace"),
    )

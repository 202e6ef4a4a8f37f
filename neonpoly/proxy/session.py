"""One client connection relayed to one origin connection.

Two asyncio Protocols (client side, origin side) share one `Session`. Bytes are forwarded
untouched and in one write per read; only the frames a decision needs are looked at:
startup and authentication, ReadyForQuery (transaction status), ParameterStatus, queries
(to classify them for the cache) and the responses of misses being captured.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neonpoly import pgwire
from neonpoly.cache import relations
from neonpoly.cache.capture import Capture, StatTicket
from neonpoly.cache.policy import Classification, Status, classify
from neonpoly.cache.relations import Resolution
from neonpoly.pgwire import (
    MSG_AUTHENTICATION_REQUEST,
    MSG_BACKEND_KEY_DATA,
    MSG_BIND,
    MSG_CLOSE,
    MSG_CLOSE_COMPLETE,
    MSG_COPY_BOTH_RESPONSE,
    MSG_COPY_IN_RESPONSE,
    MSG_COPY_OUT_RESPONSE,
    MSG_DATA_ROW,
    MSG_DESCRIBE,
    MSG_ERROR_RESPONSE,
    MSG_EXECUTE,
    MSG_FLUSH,
    MSG_FUNCTION_CALL,
    MSG_NOTICE_RESPONSE,
    MSG_NOTIFICATION_RESPONSE,
    MSG_PARAMETER_STATUS,
    MSG_PARSE,
    MSG_PARSE_COMPLETE,
    MSG_QUERY,
    MSG_READY_FOR_QUERY,
    MSG_SYNC,
    MSG_TERMINATE,
    TARGET_STATEMENT,
    TX_IDLE,
)
from neonpoly.proxy import identity
from neonpoly.proxy.extended import BatchPlan, StatementBook
from neonpoly.proxy.host import SessionHost
from neonpoly.proxy.origin import RELAY_SOCKET_BUFFER, OriginUnavailable, limit_socket_buffer, open_origin
from neonpoly.proxy.pending import Pending
from neonpoly.proxy.state import ADMIN, AUTH, CANCEL, CONNECTING, LOGGING_IN, READY, STARTUP, TLS, Phase, SessionState

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.proxy.routes import AdminHandler, Route

log = logging.getLogger("neonpoly.session")

# Notifications, notices, parameter changes: never replayed.
_NOT_PAYLOAD = frozenset((MSG_NOTIFICATION_RESPONSE, MSG_NOTICE_RESPONSE, MSG_PARAMETER_STATUS))
# Errors and COPY are never stored. A suspended portal ('s', asyncpg's fetchval sends a
# row limit of 1) is: outside a transaction its portal dies at Sync, so the same request
# always gets the same bytes, and the row limit is part of the key.
_FAILS_CAPTURE = frozenset((MSG_ERROR_RESPONSE, MSG_COPY_IN_RESPONSE, MSG_COPY_OUT_RESPONSE, MSG_COPY_BOTH_RESPONSE))
_EXTENDED = frozenset((MSG_PARSE, MSG_BIND, MSG_DESCRIBE, MSG_EXECUTE, MSG_CLOSE))
_ENDS_WITH_READY = frozenset((MSG_QUERY, MSG_SYNC, MSG_FUNCTION_CALL))  # requests answered up to ReadyForQuery
# Notifications and settings are the client's, even in the middle of neonpoly's own lookup.
_CLIENTS_DURING_LOOKUP = frozenset((MSG_NOTIFICATION_RESPONSE, MSG_PARAMETER_STATUS))
_SWALLOWED = frozenset((MSG_PARSE_COMPLETE, MSG_CLOSE_COMPLETE))  # answers to Parses/Closes sent for the client


def _expected_answers(batch: list[tuple[int, bytes]]) -> int | None:
    """How many messages the origin answers a Flush-ended batch with; None if unknowable.

    Parse, Bind and Close answer once; Describe of a statement twice (parameters, then row
    description or NoData), of a portal once. Execute streams rows, so it is not counted.
    """
    total = 0
    for mtype, body in batch:
        if mtype == MSG_EXECUTE:
            return None
        total += 2 if mtype == MSG_DESCRIBE and body[:1] == TARGET_STATEMENT else 1
    return total


class Session:
    """The relay and its state machine: startup → auth → ready → closed."""

    def __init__(self, server: SessionHost[Session], client: asyncio.Transport) -> None:
        self.server = server
        self.client = client
        self.origin_transport: asyncio.Transport | None = None
        self.route: Route | None = None
        self.state = SessionState()
        self.phase: Phase = STARTUP
        self.cbuf = bytearray()
        self.obuf = bytearray()
        self.early = bytearray()  # client bytes that arrived before the origin was connected
        self.pending: deque[Pending] = deque()
        self.batch: list[tuple[int, bytes]] = []
        self.batch_copies: dict[str, bool] = {}  # statements Parsed in the batch: do they COPY?
        self.batch_may_copy = False
        self.batch_bound: str | None = None  # the statement of the batch's latest Bind
        self.stream: Pending | None = None  # a batch forwarded before its Sync (Flush, COPY)
        self.book = StatementBook()
        self._plans: dict[tuple[object, ...], tuple[BatchPlan, bytes, bytes]] = {}
        self.tx_writes: set[str] = set()
        self.tx_writes_everything = False
        self.identity_inflight = False  # client requests wait until the identity is in
        self.batch_open = False  # extended messages forwarded with no Sync yet (a Flush)
        self.identity_epoch = 0  # the cache's DDL epoch when the identity was asked
        self.identity_changes = 0  # bumped by every _forget_identity
        self.identity_asked_at = 0  # identity_changes when the lookup in flight was sent
        self.hold_released = False  # a cancel came: requests no longer wait for the identity
        self.cancels: list[Callable[[], None]] = []  # waiting for neonpoly's own lookups to end
        self.relations_wanted: set[str] = set()  # read while they could not be looked up
        self.writing_cursors = False  # a cursor over a query that may write was declared
        # The key the client sees for cancels: the origin's real backend PID (so that
        # pg_terminate_backend, pg_stat_activity and NOTIFY agree with it) and a secret of
        # neonpoly's own, which routes a CancelRequest to this session's origin.
        self.proxy_key = (secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4))
        self.origin_key: tuple[int, bytes] | None = None
        peer = client.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.opened = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcome = "closed"
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None
        # Like PostgreSQL's authentication_timeout: a client that never finishes logging in
        # (or never starts) must not hold a session for ever.
        self.login_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            server.login_timeout, self._login_expired
        )
        self.admin: AdminHandler | None = None
        self.inflight = 0  # pass-through requests awaiting ReadyForQuery

    # --- client side ------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.cbuf += data
        try:
            phase = self.phase
            if phase is READY:
                if not self.identity_inflight or self.hold_released:
                    self._client_frames()
            elif phase is STARTUP:
                self._startup()
            elif phase is CONNECTING:
                return  # kept in cbuf until the origin is there
            elif phase is AUTH:
                self._relay_auth_from_client()
            elif phase is ADMIN and self.admin is not None:
                self.admin.feed(self.cbuf)
        except pgwire.ProtocolViolation as exc:
            self.fail_client("08P01", f"invalid frontend message: {exc}", "protocol violation")

    def _startup(self) -> None:
        while self.phase is STARTUP:
            packet, used = pgwire.parse_startup(self.cbuf)
            if packet is None:
                return
            del self.cbuf[:used]
            if packet.is_ssl:
                self._answer_ssl()
                return  # anything after SSLRequest waits for the TLS handshake
            if packet.is_gssenc:
                self.client.write(pgwire.SSL_NO)
                continue
            if packet.is_cancel:
                assert packet.cancel_key is not None
                self.outcome = "cancel request"
                self.phase = CANCEL
                self._stop_login_timer()
                self.server.cancel(*packet.cancel_key, done=self.close)
                return
            self._begin(packet)

    def _answer_ssl(self) -> None:
        ctx = self.server.tls_context
        if ctx is None or self.client.get_extra_info("sslcontext") is not None:
            self.client.write(pgwire.SSL_NO)
            return
        self.client.write(pgwire.SSL_YES)
        self.phase = TLS
        self.client.pause_reading()
        asyncio.get_running_loop().create_task(self._upgrade_client(ctx))

    async def _upgrade_client(self, ctx: object) -> None:
        import ssl

        assert isinstance(ctx, ssl.SSLContext)
        loop = asyncio.get_running_loop()
        protocol = self.client.get_protocol()
        try:
            tls = await loop.start_tls(self.client, protocol, ctx, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.outcome = f"tls handshake failed: {exc}"
            self.close()
            return
        if tls is None:
            self.close()
            return
        self.client = tls
        self.phase = STARTUP
        if self.cbuf:
            self.client_data(b"")

    def _begin(self, packet: pgwire.StartupRequest) -> None:
        params = packet.params
        self.state.user = params.get("user", "")
        self.state.database = params.get("database", self.state.user)
        self.state.application_name = params.get("application_name", "")
        self.state.apply_startup(params)
        route, refusal = self.server.route_for(self.state)
        if route is None:
            self.fail_client("3D000", refusal or "no such cache", "refused: unknown cache", fatal=True)
            return
        self.route = route
        if route.admin is not None:
            self.phase = ADMIN
            self._stop_login_timer()
            self.admin = route.admin.attach(self, packet)
            if self.cbuf:
                self.admin.feed(self.cbuf)
            return
        self.phase = CONNECTING
        self.connect_task = asyncio.get_running_loop().create_task(self._connect(packet.raw))

    async def _connect(self, startup: bytes) -> None:
        assert self.route is not None
        try:
            transport = await open_origin(self.route.origin, OriginSide(self), self.server.connect_timeout)
        except OriginUnavailable as exc:
            self.fail_client("08001", str(exc), "origin unreachable", fatal=True)
            return
        if self.closed:
            transport.close()
            return
        self.origin_transport = transport
        transport.write(startup)
        self.phase = AUTH
        if self.cbuf:
            self._relay_auth_from_client()

    def _relay_auth_from_client(self) -> None:
        # Password, SASL and GSS responses ('p') pass straight through.
        frames, used = pgwire.scan_frames(self.cbuf, allowed=pgwire.FRONTEND_TYPES, large=pgwire.FRONTEND_LARGE_TYPES)
        if used and self.origin_transport is not None:
            self.origin_transport.write(bytes(self.cbuf[:used]))
            del self.cbuf[:used]
        if any(t == MSG_TERMINATE for t, _, _ in frames):
            self.outcome = "client terminated during auth"
            self.close()

    def _client_frames(self) -> None:
        frames, used = pgwire.scan_frames(self.cbuf, allowed=pgwire.FRONTEND_TYPES, large=pgwire.FRONTEND_LARGE_TYPES)
        if not frames:
            return
        buf = bytes(self.cbuf[:used])
        del self.cbuf[:used]
        if self.route is not None and self.route.cache is None:
            self._relay_frames(frames, buf)
            return
        out: list[bytes] = []
        for mtype, start, end in frames:
            if self.stream is not None and mtype != MSG_SYNC and mtype != MSG_FLUSH:
                self._stream_frame(mtype, buf[start + 5 : end], buf[start:end], out)
            elif mtype in _EXTENDED:
                body = buf[start + 5 : end]
                self.batch.append((mtype, body))
                if self._runs_copy(mtype, body):
                    self._open_stream(out)
            elif mtype == MSG_SYNC:
                self._sync(buf[start:end], out)
            elif mtype == MSG_FLUSH:  # the client wants answers before Sync
                expect = _expected_answers(self.batch)
                if self.stream is not None or expect is None:
                    if self.stream is None and self.batch:
                        self._open_stream(out)
                    out.append(buf[start:end])
                elif self.batch:
                    self._sync(buf[start:end], out, expect=expect)
                else:
                    out.append(buf[start:end])
            elif mtype == MSG_QUERY:
                self._query(buf[start + 5 : end], buf[start:end], out)
            elif mtype == MSG_TERMINATE:
                out.append(buf[start:end])
                self.outcome = "client terminated"
                self._write_origin(out)
                self.close()
                return
            else:  # CopyData/Done/Fail, FunctionCall: straight through
                if mtype == MSG_FUNCTION_CALL:  # it runs a function by OID: anything may happen
                    self._push(Pending(time.monotonic(), writes_everything=True))
                    self._invalidate(frozenset(), everything=True)
                    self._forget_identity()
                out.append(buf[start:end])
        if self.batch and self.stream is None:
            # The client sent no Sync (or Flush) with what it has sent so far. PostgreSQL runs
            # each message as it arrives, and a pipeline may wait for their answers before it
            # ever syncs: forward them now (such a batch is not cached).
            self._open_stream(out)
        self._write_origin(out)

    def _runs_copy(self, mtype: int, body: bytes) -> bool:
        """Does this Execute run COPY? A client running COPY through the extended protocol
        waits for CopyInResponse before it sends Sync, so the batch must stream at once.
        Tracked message by message (a 50,000-row pipelined executemany is one batch)."""
        if mtype == MSG_PARSE:
            parse = pgwire.parse_parse(body)
            copy = classify(parse.query).copy
            self.batch_copies[parse.name] = copy
            self.batch_may_copy = self.batch_may_copy or copy
        elif mtype == MSG_BIND and (self.batch_may_copy or self.book.copies):
            self.batch_bound = pgwire.parse_bind(body).statement
        elif mtype == MSG_EXECUTE and self.batch_bound is not None:
            name = self.batch_bound
            if name in self.batch_copies:
                return self.batch_copies[name]
            return name in self.book.copies
        return False

    def _take_batch(self) -> list[tuple[int, bytes]]:
        batch, self.batch = self.batch, []
        self.batch_copies.clear()
        self.batch_may_copy = False
        self.batch_bound = None
        return batch

    def _relay_frames(self, frames: list[tuple[int, int, int]], buf: bytes) -> None:
        """Pass-through (no cache): nothing to decide, so no parsing and one write.

        Only count the requests that end in ReadyForQuery, so that a lost origin or a
        shutdown knows whether a client is waiting for an answer.
        """
        for mtype, _, _ in frames:
            if mtype in _ENDS_WITH_READY:
                self.inflight += 1
            elif mtype == MSG_TERMINATE:
                self.outcome = "client terminated"
                if self.origin_transport is not None:
                    self.origin_transport.write(buf)
                self.close()
                return
        if self.origin_transport is not None:
            self.origin_transport.write(buf)

    def _write_origin(self, out: list[bytes]) -> None:
        if out and self.origin_transport is not None:
            self.origin_transport.write(b"".join(out))

    def _push(self, item: Pending) -> None:
        self.pending.append(item)

    # --- simple query -----------------------------------------------------------------

    def _query(self, body: bytes, raw: bytes, out: list[bytes]) -> None:
        sql = pgwire.query_text(body)
        info = classify(sql)
        item = Pending(time.monotonic())
        if info.deallocates is not None:
            self.book.deallocated(info.deallocates)
        self._note_effects(info, item, out)
        refusal = None if info.cacheable else (info.status or Status.UNCACHEABLE, info.reason)
        decision = self._cache_decision(
            refusal, info.template_id, info.tables_read, info.shadowable, item, out, info.settings_read
        )
        status = decision.status
        cache = self.route.cache if self.route else None
        if status is Status.MISS and cache is not None:
            key = cache.key(self.state.context(), b"Q" + body)  # key material tags: see _sync
            payload = cache.lookup(key)
            if payload is not None and not self._busy():
                self._answer_locally(payload, [info], item)
                return
            item.capture = self._capture(cache, key, decision.resolution, info.template_id)
        # Not neutral while the catalog has not described what it reads: it may run code.
        item.neutral = status is Status.MISS and not (item.reads or item.trusts)
        item.stats.append(
            StatTicket(info.template_id, info.template, info.qualified_tables, str(status), decision.reason)
        )
        self._push(item)
        out.append(raw)
        self.batch_open = False

    def _capture(
        self, cache: QueryCache, key: bytes, resolution: Resolution | None, template_id: str
    ) -> Capture | None:
        """Count a sighting of a miss and, once admitted, prepare to store it, tagged with
        every table it really reads. Nothing is stored while the catalog has not answered
        (the lookup is on its way; with the default admission the answer is in before it
        matters)."""
        admitted = cache.admit(key)
        if resolution is None or not admitted:
            return None
        database = self.state.database
        return Capture(key, database, resolution.tags, template_id, cache.stamp(database, resolution.tags))

    def _ask_relations(self, cache: QueryCache, names: list[str], out: list[bytes]) -> None:
        """Ask the origin about relations (and, once per database, about the objects that
        shadow builtins) in this idle session, ahead of the request that needs the answer."""
        with_shadows = not cache.relations.knows_shadows(self.state.database)
        if not names and not with_shadows:
            return
        self._push(Pending(time.monotonic(), neutral=True, lookup=names))
        out.append(
            pgwire.extended_request(
                identity.LOOKUP_STATEMENT, relations.LOOKUP_SQL, relations.lookup_params(names, with_shadows)
            )
        )

    def _learn_when_idle(self) -> None:
        """At a point where nothing is outstanding at the origin and no transaction is open,
        ask what the session needs to know: its identity, relations read when they could not
        be looked up. Client requests wait for the identity (one round trip, after login and
        after anything that changed the session)."""
        cache = self.route.cache if self.route else None
        if (
            cache is None
            or self.closed
            or self.phase is not READY
            or self.pending
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
            self._push(Pending(time.monotonic(), neutral=True, identity=settings))
            out.append(identity.request(settings))
        self._write_origin(out)

    def _at_boundary(self) -> bool:
        """No transaction and no extended batch open at the origin: neonpoly's own Parse/Bind/
        Sync would end the client's implicit transaction and replace its unnamed portal."""
        return self.state.tx_status == TX_IDLE and not self.batch_open and self.stream is None

    def _forget_identity(self) -> None:
        """Something may have changed who the session is: stop caching until the server says."""
        self.state.learned(None)
        self.identity_changes += 1  # an answer to a lookup asked before this is out of date

    def _busy(self) -> bool:
        """Could an outstanding origin answer change the transaction status or settings?

        A local answer queued behind plain reads is safe (it waits its turn, and the status
        cannot change); behind anything else it is not, so the request goes to the origin.
        Nor behind a batch ended by Flush: if it fails, the origin skips everything up to
        the next Sync, and only the origin can answer that Sync.
        """
        return any(p.local is None and (p.flush or not p.neutral) for p in self.pending)

    def _cache_decision(
        self,
        refusal: tuple[Status, str] | None,
        template_id: str,
        tables: frozenset[str],
        shadowable: frozenset[str],
        item: Pending,
        out: list[bytes] | None,
        settings: frozenset[str] = frozenset(),
    ) -> Decision:
        """The status of a request and why, after what the catalog says about what it reads
        and calls.

        Reading a relation whose definition or policies run code of the user's is like calling
        that code: it may write or change the session. When the catalog has not answered yet,
        the question goes out ahead of the request (if the session is idle) and the request is
        judged again when it completes."""
        cache = self.route.cache if self.route else None
        if cache is None:
            return Decision(Status.DISABLED, "caching is off for this connection string")
        resolution: Resolution | None = _NOTHING_TO_RESOLVE
        known = self.state.identity
        if known is not None and known.epoch != cache.ddl_epoch:
            self._forget_identity()  # DDL somewhere (a schema on its path, a grant) may change it
            known = None
        if tables or shadowable:
            schemas = known.schemas if known is not None else None
            resolution = cache.relations.resolve(self.state.database, tables, shadowable, schemas)
            if resolution is None:
                idle = self._at_boundary() and not self._busy() and self.state.bypass is None
                if idle and out is not None:
                    self._ask_relations(cache, cache.relations.unknown(self.state.database, tables), out)
                item.reads, item.trusts = tables, shadowable
            elif resolution.runs_code is not None:
                self._runs_code(item)
                return Decision(Status.VOLATILE, resolution.runs_code)
        if refusal is not None:
            return Decision(refusal[0], refusal[1], resolution)
        if resolution is not None and resolution.volatile is not None:
            return Decision(Status.VOLATILE, resolution.volatile)
        if cache.ttl_for(template_id, tables) is None:
            return Decision(Status.DISABLED, "a rule says never, or the cache's mode is off")
        if self.state.bypass is not None:
            return Decision(Status.BYPASS, f"{self.state.bypass} is never cached")
        if self.state.legacy_strings:
            return Decision(Status.BYPASS, "standard_conforming_strings is off: text not read as the server reads it")
        if self.state.tx_status != TX_IDLE:
            return Decision(Status.TRANSACTION, "inside a transaction block")
        if self._busy():
            return Decision(Status.TRANSACTION, "behind a pipelined request that may change the transaction")
        if known is None:
            return Decision(Status.BYPASS, "the session changed (SET, DDL, server code): asking who it is now")
        needed = settings
        if resolution is not None and resolution.settings:
            needed = needed | resolution.settings
        if needed and not needed <= known.settings:
            # Settings the identity does not carry yet (custom ones are not in pg_settings):
            # from now on every session's identity carries them.
            if cache.want_settings(needed):
                self._forget_identity()
                missing = sorted(needed - known.settings)[0]
                return Decision(Status.BYPASS, f"reads setting {missing}: asking the server for it")
            return Decision(Status.VOLATILE, "reads more custom settings than a session identity carries")
        return Decision(Status.MISS, "", resolution)

    def _runs_code(self, item: Pending) -> None:
        """The request runs code neonpoly cannot vouch for: it may write anything or SET."""
        item.writes_everything = True
        self._invalidate(frozenset(), True)
        self._forget_identity()

    def _note_effects(self, info: Classification, item: Pending, out: list[bytes]) -> None:
        """Writes evict before they are sent; session changes make the session learn its
        identity again."""
        if not info.has_effects and not self.state.legacy_strings:
            return  # a plain read
        everything = info.invalidate_all or self.state.legacy_strings
        if info.fetches and self.writing_cursors:
            everything = True  # the cursor's query runs now, and may write
        if info.cursor_writes:
            self.writing_cursors = True
        if info.is_write or everything:
            item.writes = info.tables_written
            item.writes_everything = everything
            self._invalidate(info.tables_written, everything, out, cluster_wide=info.cluster_wide)
        item.commits = info.transaction_control == "commit"
        if info.changes_session or everything:
            self._forget_identity()

    def _invalidate(
        self,
        tables: frozenset[str],
        everything: bool,
        out: list[bytes] | None = None,
        *,
        cluster_wide: bool = False,
    ) -> None:
        """Evict what a write may change: its tables and everything they reach (foreign-key
        cascades, partitions); the whole database for triggers, rules or tables not looked
        up yet (and the session learns its identity again: a trigger may SET); every database
        of the origin for roles and grants. Given `out` in an idle session, also ask about
        those tables for next time."""
        cache = self.route.cache if self.route else None
        if cache is None or not (tables or everything):
            return
        database = self.state.database
        named = (tables, everything)
        if not everything:
            reach = cache.relations.reach(database, tables)
            if reach is None:
                everything = True
                self._forget_identity()
                unknown = cache.relations.unknown(database, tables)
                if unknown and out is not None and self._at_boundary() and not self._busy():
                    self._ask_relations(cache, unknown, out)
            else:
                tables = reach
        cache.invalidate(None if cluster_wide else database, tables, everything, named)

    def _answer_locally(self, payload: bytes, infos: list[Classification], item: Pending) -> None:
        cache = self.route.cache if self.route else None
        if cache is not None:
            for info in infos:
                cache.record(
                    StatTicket(info.template_id, info.template, info.qualified_tables, "hit"),
                    time.monotonic() - item.started,
                    len(payload),
                )
        self._answer_quietly(payload, item)

    # --- extended protocol ------------------------------------------------------------

    def _sync(self, raw: bytes, out: list[bytes], expect: int | None = None) -> None:
        """Decide on a whole batch at its Sync (or at a Flush, `expect` answers long)."""
        if self.stream is not None:
            out.append(raw)
            self.stream = None
            self.batch_open = False
            return
        batch = self._take_batch()
        flush = expect is not None
        # A driver re-running a prepared statement sends the same Bind/Execute bytes again
        # (pgbench -M prepared, asyncpg's statement cache): plan and key them once.
        memo_key = None
        memo = None
        if all(t != MSG_PARSE and t != MSG_CLOSE for t, _ in batch):
            memo_key = (self.book.version, flush, tuple(batch))
            memo = self._plans.get(memo_key)
        plan = memo[0] if memo is not None else self.book.plan(batch)
        item = Pending(time.monotonic(), flush=flush, expect=expect)
        info = plan.primary
        self._plan_effects(plan, item, out)
        refusal = (plan.status, plan.reason) if plan.status is not None else None
        if refusal is None and info is not None and not info.cacheable:
            refusal = (info.status or Status.UNCACHEABLE, info.reason)
        template = info.template_id if info is not None else ""
        decision = self._cache_decision(refusal, template, plan.tables, plan.shadowable, item, out, plan.settings_read)
        status, reason = decision.status, decision.reason
        if flush and status is Status.MISS and any(t == MSG_BIND for t, _ in batch):
            # Its portal must exist at the origin for the Execute that follows the Flush.
            status, reason = Status.UNCACHEABLE, "a Flush before Sync needs the portal at the origin"
        cache = self.route.cache if self.route else None
        if status is Status.MISS and cache is not None and (plan.executes or info is not None):
            context = self.state.context()
            if memo is not None and memo[1] is context:
                key = memo[2]
            else:
                # The tag (b"Q" for a simple query; b"H"/b"X" for a batch ended by Flush/Sync)
                # is part of every stored key: changing it orphans a persisted cache.
                key = cache.key(context, (b"H" if flush else b"X") + plan.material)
                if memo_key is not None:
                    if len(self._plans) >= 2048:  # a hot set per session; ~1 MB at most
                        self._plans.clear()
                    self._plans[memo_key] = (plan, context, key)
            payload = cache.lookup(key)
            if payload is not None and not self._busy():
                self.book.after_local(plan)
                if plan.executes:
                    self._answer_locally(payload, plan.executed, item)
                else:
                    self._answer_quietly(payload, item)
                return
            item.capture = self._capture(cache, key, decision.resolution, template)
        # Not neutral while the catalog has not described what it reads: it may run code.
        item.neutral = status is Status.MISS and not (item.reads or item.trusts)
        item.stats.extend(
            StatTicket(i.template_id, i.template, i.qualified_tables, str(status), reason) for i in plan.executed
        )
        deferred = self.book.deferred_parses(plan)
        item.swallow = len(deferred)
        self.book.after_forward(plan)
        for name in plan.deallocates:
            self.book.deallocated(name)
        self._push(item)
        out.extend(deferred)
        out.extend(pgwire.frame(t, b) for t, b in batch)
        out.append(raw)
        self.batch_open = flush  # a Flush leaves the batch (its portals, its transaction) open

    def _answer_quietly(self, payload: bytes, item: Pending) -> None:
        """Answer from the cache; behind outstanding plain reads, wait for their turn."""
        if self.pending:
            item.local = payload
            self._push(item)
        else:
            self._write_client(payload if item.flush else payload + pgwire.ready_for_query(self.state.tx_status))

    def _plan_effects(self, plan: BatchPlan, item: Pending, out: list[bytes] | None) -> None:
        """A batch's writes evict before it is sent; session changes make the session learn
        its identity again (as `_note_effects` for a simple query)."""
        everything = plan.writes_everything or self.state.legacy_strings
        if plan.fetches and self.writing_cursors:
            everything = True
        if plan.cursor_writes:
            self.writing_cursors = True
        if plan.writes or everything:
            item.writes = item.writes | plan.writes
            item.writes_everything = item.writes_everything or everything
            self._invalidate(plan.writes, everything, out, cluster_wide=plan.cluster_wide)
        item.commits = item.commits or plan.commits
        if plan.changes_session or everything:
            self._forget_identity()

    def _open_stream(self, out: list[bytes]) -> None:
        """Forward the batch so far and everything up to its Sync as it arrives."""
        batch = self._take_batch()
        plan = self.book.plan(batch)
        item = Pending(time.monotonic())
        self._plan_effects(plan, item, out)
        self._cache_decision((Status.BYPASS, ""), "", plan.tables, plan.shadowable, item, out)
        status, reason = (plan.status, plan.reason) if plan.status else (Status.BYPASS, "streamed before its Sync")
        item.stats.extend(
            StatTicket(i.template_id, i.template, i.qualified_tables, str(status), reason) for i in plan.executed
        )
        deferred = self.book.deferred_parses(plan)
        item.swallow = len(deferred)
        self.book.after_forward(plan)
        for name in plan.deallocates:
            self.book.deallocated(name)
        self._push(item)
        self.stream = item
        out.extend(deferred)
        out.extend(pgwire.frame(t, b) for t, b in batch)

    def _stream_frame(self, mtype: int, body: bytes, raw: bytes, out: list[bytes]) -> None:
        assert self.stream is not None
        if mtype in _EXTENDED:
            plan = self.book.plan([(mtype, body)])
            self._plan_effects(plan, self.stream, None)
            if plan.tables or plan.shadowable:
                self._cache_decision((Status.BYPASS, ""), "", plan.tables, plan.shadowable, self.stream, None)
            deferred = self.book.deferred_parses(plan)
            self.stream.swallow += len(deferred)
            self.book.after_forward(plan)
            out.extend(deferred)
        out.append(raw)

    # --- origin side --------------------------------------------------------------------

    def origin_data(self, data: bytes) -> None:
        self.obuf += data
        try:
            if self.phase is AUTH:
                self._relay_auth_from_origin()
            else:
                self._origin_frames()
        except pgwire.ProtocolViolation as exc:
            self.fail_client("08P01", f"origin sent an invalid message: {exc}", "origin protocol violation", fatal=True)

    def _relay_auth_from_origin(self) -> None:
        frames, used = pgwire.scan_frames(self.obuf)
        buf = bytes(self.obuf[:used])
        del self.obuf[:used]
        out: list[bytes] = []
        for mtype, start, end in frames:
            body = buf[start + 5 : end]
            if mtype == MSG_AUTHENTICATION_REQUEST and pgwire.auth_code(body) == pgwire.AUTH_SASL:
                out.append(pgwire.frame(MSG_AUTHENTICATION_REQUEST, pgwire.strip_scram_plus(body)))
            elif mtype == MSG_BACKEND_KEY_DATA:
                pid = int.from_bytes(body[:4], "big", signed=True)
                self.origin_key = (pid, body[4:])
                self.proxy_key = (pid, secrets.token_bytes(4))
                self.server.register_key(self)
                out.append(pgwire.backend_key_data(*self.proxy_key))
            elif mtype == MSG_PARAMETER_STATUS:
                self.state.parameter(*pgwire.parse_parameter_status(body))
                out.append(buf[start:end])
            elif mtype == MSG_READY_FOR_QUERY:
                self.state.tx_status = body[:1]
                self.phase = READY
                self._stop_login_timer()
                out.append(buf[start:end])
                self._write_client(b"".join(out))
                out = []
                if end < len(buf) or self.obuf:
                    self.obuf[:0] = buf[end:]
                    self._origin_frames()
                else:
                    self._learn_when_idle()
                if self.cbuf and not self.identity_inflight:
                    self._client_frames()
                return
            else:
                if mtype == MSG_ERROR_RESPONSE:
                    self.outcome = "auth failed: " + pgwire.parse_error_fields(body).get("C", "?")
                out.append(buf[start:end])
        self._write_client(b"".join(out))

    def _origin_frames(self) -> None:
        frames, used = pgwire.scan_frames(self.obuf)
        if not frames:
            return
        buf = bytes(self.obuf[:used])
        del self.obuf[:used]
        out: list[bytes] = []
        cut = 0  # start of the span not yet appended to out
        pending = self.pending
        for mtype, start, end in frames:
            head = pending[0] if pending else None
            if head is not None and head.local is not None:  # pragma: no cover - defensive
                head = None
            if head is not None and (head.lookup is not None or head.identity is not None):
                if mtype in _CLIENTS_DURING_LOOKUP:
                    if mtype == MSG_PARAMETER_STATUS:
                        self._parameter(buf[start + 5 : end])
                    continue
                out.append(buf[cut:start])
                cut = end
                self._lookup_frame(head, mtype, buf[start + 5 : end])
                if mtype == MSG_READY_FOR_QUERY:
                    self._release_local(out)
                continue
            if mtype == MSG_READY_FOR_QUERY:
                self.state.tx_status = buf[start + 5 : start + 6]
                out.append(buf[cut:end])
                cut = end
                if self.inflight:
                    self.inflight -= 1
                # Flush batches still open here failed: the origin skipped to this Sync.
                skipped = False
                while pending and pending[0].flush and pending[0].local is None:
                    failed = pending.popleft()
                    failed.error = skipped = True
                    self._complete(failed)
                if pending and pending[0].local is None:
                    done = pending.popleft()
                    done.error = done.error or skipped
                    self._complete(done)
                self._release_local(out)
                continue
            if head is None:
                if mtype == MSG_PARAMETER_STATUS:
                    self._parameter(buf[start + 5 : end])
                continue
            if head.swallow and mtype in _SWALLOWED:  # our Parse/Close ahead of it
                head.swallow -= 1
                out.append(buf[cut:start])
                cut = end
                continue
            if mtype == MSG_ERROR_RESPONSE:
                head.error = True
            elif mtype == MSG_PARAMETER_STATUS:
                self._parameter(buf[start + 5 : end])
            capture = head.capture
            if head.flush and head.expect is not None and mtype not in _NOT_PAYLOAD:
                if mtype == MSG_ERROR_RESPONSE:
                    head.expect = None  # now ends at the next ReadyForQuery
                else:
                    head.expect -= 1
                    if capture is not None and not capture.failed:
                        capture.frames.append(buf[start:end])
                        capture.size += end - start
                    if head.expect == 0:
                        out.append(buf[cut:end])
                        cut = end
                        pending.popleft()
                        self._complete(head)
                        self._release_local(out)
                    continue
            if capture is not None and not capture.failed and mtype not in _NOT_PAYLOAD:
                if mtype in _FAILS_CAPTURE:
                    capture.failed = True
                    capture.frames.clear()
                else:
                    capture.frames.append(buf[start:end])
                    capture.size += end - start
                    if (
                        self.route is not None
                        and self.route.cache is not None
                        and not self.route.cache.accepts(capture.size)
                    ):
                        capture.failed = True
                        capture.frames.clear()
                        head.stats = [
                            StatTicket(t.template_id, t.template, t.tables, str(Status.OVERSIZEDRESULT),
                                       "the result is larger than the cache takes")
                            for t in head.stats
                        ]
        out.append(buf[cut:used])
        self._write_client(b"".join(out))
        if not pending:
            self._learn_when_idle()
            if self.cbuf and not self.identity_inflight and self.phase is READY and not self.closed:
                self._client_frames()

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
            self._fire_cancels()

    def when_cancellable(self, fire: Callable[[], None]) -> None:
        """A CancelRequest for this session. On a direct connection it stops the statement the
        client sent; here neonpoly's own lookup may be running ahead of it, or the statement
        may be waiting for the identity. Release what waits, and signal the origin only once
        the client's own request is the one running."""
        if self.identity_inflight and self.cbuf and not self.closed:
            self.hold_released = True
            self._client_frames()  # forwarded now, not cached: the identity is not in yet
        self.cancels.append(fire)
        self._fire_cancels()

    def _fire_cancels(self) -> None:
        head = self.pending[0] if self.pending else None
        if self.cancels and (self.closed or head is None or (head.lookup is None and head.identity is None)):
            fires, self.cancels = self.cancels, []
            for fire in fires:
                fire()

    def _release_local(self, out: list[bytes]) -> None:
        """Cache answers queued behind origin answers go out as soon as it is their turn."""
        pending = self.pending
        while pending and pending[0].local is not None:
            item = pending.popleft()
            out.append(
                (item.local or b"")
                if item.flush
                else (item.local or b"") + pgwire.ready_for_query(self.state.tx_status)
            )

    def _complete(self, item: Pending) -> None:
        """A response ended (ReadyForQuery): evict again, store, count."""
        committed = self.state.tx_status == TX_IDLE
        cache = self.route.cache if self.route else None
        if (item.reads or item.trusts) and cache is not None:
            # It read relations (or trusted builtins) the catalog had not described when it was sent.
            known = self.state.identity
            schemas = known.schemas if known is not None else None
            resolution = cache.relations.resolve(self.state.database, item.reads, item.trusts, schemas)
            if resolution is None:
                self.relations_wanted |= item.reads  # asked at the next idle moment
            if resolution is None or resolution.runs_code is not None:
                item.writes_everything = True
                self._forget_identity()
        if item.writes or item.writes_everything:
            self.tx_writes |= item.writes
            self.tx_writes_everything |= item.writes_everything
        if (committed or item.commits) and (self.tx_writes or self.tx_writes_everything):
            # The write is visible to other sessions only now (COMMIT AND CHAIN leaves a new
            # transaction open): evict again so a miss that raced it is not kept.
            self._invalidate(frozenset(self.tx_writes), self.tx_writes_everything)
            self.tx_writes = set()
            self.tx_writes_everything = False
        if cache is None:
            return
        capture = item.capture
        if capture is not None and not capture.failed and not item.error and committed and capture.frames:
            cache.store_capture(capture)
        elapsed = time.monotonic() - item.started
        for ticket in item.stats:
            cache.record(ticket, elapsed, 0)

    def write_client(self, data: bytes) -> None:
        """For answers neonpoly makes itself (the admin console)."""
        self._write_client(data)

    def _write_client(self, data: bytes) -> None:
        if data and not self.closed:
            self.bytes_out += len(data)
            self.client.write(data)

    # --- endings ----------------------------------------------------------------------

    def fail_client(self, sqlstate: str, message: str, outcome: str, *, fatal: bool = False) -> None:
        """Send one ErrorResponse and close: the protocol allows nothing else after it."""
        self.outcome = outcome
        if not self.closed and self.phase is not TLS:
            # Every error neonpoly itself sends ends the session, so it is FATAL.
            self.client.write(pgwire.error_response(sqlstate, message, severity="FATAL"))
        self.close()

    def terminate(self, message: str, outcome: str) -> None:
        """End the session from the proxy's side (remove, shutdown): 57P01 then close."""
        self.fail_client("57P01", message, outcome, fatal=True)

    def origin_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self.phase is READY and (self.pending or self.inflight):
            self.fail_client(
                "08006",
                f"lost connection to origin {self.route.origin.label if self.route else ''}",
                "origin lost",
                fatal=True,
            )
        else:
            if self.outcome == "closed":
                self.outcome = "origin closed"
            self.close()

    def client_lost(self) -> None:
        if self.outcome == "closed":
            self.outcome = "client disconnected"
        self.close()

    def _login_expired(self) -> None:
        self.login_timer = None
        if not self.closed and self.phase in LOGGING_IN:
            self.fail_client("08006", "neonpoly: login timed out", "login timeout", fatal=True)

    def _stop_login_timer(self) -> None:
        if self.login_timer is not None:
            self.login_timer.cancel()
            self.login_timer = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_login_timer()
        self._fire_cancels()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.origin_transport is not None:
            self.origin_transport.close()
        self.client.close()
        self.server.forget(self)
        log.info(
            "connection client=%s database=%s role=%s cache=%s duration_ms=%.0f bytes_in=%d bytes_out=%d outcome=%r",
            self.peer,
            self.state.database or "-",
            self.state.user or "-",
            self.route.cache_id if self.route else "-",
            (time.monotonic() - self.opened) * 1000,
            self.bytes_in,
            self.bytes_out,
            self.outcome,
        )

    # --- flow control -----------------------------------------------------------------

    def pause_origin(self) -> None:
        if self.origin_transport is not None:
            self.origin_transport.pause_reading()

    def resume_origin(self) -> None:
        if self.origin_transport is not None and not self.origin_transport.is_closing():
            self.origin_transport.resume_reading()


def _lookup_row(row: list[bytes | None]) -> tuple[str, str, str, bool, str | None]:
    kind, root, relname, flag, definition = (row + [None] * 5)[:5]
    return (
        (kind or b"").decode(),
        (root or b"").decode(),
        (relname or b"").decode(),
        flag == b"true",
        None if definition is None else definition.decode(),
    )


_NOTHING_TO_RESOLVE = Resolution(frozenset(), None, None)


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status
    reason: str  # an explanation for SHOW QUERIES and the console ("" for a miss)
    resolution: Resolution | None = None  # what the catalog said, for a miss to be stored


class ClientSide(asyncio.Protocol):
    def __init__(self, open_session: Callable[[asyncio.Transport], Session]) -> None:
        self.open_session = open_session
        self.session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's TCPTransport is not an asyncio.Transport subclass.
        client: asyncio.Transport = transport  # type: ignore[assignment]
        if self.session is None:
            limit_socket_buffer(client, socket.SO_SNDBUF)  # see origin.RELAY_SOCKET_BUFFER
            client.set_write_buffer_limits(high=RELAY_SOCKET_BUFFER)
            self.session = self.open_session(client)
        else:  # TLS upgrade hands us the new transport
            self.session.client = client

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.client_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.client_lost()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_origin()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_origin()


class OriginSide(asyncio.Protocol):
    def __init__(self, session: Session) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.session.origin_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.origin_lost(exc)

    def pause_writing(self) -> None:
        if not self.session.closed:
            self.session.client.pause_reading()

    def resume_writing(self) -> None:
        if not self.session.closed and not self.session.client.is_closing():
            self.session.client.resume_reading()

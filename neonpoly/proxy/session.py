"""One client connection relayed to one origin connection.

Two asyncio Protocols (client side, origin side) share one `Session`. A session is built in
layers, each a class in its own module that calls only the layers below it:

    session.py    Session           startup, TLS, authentication, cancels, endings
    answers.py    OriginAnswers     the origin's frame loop: answers to the client, captures
    relay.py      Relay             the client's frame loop: requests to the origin;
                                    repeats of a hit answered from their raw bytes (hits.py)
    batches.py    BatchHandling     extended-protocol batches, decided on at Sync or streamed
    decisions.py  CacheDecisions    hit, miss or why not; evictions; storing captured misses
    learning.py   IdentityLearning  who the session is, what the catalog says: asked when idle
    core.py       SessionCore       the state they all share, the ways out to client and origin

They are layers of one object rather than objects of their own because they share the
queue of outstanding requests, the transaction status and the route on every frame: as
separate objects, each would reach through the others for them on the relay's hot path.
State that stands alone is an object: the cancels held back (cancel.py), the batch being
received (extended.BatchBuffer). The session knows the listener that accepted it only as
a `SessionHost` (host.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from neonpoly import pgwire
from neonpoly.pgwire import (
    MSG_AUTHENTICATION_REQUEST,
    MSG_BACKEND_KEY_DATA,
    MSG_ERROR_RESPONSE,
    MSG_PARAMETER_STATUS,
    MSG_READY_FOR_QUERY,
    MSG_TERMINATE,
)
from neonpoly.proxy.answers import OriginAnswers
from neonpoly.proxy.host import SessionHost
from neonpoly.proxy.origin import RELAY_SOCKET_BUFFER, OriginUnavailable, limit_socket_buffer, open_origin
from neonpoly.proxy.state import ADMIN, AUTH, CANCEL, CONNECTING, LOGGING_IN, READY, STARTUP, TLS

if TYPE_CHECKING:
    from neonpoly.proxy.routes import AdminHandler

log = logging.getLogger("neonpoly.session")


class Session(OriginAnswers):
    """The relay and its state machine: startup → auth → ready → closed."""

    def __init__(self, server: SessionHost[Session], client: asyncio.Transport) -> None:
        super().__init__(client)
        self.server = server
        peer = client.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.opened = time.monotonic()
        self.bytes_in = 0
        self.connect_task: asyncio.Task[None] | None = None
        # Like PostgreSQL's authentication_timeout: a client that never finishes logging in
        # (or never starts) must not hold a session for ever.
        self.login_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            server.login_timeout, self._login_expired
        )
        self.admin: AdminHandler | None = None

    # --- client side ------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.passing and not self.cbuf and self._relay_data(data):
            return  # pass-through, whole frames: counted and written as they came
        if self.inflight and not self.passing:
            self._queue_passed()  # a read passed from its memo waits in the queue from now on
        if not self.cbuf and self.phase is READY and (not self.identity_inflight or self.hold_released):
            # The common read: whole requests, nothing held before them. Taken as they came,
            # without a round trip through cbuf; a repeat of a hit is found by these bytes.
            if self.hit_memos:
                memo = self.hit_memos.get(data)
                if memo is not None and self._answer_memo(memo):
                    return
            if self.pass_memo is not None and self._pass_by_memo(data):
                return  # a bypassed read of the session's last slot (passes.py)
            try:
                route = self.route
                if route is None or route.cache is not None or not self._relay_data(data):
                    self._client_frames(data)
            except pgwire.ProtocolViolation as exc:
                self.fail_client("08P01", f"invalid frontend message: {exc}", "protocol violation")
            return
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
            # 3D000 (invalid_catalog_name), as PostgreSQL answers a database it does not have.
            message, hint = refusal or ("no such cache", None)
            self.fail_client("3D000", message, "refused: unknown cache", hint=hint)
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
            self.fail_client("08001", str(exc), "origin unreachable")
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

    # --- origin side ------------------------------------------------------------------

    def origin_data(self, data: bytes) -> None:
        if (self.passing or self.inflight) and not self.obuf and not self.pending and self._pass_origin(data):
            if not self.passing:  # with a cache: a read passed from its memo (passes.py), answered
                self._learn_when_idle()  # as after any answer (the client sent nothing since)
            return
        try:
            if self.phase is READY and not self.obuf and self._origin_fast(data):
                return
            self.obuf += data
            if self.phase is AUTH:
                self._relay_auth_from_origin()
            else:
                self._origin_frames()
        except pgwire.ProtocolViolation as exc:
            self.fail_client("08P01", f"origin sent an invalid message: {exc}", "origin protocol violation")

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
                self.passing = self.route is not None and self.route.cache is None
                self._stop_login_timer()
                out.append(buf[start:end])
                self.write_client(b"".join(out))
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
        self.write_client(b"".join(out))

    # --- cancels ----------------------------------------------------------------------

    def when_cancellable(self, fire: Callable[[], None]) -> None:
        """A CancelRequest for this session. On a direct connection it stops the statement the
        client sent; here neonpoly's own lookup may be running ahead of it, or the statement
        may be waiting for the identity. Release what waits, and signal the origin only once
        the client's own request is the one running."""
        if self.identity_inflight and self.cbuf and not self.closed:
            self.hold_released = True
            self._client_frames()  # forwarded now, not cached: the identity is not in yet
        self.cancels.hold(fire)
        self.cancels.release(closed=self.closed)

    # --- endings ----------------------------------------------------------------------

    def fail_client(self, sqlstate: str, message: str, outcome: str, *, hint: str | None = None) -> None:
        """Send one ErrorResponse and close: the protocol allows nothing else after it."""
        self.outcome = outcome
        if not self.closed and self.phase is not TLS:
            # Every error neonpoly itself sends ends the session, so it is FATAL.
            self.client.write(pgwire.error_response(sqlstate, message, severity="FATAL", hint=hint))
        self.close()

    def terminate(self, message: str, outcome: str) -> None:
        """End the session from the proxy's side (remove, shutdown): 57P01 then close."""
        self.fail_client("57P01", message, outcome)

    def origin_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self.phase is READY and (self.pending or self.inflight):
            self.fail_client(
                "08006",
                f"lost connection to origin {self.route.origin.label if self.route else ''}",
                "origin lost",
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
            self.fail_client("08006", "neonpoly: login timed out", "login timeout")

    def _stop_login_timer(self) -> None:
        if self.login_timer is not None:
            self.login_timer.cancel()
            self.login_timer = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_login_timer()
        self.cancels.release(closed=True)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.origin_transport is not None and not self._drain_origin(self.origin_transport):
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

    def _drain_origin(self, origin: asyncio.Transport) -> bool:
        """The client is gone, but its backend may still change what other sessions read:
        a write it was sent commits when its statement ends (the client never sees that
        commit, whose eviction is lost with it), and temporary objects the session may hold
        are dropped as the backend exits, with no DDL statement, though other sessions'
        catalog helpers saw them (`to_regclass('pg_temp_3.t')`). Then: evict now, end the
        backend after what it runs (Terminate), and evict again when the origin closes the
        connection: PostgreSQL closes it only after that commit and that drop, so a miss
        that read the old state was sent before the second eviction, and its stamp is stale.
        True when the origin connection is left to that (closed by the backend, or after
        _DRAIN_SECONDS); False: close it now (when the origin connection is already gone, a
        write may have committed just before: evicted once more, now)."""
        cache = self.route.cache if self.route else None
        if cache is None or self.phase is not READY:
            return False
        code = self.tx_writes_everything or any(item.writes_everything for item in self.pending)
        writes = code or self.tx_writes or self.tx_keyed or any(item.writes or item.keyed for item in self.pending)
        if not (writes or self.state.temp_objects):
            return False
        database = self.state.database

        def evict() -> None:
            # Its database (code a write ran reaches every database, and may have been DDL).
            cache.invalidate(database, frozenset(), True, None if code else (frozenset(), False), elsewhere=code)

        evict()
        if origin.is_closing():
            return False
        origin.write(pgwire.frame(b"X"))  # a second Terminate after the client's is ignored
        timer = asyncio.get_running_loop().call_later(_DRAIN_SECONDS, origin.close)
        origin.set_protocol(_OriginDrain(evict, timer))
        origin.resume_reading()  # paused for a slow client, it would never see the backend go
        return True

    # --- flow control -----------------------------------------------------------------

    def pause_origin(self) -> None:
        if self.origin_transport is not None:
            self.origin_transport.pause_reading()

    def resume_origin(self) -> None:
        if self.origin_transport is not None and not self.origin_transport.is_closing():
            self.origin_transport.resume_reading()


# How long an ended session's backend gets to finish what it runs and exit (see
# Session._drain_origin): a write still running then is evicted again at that moment, but
# its commit after it is not seen (the TTL bounds it), as for a write made elsewhere.
_DRAIN_SECONDS = 300.0


class _OriginDrain(asyncio.Protocol):
    """The origin connection of an ended session, until the backend closes it (see
    Session._drain_origin): what it still sends is dropped."""

    def __init__(self, evict: Callable[[], None], timer: asyncio.TimerHandle) -> None:
        self.evict = evict
        self.timer = timer

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.evict()


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
            # Every read goes straight to the session: no call through this object. uvloop
            # keeps the method it found when the protocol was set, so it is set again.
            self.data_received = self.session.client_data  # type: ignore[method-assign]
            client.set_protocol(self)
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
        # Every read straight to the session, as ClientSide does: no call through this object.
        # Set before the transport first takes this protocol (uvloop keeps the method then).
        self.data_received = session.origin_data  # type: ignore[method-assign]

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

"""The listener: accepts clients, routes each to its cache and origin, routes cancels.

One listener serves several caches: a client picks one with `application_name=<cache id>`
(PolyScale's scheme). Sessions are registered here so that a CancelRequest, a removed
integration or a shutdown can find them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from neonpoly.defaults import DEFAULT_PORT, LOCALHOST
from neonpoly.proxy.origin import Origin, send_cancel
from neonpoly.proxy.routes import Refusal, Route, Routes
from neonpoly.proxy.session import ClientSide, Session
from neonpoly.proxy.state import SessionState

# The listener is the proxy's front door: the service builds its routing table from here.
__all__ = ["ProxyServer", "Route", "Routes"]

log = logging.getLogger("neonpoly.server")


class ProxyServer:
    """The listener; the `SessionHost` of every session it accepts (see host.py)."""

    def __init__(
        self,
        routes: Routes,
        *,
        tls_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        login_timeout: float = 60.0,
        on_session_change: Callable[[], None] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.routes = routes
        self.tls_context = tls_context
        self.connect_timeout = connect_timeout
        self.login_timeout = login_timeout
        self.sessions: set[Session] = set()
        self.by_key: dict[tuple[int, bytes], Session] = {}
        self._server: asyncio.Server | None = None
        self._on_change = on_session_change
        self._tasks: set[asyncio.Task[None]] = set()
        # Several processes on one port (`serve --workers`): the kernel spreads connections.
        self.reuse_port = reuse_port
        # A CancelRequest whose key no session here holds (it may be another process's on the
        # same port): handed to this hook, which calls `done` once it was delivered or not.
        self.unknown_cancel: Callable[[int, bytes, Callable[[], None] | None], None] | None = None

    async def start(self, host: str = LOCALHOST, port: int = DEFAULT_PORT) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSide(self.open_session), host, port, reuse_address=True, reuse_port=self.reuse_port or None
        )
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    # --- sessions ---------------------------------------------------------------------

    def open_session(self, transport: asyncio.Transport) -> Session:
        session = Session(self, transport)
        self.sessions.add(session)
        return session

    def forget(self, session: Session) -> None:
        self.sessions.discard(session)
        self.by_key.pop(session.proxy_key, None)
        if self._on_change is not None:
            self._on_change()

    def register_key(self, session: Session) -> None:
        self.by_key[session.proxy_key] = session
        if self._on_change is not None:
            self._on_change()

    def route_for(self, state: SessionState) -> tuple[Route | None, Refusal | None]:
        routes = self.routes
        if state.database == routes.admin_database and routes.admin is not None:
            return Route("admin", Origin("admin", 0), admin=routes.admin), None
        name = state.application_name
        if name in routes.removed:
            return None, Refusal(f'neonpoly cache "{name}" was removed', routes.served())
        route = routes.by_id.get(name)
        if route is None and routes.default is not None:
            if name and _looks_like_cache_id(name):
                return None, Refusal(f'no neonpoly cache with id "{name}"', routes.served())
            route = routes.by_id.get(routes.default)
        if route is None:
            return None, Refusal("no neonpoly cache selected: connect with application_name=<cache id>",
                                 routes.served())
        return route, None

    def connections(self, cache_id: str | None = None) -> list[Session]:
        return [s for s in self.sessions if cache_id is None or (s.route is not None and s.route.cache_id == cache_id)]

    def cancel(self, pid: int, secret: bytes, done: Callable[[], None] | None = None) -> None:
        """Forward a CancelRequest to the session's origin backend; `done` runs once it was
        delivered (or could not be). The client's cancel connection is closed only then, as
        the server closes it only after signalling the backend: a client that goes on at once
        (psycopg draining an abandoned COPY) must find its statement already cancelled."""
        session = self.by_key.get((pid, secret))
        if session is None and self.unknown_cancel is not None:
            self.unknown_cancel(pid, secret, done)
            return
        if session is None or session.origin_key is None or session.route is None:
            log.info("cancel request for an unknown backend ignored")
            if done is not None:
                done()
            return
        origin, (origin_pid, origin_secret) = session.route.origin, session.origin_key

        def fire() -> None:
            task = asyncio.get_running_loop().create_task(self._cancel(origin, origin_pid, origin_secret))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if done is not None:
                task.add_done_callback(lambda _: done())

        session.when_cancellable(fire)

    @staticmethod
    async def _cancel(origin: Origin, pid: int, secret: bytes) -> None:
        try:
            await send_cancel(origin, pid, secret)
        except Exception as exc:  # a failed cancel must never take the proxy down
            log.warning("cancel request to origin %s failed: %s", origin.label, exc)

    def terminate(self, cache_id: str, message: str) -> int:
        """End every session of a cache (the integration was removed): 57P01, then close."""
        victims = self.connections(cache_id)
        for session in victims:
            session.terminate(message, "terminated: cache removed")
        return len(victims)

    # --- shutdown -----------------------------------------------------------------------

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight queries finish for `grace` seconds, then end all."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(s.pending or s.inflight for s in self.sessions):
            await asyncio.sleep(0.05)
        # Closing a connection does not stop the statement it runs (the server notices only
        # when it next reads or writes): cancel what is still running at the origin first.
        cancels = [
            asyncio.ensure_future(self._cancel(s.route.origin, *s.origin_key))
            for s in self.sessions
            if (s.pending or s.inflight) and s.origin_key is not None and s.route is not None and s.route.admin is None
        ]
        if cancels:
            await asyncio.wait(cancels, timeout=2.0)
        for session in list(self.sessions):
            session.terminate("terminating connection: neonpoly is shutting down", "shutdown")
        if self._server is not None:
            self._server.close()
            try:
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            except TimeoutError:
                pass


def _looks_like_cache_id(name: str) -> bool:
    return len(name) == 36 and name.count("-") == 4

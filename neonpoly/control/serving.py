"""Putting a proxy to work from the state dir: the one path `serve`, the console and the
test fixtures take (`start_serving`), and what keeps a running proxy in step with the state
dir afterwards (`StateFollower`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from neonpoly.admin.console import AdminConsole, install_admin
from neonpoly.admin.metrics import MetricsServer
from neonpoly.control.interface import ControlError, Progress
from neonpoly.defaults import environment
from neonpoly.freshness.changefeed import FeedUnavailable
from neonpoly.integrations.discovery import DiscoveryError, parse_connect_to
from neonpoly.integrations.embedded_origin import EMBEDDED_DATABASE, EMBEDDED_USER, EmbeddedOrigin
from neonpoly.integrations.neon_api import NeonAPIError
from neonpoly.integrations.pgbin import PostgresError
from neonpoly.integrations.store import (
    Integration,
    IntegrationError,
    IntegrationStore,
    connection_string,
    record_embedded,
)
from neonpoly.proxy.origin import Origin
from neonpoly.service import ProxyService

log = logging.getLogger("neonpoly.integrations")

# What the user can act on, turned into one line; anything else is a bug and propagates.
USER_ERRORS: tuple[type[Exception], ...] = (
    IntegrationError, DiscoveryError, NeonAPIError, PostgresError, ValueError
)


def listen_failure(host: str, port: int, exc: OSError, option: str = "--listen") -> str:
    """One line for a listener that could not bind. asyncio's own text repeats the address
    ("error while attempting to bind on address (…): address already in use")."""
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {host}:{port}: something else listens there; give {option} another HOST:PORT"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: no interface of this machine has that address ({option})"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _noop(step: str) -> None:
    return None


class EmbeddedRunner:
    """Starts the embedded origin at most once per process and stops it on close."""

    def __init__(self, root: Path, *, attached: Origin | None = None) -> None:
        self.root = root
        self.handle: EmbeddedOrigin | None = None
        self.origin: Origin | None = None
        # A worker of `serve --workers N`: the parent runs the embedded origin; this is its address.
        self.attached = attached
        self._lock = asyncio.Lock()

    async def ensure_origin(self, progress: Progress = _noop) -> Origin:
        """The embedded origin's address: the parent's (attached), else started here."""
        if self.attached is not None:
            return self.attached
        return (await self.ensure(progress))[1]

    async def ensure(self, progress: Progress = _noop) -> tuple[EmbeddedOrigin, Origin]:
        from neonpoly.integrations.embedded_origin import start_embedded_origin

        async with self._lock:
            if self.handle is not None and self.origin is not None:
                return self.handle, self.origin
            fresh = not (self.root / "embedded").exists()
            progress("Initialising embedded PostgreSQL" if fresh
                     else "Starting embedded PostgreSQL")
            # initdb and pg_ctl block for a while; keep the event loop (the proxy) serving.
            handle, origin = await asyncio.to_thread(start_embedded_origin, self.root)
            self.handle, self.origin = handle, origin
            return handle, origin

    async def stop(self) -> None:
        if self.handle is not None:
            handle, self.handle, self.origin = self.handle, None, None
            await asyncio.to_thread(handle.stop)


@dataclass(slots=True)
class Served:
    """One integration being served, with what a user needs to connect to it."""

    integration: Integration
    origin: Origin
    password: str | None

    def connection_string(self, host: str, port: int, *, reveal: bool = True) -> str:
        return connection_string(self.integration, host, port, password=self.password,
                                 reveal=reveal)


async def serve_one(service: ProxyService, store: IntegrationStore, item: Integration,
                     connect_to: str | None, embedded: EmbeddedRunner,
                     progress: Progress = _noop) -> Served:
    if item.kind == "embedded":
        origin = await embedded.ensure_origin(progress)
        if (origin.host, origin.port) != (item.origin_host, item.origin_port):
            # The embedded cluster moves when its port was taken; keep the state truthful.
            item = replace(item, origin_host=origin.host, origin_port=origin.port)
            store.put(item)
    else:
        origin = item.origin(connect_to)
    password = store.passwords(item.cache_id).get(item.role)
    # Clients bring their own credentials; the change feed logs in as the integration's role.
    origin = replace(origin, user=item.role, password=password, database=item.database)
    service.add_cache(item.cache_id, origin, default=not service.routes.by_id)
    service.names[item.cache_id] = item.name
    return Served(item, origin, password)


async def serve_from_state(
    service: ProxyService,
    root: Path,
    connect_to: str | None = None,
    *,
    embedded: EmbeddedRunner | None = None,
    embedded_when_empty: bool = True,
    progress: Progress = _noop,
) -> list[Served]:
    """Add every integration in the state dir to `service` (call before or after start()).

    With none, start the embedded origin and record a "local" integration for it so it keeps
    one cache id and connection string across restarts. Stop the embedded origin afterwards
    with `await runner.stop()` (pass your own `embedded` runner to hold on to it).
    """
    store = IntegrationStore(root)
    runner = embedded or EmbeddedRunner(root)
    items = store.load()
    if not items and embedded_when_empty:
        handle, origin = await runner.ensure(progress)
        items = [record_embedded(store, origin, EMBEDDED_USER, EMBEDDED_DATABASE, handle.password)]
    return [await serve_one(service, store, item, connect_to, runner, progress) for item in items]


class StateFollower:
    """Keeps a running proxy in step with integrations.toml, which the CLI may change.

    Polls the file's mtime (cheap, no extra dependency); a removed integration gets the same
    treatment as in-process removal: its clients receive 57P01 and its directory goes.
    """

    def __init__(self, service: ProxyService, root: Path, connect_to: str | None = None,
                 embedded: EmbeddedRunner | None = None, interval: float = 1.0) -> None:
        self.service = service
        self.store = IntegrationStore(root)
        self.connect_to = connect_to
        self.embedded = embedded or EmbeddedRunner(root)
        self.interval = interval
        self._seen = self.store.mtime()

    async def sync(self) -> tuple[list[str], list[str]]:
        """Apply the state file now; returns (added, removed) cache ids."""
        self._seen = self.store.mtime()
        wanted = {i.cache_id: i for i in self.store.load()}
        served = set(self.service.routes.by_id) - {"admin", "default"}
        added: list[str] = []
        removed: list[str] = []
        for cache_id in sorted(served - set(wanted)):
            ended = self.service.remove_cache(cache_id)
            _destroy_cache_dir(self.service, cache_id)
            log.info("integration %s removed: %d connections ended", cache_id, ended)
            removed.append(cache_id)
        for cache_id, item in wanted.items():
            if cache_id not in served:
                await serve_one(self.service, self.store, item, self.connect_to, self.embedded)
                log.info("integration %s (%s) added", item.name, cache_id)
                added.append(cache_id)
        return added, removed

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.store.mtime() != self._seen:
                try:
                    await self.sync()
                except USER_ERRORS as exc:
                    log.warning("cannot apply %s: %s", self.store.path, exc)
                except Exception:
                    # Following the state must outlive any one bad change: log it, retry on
                    # the next change (a dead follower would silently ignore every later one).
                    log.exception("cannot apply %s", self.store.path)


def _destroy_cache_dir(service: ProxyService, cache_id: str) -> None:
    from neonpoly.cache.store import destroy_store_dir

    directory = service.cache_dir(cache_id)
    if directory is not None:
        try:
            destroy_store_dir(directory)
        except (OSError, ValueError) as exc:
            log.warning("cache directory %s of removed integration stays: %s", directory, exc)


@dataclass(slots=True)
class Serving:
    """A proxy at work: what `start_serving` started, and how to stop all of it."""

    service: ProxyService
    address: tuple[str, int]
    served: list[Served]  # integrations from the state dir (empty with an explicit upstream)
    admin: AdminConsole
    metrics: MetricsServer | None
    embedded: EmbeddedRunner
    follower: asyncio.Task[None] | None

    async def close(self, grace: float = 5.0, *, stop_embedded: bool = True) -> None:
        if self.follower is not None:
            self.follower.cancel()
            self.follower = None
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        await self.service.close(grace)
        if stop_embedded:
            await self.embedded.stop()


def upstream_origin(url: str, connect_to: str | None = None) -> Origin:
    """An explicit upstream URL as an Origin, redirected by `--connect-to` when it matches."""
    origin = Origin.from_url(url)
    if connect_to:
        try:
            rule = parse_connect_to(connect_to)
        except ValueError as exc:
            raise ValueError(f"--connect-to: {exc}") from exc
        if rule.matches(origin.host, origin.port):
            return origin.connecting_to(*rule.target(origin.host, origin.port))
    return origin


async def start_serving(
    service: ProxyService,
    root: Path,
    *,
    upstream: str | Origin | None = None,
    connect_to: str | None = None,
    admin_roles: list[str] | None = None,
    admin_password: str | None = None,
    metrics_listen: tuple[str, int] | None = None,
    embedded: EmbeddedRunner | None = None,
    embedded_when_empty: bool = True,
    follow: bool = True,
    follow_every: float = 1.0,
    progress: Progress = _noop,
    record_listen: bool = True,
) -> Serving:
    """Serve `upstream`, or every integration of the state dir `root` (the embedded origin
    when there is none and `embedded_when_empty`), with the admin database and optionally
    `/metrics`; listen; record where, so the admin commands find this proxy; and, with
    `follow`, apply integrations added or removed later by another process.

    Raises ControlError (one line for the user) when the state or the listener fails; what
    was started is stopped again first.
    """
    runner = embedded or EmbeddedRunner(root)
    served: list[Served] = []
    try:
        if upstream:
            origin = upstream if isinstance(upstream, Origin) else upstream_origin(upstream, connect_to)
            service.add_cache("default", origin, default=True)
        else:
            served = await serve_from_state(
                service, root, connect_to, embedded=runner, embedded_when_empty=embedded_when_empty, progress=progress
            )
    except USER_ERRORS as exc:
        await runner.stop()
        raise ControlError(str(exc)) from exc
    def integration_roles() -> list[str]:
        """The roles clients log in to the origins as may use the admin database too."""
        roles = [r.origin.user for r in service.routes.by_id.values() if r.origin.user]
        with contextlib.suppress(IntegrationError):
            roles += [i.role for i in IntegrationStore(root).load()]
        return roles

    admin = install_admin(
        service,
        allowed_roles=admin_roles,
        password=admin_password if admin_password is not None else environment().admin_password,
        integration_roles=integration_roles,
    )
    metrics: MetricsServer | None = None
    binding = ("--metrics-listen", metrics_listen)  # which listener a failure is about
    try:
        if metrics_listen is not None:
            metrics = MetricsServer(service)
            await metrics.start(*metrics_listen)
        binding = ("--listen", service.settings.listen)
        address = await service.start()
    except FeedUnavailable as exc:
        if metrics is not None:
            await metrics.close()
        await service.close(0)
        await runner.stop()
        raise ControlError(f"--change-feed on: {exc}") from exc
    except OSError as exc:
        if metrics is not None:
            await metrics.close()
        await service.close(0)  # close the caches cleanly, or the next start distrusts them
        await runner.stop()
        option, (host, port) = binding[0], binding[1] or service.settings.listen
        raise ControlError(listen_failure(host, port, exc, option)) from exc
    if record_listen:  # `serve --workers`: the parent records it, once
        IntegrationStore(root).set_listen(*address, upstream_only=bool(upstream))
    follower = None
    if follow and not upstream:
        # Integrations added or removed from another shell take effect here within a second.
        follower = asyncio.get_running_loop().create_task(
            StateFollower(service, root, connect_to, runner, interval=follow_every).run()
        )
    return Serving(service, address, served, admin, metrics, runner, follower)

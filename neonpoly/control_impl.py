"""`LocalControl`: the Control facade on a ProxyService in this process plus the state dir.

Also the serving side of integrations that `neonpoly serve` shares: `serve_from_state` (every
integration in the state dir, or the embedded origin when there is none) and `StateFollower`
(applies integrations added or removed by another process, by watching integrations.toml).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neonpoly.control import (
    CacheStatus,
    Control,
    ControlError,
    HeaderInfo,
    IntegrationView,
    Progress,
    SignInResult,
)
from neonpoly.discovery import DiscoveryError, discover
from neonpoly.embedded_origin import EMBEDDED_DATABASE, EMBEDDED_USER, EmbeddedOrigin
from neonpoly.integration import (
    DEFAULT_WORKSPACE,
    Integration,
    IntegrationError,
    IntegrationStore,
    connection_string,
    forget,
    record_embedded,
    record_neon,
    record_url,
    select,
)
from neonpoly.neon_api import API_KEY_ENV, NeonAPI, NeonAPIError, RetryPolicy
from neonpoly.proxy.origin import Origin
from neonpoly.service import ProxyService, ProxySettings
from neonpoly.state import state_dir
from neonpoly.stats import StatsSnapshot

if TYPE_CHECKING:
    from neonpoly.admin import AdminConsole
    from neonpoly.state import StateLock

log = logging.getLogger("neonpoly.integrations")

# What the user can act on, turned into one line; anything else is a bug and propagates.
USER_ERRORS: tuple[type[Exception], ...] = (
    IntegrationError, DiscoveryError, NeonAPIError, ValueError)


def _noop(step: str) -> None:
    return None


class EmbeddedRunner:
    """Starts the embedded origin at most once per process and stops it on close."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.handle: EmbeddedOrigin | None = None
        self.origin: Origin | None = None
        self._lock = asyncio.Lock()

    async def ensure(self, progress: Progress = _noop) -> tuple[EmbeddedOrigin, Origin]:
        from neonpoly.embedded_origin import start_embedded_origin

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


async def _serve_one(service: ProxyService, store: IntegrationStore, item: Integration,
                     connect_to: str | None, embedded: EmbeddedRunner,
                     progress: Progress = _noop) -> Served:
    if item.kind == "embedded":
        _, origin = await embedded.ensure(progress)
        if (origin.host, origin.port) != (item.origin_host, item.origin_port):
            # The embedded cluster moves when its port was taken; keep the state truthful.
            item = replace(item, origin_host=origin.host, origin_port=origin.port)
            store.put(item)
    else:
        origin = item.origin(connect_to)
    service.add_cache(item.cache_id, origin, default=not service.routes.by_id)
    return Served(item, origin, store.passwords(item.cache_id).get(item.role))


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
    return [await _serve_one(service, store, item, connect_to, runner, progress) for item in items]


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
                await _serve_one(self.service, self.store, item, self.connect_to, self.embedded)
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


async def add_neon(
    store: IntegrationStore,
    *,
    api_key: str | None = None,
    api_host: str | None = None,
    project_id: str | None = None,
    branch: str | None = None,
    endpoint: str | None = None,
    database: str | None = None,
    role: str | None = None,
    password: str | None = None,
    workspace: str = DEFAULT_WORKSPACE,
    name: str | None = None,
    connect_to: str | None = None,
    retry: RetryPolicy | None = None,
    progress: Progress = _noop,
) -> Integration:
    """Discovery (project → primary branch → read_write endpoint → db/role → password), then
    record the integration. Raises DiscoveryError / NeonAPIError with user-facing text."""
    async with NeonAPI(api_key, base_url=api_host, retry=retry) as api:
        found = await discover(api, project_id, branch, endpoint, database, role, password,
                               progress)
        others: dict[str, str] = {}
        if password is None:
            # The Manage drawer's Role drop-down changes the string: fetch the other roles'
            # passwords now (best effort) so a revealed string works for any of them.
            async def reveal(name: str) -> tuple[str, str | None]:
                try:
                    return name, await api.reveal_password(found.project.id, found.branch.id, name)
                except NeonAPIError:
                    return name, None

            pairs = await asyncio.gather(*(reveal(r) for r in found.roles if r != found.role))
            others = {n: pw for n, pw in pairs if pw}
    progress("Creating cache")
    return record_neon(store, found, workspace=workspace, name=name, connect_to=connect_to,
                       extra_passwords=others)


def integration_view(item: Integration) -> IntegrationView:
    return IntegrationView(
        cache_id=item.cache_id, name=item.name, workspace=item.workspace, kind=item.kind,
        origin_label=item.origin_label, endpoint_id=item.endpoint_id,
        endpoint_state=item.endpoint_state, branch=item.branch_name, project=item.project_name,
        databases=item.databases, roles=item.roles, database=item.database, role=item.role,
    )


class LocalControl(Control):
    """Control on a proxy in this process. `start()` serves what the state dir holds (no
    embedded origin until `add` asks for one, so the console can show "Available")."""

    def __init__(
        self,
        root: Path | None = None,
        settings: ProxySettings | None = None,
        *,
        api_key: str | None = None,
        api_host: str | None = None,
        project_id: str | None = None,
        upstream: str | None = None,
        connect_to: str | None = None,
        service: ProxyService | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.root = state_dir(root)
        self.store = IntegrationStore(self.root)
        self.service = service or ProxyService(
            settings or ProxySettings(cache_dir=self.root / "cache"))
        self.embedded = EmbeddedRunner(self.root)
        self.api_key = api_key
        self.api_host = api_host
        self.project_id = project_id
        self.upstream = upstream
        self.connect_to = connect_to
        self.retry = retry
        self.mode: str | None = None
        self._running = False
        self._admin: AdminConsole | None = None
        self._lock: StateLock | None = None

    # -- cheap reads -------------------------------------------------------------------
    def _listen(self) -> tuple[str, int]:
        if self._running:
            return self.service.server.address
        return self.service.settings.listen

    def header(self) -> HeaderInfo:
        host, port = self._listen()
        items = self.store.load()
        neon = next((i for i in items if i.kind == "neon"), None)
        if neon is not None:
            return HeaderInfo(neon.project_name or neon.name, neon.region, neon.branch_name,
                              f"{host}:{port}", self._running)
        return HeaderInfo("local", None, None, f"{host}:{port}", self._running)

    def integrations(self) -> list[IntegrationView]:
        return [integration_view(i) for i in self.store.load()]

    def _find(self, cache_id: str) -> Integration:
        try:
            return self.store.find(cache_id)
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc

    def select(self, cache_id: str, *, database: str | None = None,
               role: str | None = None) -> IntegrationView:
        try:
            return integration_view(select(self.store, cache_id, database=database, role=role))
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc

    def connection_string(self, cache_id: str, *, reveal: bool = False) -> str:
        item = self._find(cache_id)
        host, port = self._listen()
        password = self.store.passwords(item.cache_id).get(item.role)
        return connection_string(item, host, port, password=password, reveal=reveal)

    def status(self, cache_id: str) -> CacheStatus:
        item = self._find(cache_id)
        route = self.service.routes.by_id.get(item.cache_id)
        entries = size = 0
        if route is not None and route.cache is not None:
            usage = route.cache.store.usage()
            entries, size = usage.entries, usage.bytes
        totals = self.service.stats.snapshot(item.cache_id).totals
        cacheable = totals.hits + totals.misses
        return CacheStatus(
            entries=entries, bytes=size,
            connections=len(self.service.server.connections(item.cache_id)) if self._running else 0,
            calls=totals.calls, hits=totals.hits,
            hit_rate=totals.hits / cacheable if cacheable else None,
            origin=item.origin_label, endpoint_state=item.endpoint_state,
        )

    def stats(self, cache_id: str | None = None) -> StatsSnapshot:
        return self.service.stats.snapshot(cache_id)

    # -- actions -----------------------------------------------------------------------
    async def sign_in(self, api_key: str | None = None) -> SignInResult:
        key = api_key or self.api_key or os.environ.get(API_KEY_ENV) or self.store.api_key()
        if not key or self.upstream:
            self.mode = "local"
            return SignInResult("local", "local", (DEFAULT_WORKSPACE,))
        try:
            async with NeonAPI(key, base_url=self.api_host, retry=self.retry) as api:
                await api.list_projects()
        except NeonAPIError as exc:
            raise ControlError(str(exc)) from exc
        self.api_key, self.mode = key, "neon"
        if api_key:
            # Typed in by the user: keep it (0600) so a restarted console stays signed in.
            self.store.save_api_key(api_key)
        return SignInResult("neon", f"Neon API key …{key[-4:]}", (DEFAULT_WORKSPACE,))

    async def add(self, workspace: str, progress: Progress) -> IntegrationView:
        if self.mode is None:
            await self.sign_in()
        try:
            if self.mode == "neon":
                item = await add_neon(self.store, api_key=self.api_key, api_host=self.api_host,
                                      project_id=self.project_id, workspace=workspace,
                                      connect_to=self.connect_to, retry=self.retry,
                                      progress=progress)
            elif self.upstream:
                progress(f"Origin {Origin.from_url(self.upstream).label}")
                item = record_url(self.store, self.upstream, workspace=workspace,
                                  connect_to=self.connect_to)
            else:
                handle, origin = await self.embedded.ensure(progress)
                item = record_embedded(self.store, origin, EMBEDDED_USER, EMBEDDED_DATABASE,
                                       handle.password, workspace=workspace)
            if item.cache_id not in self.service.routes.by_id:
                await _serve_one(self.service, self.store, item, self.connect_to, self.embedded)
        except USER_ERRORS as exc:
            raise ControlError(str(exc)) from exc
        progress("Cache ready")
        return integration_view(item)

    async def purge(self, cache_id: str) -> int:
        item = self._find(cache_id)
        return self.service.purge(item.cache_id)

    async def purge_template(self, cache_id: str, template_id: str) -> int:
        item = self._find(cache_id)
        route = self.service.routes.by_id.get(item.cache_id)
        # A pass-through route has no cache, so nothing of any template to drop.
        if route is None or route.cache is None:
            return 0
        return route.cache.store.purge_template(template_id)

    async def remove(self, cache_id: str) -> int:
        """Delete the cache: its clients get 57P01 and are closed, entries and directory go,
        and the old connection string is refused from now on. Returns connections ended."""
        item = self._find(cache_id)
        ended = self.service.remove_cache(item.cache_id)
        try:
            forget(self.store, item.cache_id, self.service.settings.cache_dir)
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc
        if item.kind == "embedded" and not any(i.kind == "embedded" for i in self.store.load()):
            await self.embedded.stop()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        return ended

    async def start(self) -> None:
        if self._running:
            return
        from neonpoly.state import StateInUse, StateLock

        if self._lock is None:
            lock = StateLock(self.root)
            try:
                lock.acquire()
            except StateInUse as exc:
                raise ControlError(str(exc)) from exc
            self._lock = lock
        try:
            await serve_from_state(self.service, self.root, self.connect_to,
                                   embedded=self.embedded, embedded_when_empty=False)
        except USER_ERRORS as exc:
            raise ControlError(str(exc)) from exc
        from neonpoly.admin import install_admin

        # The console's proxy is a full neonpoly: rules, adaptive TTL, and the admin
        # database, so `neonpoly stats` and psql -d neonpoly work against it too.
        self._admin = await install_admin(self.service, self.root)
        try:
            host, port = await self.service.start()
        except OSError as exc:
            host, port = self.service.settings.listen
            raise ControlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        # So that `neonpoly connection-string` and the admin commands find this console's proxy.
        self.store.set_listen(host, port)
        self._running = True

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        if self._running:
            self._running = False
            await self.service.close(grace=1.0)
        await self.embedded.stop()


def open_control(root: Path | None = None, **options: Any) -> LocalControl:
    """The factory the CLI and TUI use (keyword options as LocalControl takes them)."""
    return LocalControl(root, **options)


__all__ = [
    "EmbeddedRunner",
    "LocalControl",
    "Served",
    "StateFollower",
    "add_neon",
    "open_control",
    "serve_from_state",
]

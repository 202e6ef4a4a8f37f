"""`LocalControl`: the Control facade on a ProxyService in this process plus the state dir.

It serves through `start_serving`, the same path as `neonpoly serve`; `record()` is the
state-dir half of Add, which `AttachedControl` reuses for a proxy running elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neonpoly.control.interface import (
    CacheStatus,
    Control,
    ControlError,
    Freshness,
    HeaderInfo,
    IntegrationView,
    Progress,
    SignInResult,
)
from neonpoly.control.serving import USER_ERRORS, EmbeddedRunner, Serving, serve_one, start_serving
from neonpoly.defaults import environment
from neonpoly.integrations.embedded_origin import EMBEDDED_DATABASE, EMBEDDED_USER
from neonpoly.integrations.neon_api import NeonAPI, NeonAPIError, RetryPolicy
from neonpoly.integrations.neon_flow import add_neon
from neonpoly.integrations.probe import list_choices, url_origin
from neonpoly.integrations.store import (
    DEFAULT_WORKSPACE,
    Integration,
    IntegrationError,
    IntegrationStore,
    connection_string,
    forget,
    record_embedded,
    record_url,
    select,
    update_choices,
)
from neonpoly.proxy.origin import Origin
from neonpoly.service import ProxyService, ProxySettings
from neonpoly.state import state_dir
from neonpoly.stats import StatsSnapshot

if TYPE_CHECKING:
    from neonpoly.state import StateLock

log = logging.getLogger("neonpoly.integrations")


def integration_view(item: Integration, password_known: bool = True) -> IntegrationView:
    return IntegrationView(
        cache_id=item.cache_id, name=item.name, workspace=item.workspace, kind=item.kind,
        origin_label=item.origin_label, endpoint_id=item.endpoint_id,
        endpoint_state=item.endpoint_state, branch=item.branch_name, project=item.project_name,
        databases=item.databases, roles=item.roles, database=item.database, role=item.role,
        password_known=password_known,
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
            settings or ProxySettings(cache_dir=self.root / "cache", rules_dir=self.root))
        self.embedded = EmbeddedRunner(self.root)
        self.api_key = api_key
        self.api_host = api_host
        self.project_id = project_id
        self.upstream = upstream
        self.connect_to = connect_to
        self.retry = retry
        self.mode: str | None = None
        self._running = False
        self._serving: Serving | None = None
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

    def view(self, item: Integration) -> IntegrationView:
        return integration_view(item, item.role in self.store.passwords(item.cache_id))

    def integrations(self) -> list[IntegrationView]:
        return [self.view(i) for i in self.store.load()]

    def _find(self, cache_id: str) -> Integration:
        try:
            return self.store.find(cache_id)
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc

    def select(self, cache_id: str, *, database: str | None = None,
               role: str | None = None) -> IntegrationView:
        try:
            return self.view(select(self.store, cache_id, database=database, role=role))
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc

    async def refresh_choices(self, cache_id: str) -> IntegrationView:
        """See Control.refresh_choices: one login to a local or URL origin, as the role whose
        password neonpoly knows (the chosen one if known, else the one it was added with)."""
        item = self._find(cache_id)
        if item.kind == "neon":
            return self.view(item)  # listed through the Neon API at Add
        passwords = self.store.passwords(item.cache_id)
        user = item.role if item.role in passwords or not passwords else next(iter(passwords))
        try:
            choices = await list_choices(
                item.origin(self.connect_to), user=user, password=passwords.get(user), database=item.database
            )
            if choices is None:
                raise ControlError(
                    f"cannot list the databases and roles of {item.origin_label}: role {user} needs a "
                    "password and neonpoly has none"
                )
            return self.view(update_choices(self.store, item.cache_id, choices.databases, choices.roles))
        except IntegrationError as exc:
            raise ControlError(str(exc)) from exc

    def connection_string(self, cache_id: str, *, reveal: bool = False) -> str:
        item = self._find(cache_id)
        host, port = self._listen()
        password = self.store.passwords(item.cache_id).get(item.role)
        return connection_string(item, host, port, password=password, reveal=reveal)

    def status(self, cache_id: str) -> CacheStatus:
        item = self._find(cache_id)
        report = self.service.report(item.cache_id).cache(item.cache_id)
        if report is None:  # not served (yet): nothing to count
            return CacheStatus(0, 0, 0, 0, 0, None, origin=item.origin_label, endpoint_state=item.endpoint_state)
        totals = report.totals
        cacheable = totals.hits + totals.misses
        return CacheStatus(
            entries=report.entries, bytes=report.bytes, connections=report.connections,
            calls=totals.calls, hits=totals.hits,
            hit_rate=totals.hits / cacheable if cacheable else None,
            origin=item.origin_label, endpoint_state=item.endpoint_state,
            freshness=Freshness(
                feed=report.change_feed,
                following=any(f.state == "live" for f in report.feeds),
                changes=sum(f.changes for f in report.feeds),
                ddl=sum(f.ddl for f in report.feeds),
                gaps=sum(f.gaps for f in report.feeds),
                last_change=max((f.last_change for f in report.feeds if f.last_change is not None), default=None),
                plane=report.plane,
                slot=", ".join(sorted({f.slot for f in report.feeds if f.slot and f.state == "live"})),
            ),
        )

    def stats(self, cache_id: str | None = None) -> StatsSnapshot:
        return self.service.stats.snapshot(cache_id)

    # -- actions -----------------------------------------------------------------------
    async def sign_in(self, api_key: str | None = None) -> SignInResult:
        key = api_key or self.api_key or environment().neon_api_key or self.store.api_key()
        if not key or self.upstream:
            self.mode = "local"
            # The origin's host:port for --upstream: "local" read as "your local PostgreSQL".
            return SignInResult("local", self._upstream_label() or "local", (DEFAULT_WORKSPACE,))
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

    def _upstream_label(self) -> str | None:
        if not self.upstream:
            return None
        try:
            return Origin.from_url(self.upstream).label
        except ValueError:  # Authorize says what is wrong with it
            return None

    async def record(self, workspace: str, progress: Progress, embedded: EmbeddedRunner) -> Integration:
        """The state-dir half of Add: discover or start the origin and record the integration
        (served by whoever serves this state dir). Raises ControlError with one line."""
        if self.mode is None:
            await self.sign_in()
        try:
            if self.mode == "neon":
                item = await add_neon(self.store, api_key=self.api_key, api_host=self.api_host,
                                      project_id=self.project_id, workspace=workspace,
                                      connect_to=self.connect_to, retry=self.retry,
                                      progress=progress)
            elif self.upstream:
                origin = url_origin(self.upstream, self.connect_to)
                role = origin.user or "postgres"
                progress(f"Checking the origin {origin.label} (role {role})")
                choices = await list_choices(origin, user=role, password=origin.password,
                                             database=origin.database or role)
                item = record_url(self.store, self.upstream, workspace=workspace,
                                  connect_to=self.connect_to,
                                  databases=choices.databases if choices else (),
                                  roles=choices.roles if choices else ())
            else:
                handle, origin = await embedded.ensure(progress)
                item = record_embedded(self.store, origin, EMBEDDED_USER, EMBEDDED_DATABASE,
                                       handle.password, workspace=workspace)
                item = await list_embedded_choices(self.store, item, origin, handle.password)
        except USER_ERRORS as exc:
            raise ControlError(str(exc)) from exc
        return item

    async def add(self, workspace: str, progress: Progress) -> IntegrationView:
        item = await self.record(workspace, progress, self.embedded)
        if item.cache_id not in self.service.routes.by_id:
            try:
                await serve_one(self.service, self.store, item, self.connect_to, self.embedded)
            except USER_ERRORS as exc:
                raise ControlError(str(exc)) from exc
        progress("Cache ready")
        return self.view(item)

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
        # The console's proxy is a full neonpoly, served as `neonpoly serve` serves: the admin
        # database too, so `neonpoly stats` and psql -d neonpoly work against it. No embedded
        # origin until Add asks for one, and no follower: this process owns the state dir.
        self._serving = await start_serving(
            self.service, self.root, connect_to=self.connect_to, embedded=self.embedded,
            embedded_when_empty=False, follow=False)
        self._running = True

    async def close(self) -> None:
        serving, self._serving = self._serving, None
        self._running = False
        if serving is not None:
            await serving.close(grace=1.0)
        await self.embedded.stop()


async def list_embedded_choices(
    store: IntegrationStore, item: Integration, origin: Origin, password: str
) -> Integration:
    """Record the embedded origin's databases and roles; best effort (Add has succeeded)."""
    try:
        choices = await list_choices(origin, user=item.role, password=password, database=item.database)
    except IntegrationError as exc:
        log.warning("cannot list the embedded origin's databases and roles: %s", exc)
        return item
    return item if choices is None else update_choices(store, item.cache_id, choices.databases, choices.roles)


def open_control(root: Path | None = None, **options: Any) -> LocalControl:
    """The factory the CLI and TUI use (keyword options as LocalControl takes them)."""
    return LocalControl(root, **options)


__all__ = ["LocalControl", "integration_view", "list_embedded_choices", "open_control"]

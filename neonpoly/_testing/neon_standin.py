"""A loopback stand-in for the Neon API v2, for the test suites (proxy, system, console).

A real HTTP server (aiohttp.web) on 127.0.0.1 with the response shapes of the real API, its
pagination quirks, 401 for a wrong key and switchable faults. The product never imports this
package (an import-linter contract says so); aiohttp comes with the `test` extra only.

aiohttp rather than starlette+uvicorn: one well-kept library that both serves inside a running
event loop (AppRunner, so `async with` works in async tests) and in its own loop on a thread,
with no second ASGI-server dependency and no signal-handler juggling.
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

from aiohttp import web

API_PREFIX = "/api/v2"
REQUEST_ID_HEADER = "x-neon-ret-request-id"
ROUTES = (
    "projects", "project", "branches", "project_endpoints", "endpoints",
    "databases", "roles", "reveal_password", "connection_uri",
)

_ADJECTIVES = ("wispy", "cool", "polished", "young", "bitter", "late", "red", "calm", "snowy")
_NOUNS = ("meadow", "darkness", "sun", "frost", "hat", "river", "sea", "glade", "cloud")
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_EPOCH = datetime(2024, 3, 1, 10, 0, 0, tzinfo=UTC)

_MESSAGES = {
    400: "bad request",
    401: "authentication required: the API key is missing or invalid",
    404: "not found",
    412: "passwords are not stored for this project",
    423: "project already has running conflicting operations, scheduling of new ones is prohibited",
    429: "too many requests",
    503: "service unavailable",
}


@dataclass
class SeedRole:
    name: str
    password: str
    protected: bool = False


@dataclass
class SeedDatabase:
    name: str
    owner: str


@dataclass
class SeedEndpoint:
    type: str = "read_write"
    state: str = "idle"
    id: str = ""
    host: str = ""


@dataclass
class SeedBranch:
    name: str
    default: bool = False
    endpoints: list[SeedEndpoint] = field(default_factory=list)
    databases: list[SeedDatabase] = field(default_factory=list)
    roles: list[SeedRole] = field(default_factory=list)
    id: str = ""


@dataclass
class SeedProject:
    name: str
    region_id: str = "aws-us-east-2"
    store_passwords: bool = True
    pg_version: int = 16
    branches: list[SeedBranch] = field(default_factory=list)
    id: str = ""

    @property
    def default_branch(self) -> SeedBranch:
        return next(b for b in self.branches if b.default)


def demo_project(
    name: str = "neonpoly-demo",
    *,
    store_passwords: bool = True,
    extra_branches: int = 0,
    region_id: str = "aws-us-east-2",
) -> SeedProject:
    """The shape the integration has to see through: a default branch with a read_write and a
    read_only endpoint, a non-default `dev` branch with its own read_write endpoint, and
    `extra_branches` endpoint-less branches to push listings past one page."""
    roles = [SeedRole("neondb_owner", "npg_Owner1pw"), SeedRole("app user", "p@ss:w/rd %1")]
    main = SeedBranch(
        "main",
        default=True,
        # read_only listed first so a client that takes "the first endpoint" is caught out.
        endpoints=[SeedEndpoint("read_only", "active"), SeedEndpoint("read_write", "idle")],
        databases=[SeedDatabase("neondb", "neondb_owner"), SeedDatabase("analytics", "app user")],
        roles=roles,
    )
    dev = SeedBranch(
        "dev",
        endpoints=[SeedEndpoint("read_write", "active")],
        databases=[SeedDatabase("neondb", "neondb_owner")],
        roles=[SeedRole("neondb_owner", "npg_DevOwnerpw")],
    )
    extras = [SeedBranch(f"feature-{n}") for n in range(1, extra_branches + 1)]
    return SeedProject(
        name, region_id=region_id, store_passwords=store_passwords, branches=[dev, main, *extras]
    )


@dataclass(frozen=True)
class Fault:
    status: int
    retry_after: float | None = None


def _stamp(offset_minutes: int) -> str:
    return (_EPOCH + timedelta(minutes=offset_minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _region_domain(region_id: str) -> str:
    # aws-us-east-2 → us-east-2.aws.neon.tech, azure-eastus2 → eastus2.azure.neon.tech
    provider, _, region = region_id.partition("-")
    return f"{region}.{provider}.neon.tech"


class NeonStandin:
    """`async with NeonStandin() as s:` in async code, `with NeonStandin() as s:` in sync code
    (the server then runs on its own thread and loop). Point NeonAPI at `s.base_url`."""

    def __init__(
        self,
        projects: Sequence[SeedProject] | None = None,
        *,
        api_key: str = "neon-standin-key",
        seed: int = 7,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        # 0 picks a free port; a fixed one lets a test bring the API up where a client
        # has already failed to connect.
        self._wanted_port = port
        self.last_headers: dict[str, str] = {}
        self.projects: list[SeedProject] = list(projects) if projects is not None else [
            demo_project()
        ]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._faults: dict[str, deque[Fault]] = {}
        self._counts: Counter[str] = Counter()
        self.request_ids: list[str] = []
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._assign_ids()

    # -- seeded state ------------------------------------------------------------------
    def _slug(self, prefix: str, tail: int, alphabet: str = _ALNUM) -> str:
        words = f"{self._rng.choice(_ADJECTIVES)}-{self._rng.choice(_NOUNS)}"
        suffix = "".join(self._rng.choice(alphabet) for _ in range(tail))
        return f"{prefix}{words}-{suffix}"

    def _assign_ids(self) -> None:
        for project in self.projects:
            if not project.id:
                project.id = self._slug("", 8, "0123456789")
            for branch in project.branches:
                if not branch.id:
                    branch.id = self._slug("br-", 8)
                for endpoint in branch.endpoints:
                    if not endpoint.id:
                        endpoint.id = self._slug("ep-", 8)
                    if not endpoint.host:
                        endpoint.host = f"{endpoint.id}.{_region_domain(project.region_id)}"

    def project(self, name_or_id: str) -> SeedProject:
        return next(p for p in self.projects if name_or_id in (p.id, p.name))

    # -- faults and counters -----------------------------------------------------------
    def fail(
        self, route: str, status: int, times: int = 1, retry_after: float | None = None
    ) -> None:
        """Answer the next `times` requests of `route` (a name in ROUTES) with `status`."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; routes: {', '.join(ROUTES)}")
        with self._lock:
            queue = self._faults.setdefault(route, deque())
            queue.extend(Fault(status, retry_after) for _ in range(times))

    def count(self, route: str) -> int:
        with self._lock:
            return self._counts[route]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.request_ids.clear()

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the stand-in is not running")
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._wanted_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start_in_thread(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the starting thread, then re-raised there
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="neon-standin", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        if self._thread is None or self._thread_loop is None:
            return
        self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._thread_loop = None

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    # -- HTTP --------------------------------------------------------------------------
    def _add_routes(self, app: web.Application) -> None:
        p = f"{API_PREFIX}/projects"
        b = f"{p}/{{project_id}}/branches/{{branch_id}}"
        app.router.add_get(p, self._projects, name="projects")
        app.router.add_get(f"{p}/{{project_id}}", self._project, name="project")
        app.router.add_get(f"{p}/{{project_id}}/branches", self._branches, name="branches")
        app.router.add_get(
            f"{p}/{{project_id}}/endpoints", self._project_endpoints, name="project_endpoints"
        )
        app.router.add_get(
            f"{p}/{{project_id}}/connection_uri", self._connection_uri, name="connection_uri"
        )
        app.router.add_get(f"{b}/endpoints", self._endpoints, name="endpoints")
        app.router.add_get(f"{b}/databases", self._databases, name="databases")
        app.router.add_get(f"{b}/roles", self._roles, name="roles")
        app.router.add_get(
            f"{b}/roles/{{role_name}}/reveal_password", self._reveal, name="reveal_password"
        )

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        route = request.match_info.route.name or "unknown"
        with self._lock:
            self._counts[route] += 1
            self.request_ids.append(request_id)
            self.last_headers = dict(request.headers)
            queue = self._faults.get(route)
            fault = queue.popleft() if queue else None
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            response: web.StreamResponse = _error(401, request_id)
        elif fault is not None:
            response = _error(fault.status, request_id)
            if fault.retry_after is not None:
                response.headers["Retry-After"] = f"{fault.retry_after:g}"
        else:
            try:
                response = await handler(request)
            except _NotFound:
                response = _error(404, request_id)
            except web.HTTPNotFound:
                response = _error(404, request_id)
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    def _find_project(self, request: web.Request) -> SeedProject:
        wanted = request.match_info["project_id"]
        for project in self.projects:
            if project.id == wanted:
                return project
        raise _NotFound

    def _find_branch(self, request: web.Request) -> tuple[SeedProject, SeedBranch]:
        project = self._find_project(request)
        wanted = request.match_info["branch_id"]
        for branch in project.branches:
            if branch.id == wanted:
                return project, branch
        raise _NotFound

    async def _projects(self, request: web.Request) -> web.StreamResponse:
        limit = _limit(request, default=10, maximum=400)
        if limit is None:
            return _error(400, "")
        cursor = request.query.get("cursor")
        start = _after([p.id for p in self.projects], cursor)
        page = self.projects[start : start + limit]
        # Like Neon: a cursor is always returned, even when nothing follows.
        next_cursor = page[-1].id if page else (cursor or "")
        body = {
            "projects": [self._project_json(i, p) for i, p in enumerate(page, start)],
            "pagination": {"cursor": next_cursor},
            "applications": {},
            "integrations": {},
        }
        return web.json_response(body)

    async def _project(self, request: web.Request) -> web.StreamResponse:
        project = self._find_project(request)
        index = self.projects.index(project)
        return web.json_response({"project": self._project_json(index, project)})

    async def _branches(self, request: web.Request) -> web.StreamResponse:
        project = self._find_project(request)
        rows = [self._branch_json(project, i, b) for i, b in enumerate(project.branches)]
        if "limit" not in request.query:
            return web.json_response({"branches": rows, "annotations": {}})
        limit = _limit(request, default=10, maximum=10000)
        if limit is None:
            return _error(400, "")
        cursor = request.query.get("cursor")
        start = _after([b.id for b in project.branches], cursor)
        page = rows[start : start + limit]
        pagination: dict[str, str] = {"sort_by": "updated_at", "sort_order": "DESC"}
        if len(page) == limit:
            pagination["next"] = page[-1]["id"]
        return web.json_response({"branches": page, "annotations": {}, "pagination": pagination})

    async def _project_endpoints(self, request: web.Request) -> web.StreamResponse:
        project = self._find_project(request)
        rows = [
            self._endpoint_json(project, branch, e)
            for branch in project.branches
            for e in branch.endpoints
        ]
        return web.json_response({"endpoints": rows})

    async def _endpoints(self, request: web.Request) -> web.StreamResponse:
        project, branch = self._find_branch(request)
        rows = [self._endpoint_json(project, branch, e) for e in branch.endpoints]
        return web.json_response({"endpoints": rows})

    async def _databases(self, request: web.Request) -> web.StreamResponse:
        _, branch = self._find_branch(request)
        rows = [
            {
                "id": 1000 + i,
                "branch_id": branch.id,
                "name": db.name,
                "owner_name": db.owner,
                "created_at": _stamp(i),
                "updated_at": _stamp(i),
            }
            for i, db in enumerate(branch.databases)
        ]
        return web.json_response({"databases": rows})

    async def _roles(self, request: web.Request) -> web.StreamResponse:
        _, branch = self._find_branch(request)
        rows = [
            {
                "branch_id": branch.id,
                "name": role.name,
                "protected": role.protected,
                "created_at": _stamp(i),
                "updated_at": _stamp(i),
            }
            for i, role in enumerate(branch.roles)
        ]
        return web.json_response({"roles": rows})

    async def _reveal(self, request: web.Request) -> web.StreamResponse:
        project, branch = self._find_branch(request)
        role = _find_role(branch, request.match_info["role_name"])
        if not project.store_passwords:
            return _error(412, "")
        return web.json_response({"password": role.password})

    async def _connection_uri(self, request: web.Request) -> web.StreamResponse:
        project = self._find_project(request)
        database = request.query.get("database_name")
        role_name = request.query.get("role_name")
        if not database or not role_name:
            return _error(400, "")
        branch_id = request.query.get("branch_id")
        branch = next(
            (b for b in project.branches if b.id == branch_id), None
        ) if branch_id else project.default_branch
        if branch is None:
            raise _NotFound
        role = _find_role(branch, role_name)
        if database not in {d.name for d in branch.databases}:
            raise _NotFound
        endpoint_id = request.query.get("endpoint_id")
        endpoint = next(
            (
                e for e in branch.endpoints
                if (e.id == endpoint_id if endpoint_id else e.type == "read_write")
            ),
            None,
        )
        if endpoint is None:
            raise _NotFound
        if not project.store_passwords:
            return _error(412, "")
        host = endpoint.host
        if request.query.get("pooled") == "true":
            host = host.replace(endpoint.id, f"{endpoint.id}-pooler", 1)
        uri = (
            f"postgresql://{quote(role.name, safe='')}:{quote(role.password, safe='')}@{host}/"
            f"{quote(database, safe='')}?sslmode=require&channel_binding=require"
        )
        return web.json_response({"uri": uri})

    # -- JSON shapes (every field the real API marks required) -------------------------
    def _project_json(self, index: int, project: SeedProject) -> dict[str, Any]:
        return {
            "id": project.id,
            "platform_id": "aws",
            "region_id": project.region_id,
            "name": project.name,
            "provisioner": "k8s-neonvm",
            "default_endpoint_settings": {
                "autoscaling_limit_min_cu": 0.25,
                "autoscaling_limit_max_cu": 2,
                "suspend_timeout_seconds": 0,
            },
            "settings": {"allowed_ips": {"ips": [], "protected_branches_only": False}},
            "pg_version": project.pg_version,
            "proxy_host": _region_domain(project.region_id),
            "branch_logical_size_limit": 3072,
            "branch_logical_size_limit_bytes": 3221225472,
            "store_passwords": project.store_passwords,
            "active_time": 3600,
            "cpu_used_sec": 900,
            "creation_source": "console",
            "history_retention_seconds": 86400,
            "created_at": _stamp(index * 60),
            "updated_at": _stamp(index * 60 + 5),
            "owner_id": "c8a4a8b6-1e5d-4c1c-9f0e-6a2b3c4d5e6f",
            "org_id": "org-calm-river-12345678",
        }

    def _branch_json(self, project: SeedProject, index: int, branch: SeedBranch) -> dict[str, Any]:
        parent = None if branch.default else project.default_branch
        return {
            "id": branch.id,
            "project_id": project.id,
            "parent_id": parent.id if parent else None,
            "parent_lsn": "0/1E8A3D0" if parent else None,
            "name": branch.name,
            "current_state": "ready",
            "state_changed_at": _stamp(index),
            "logical_size": 30408704,
            "creation_source": "console",
            "primary": branch.default,
            "default": branch.default,
            "protected": False,
            "cpu_used_sec": 0,
            "compute_time_seconds": 0,
            "active_time_seconds": 0,
            "written_data_bytes": 0,
            "data_transfer_bytes": 0,
            "created_at": _stamp(index),
            "updated_at": _stamp(index + 1),
        }

    def _endpoint_json(
        self, project: SeedProject, branch: SeedBranch, endpoint: SeedEndpoint
    ) -> dict[str, Any]:
        return {
            "host": endpoint.host,
            "id": endpoint.id,
            "project_id": project.id,
            "branch_id": branch.id,
            "autoscaling_limit_min_cu": 0.25,
            "autoscaling_limit_max_cu": 2,
            "region_id": project.region_id,
            "type": endpoint.type,
            "current_state": endpoint.state,
            "settings": {},
            "pooler_enabled": False,
            "pooler_mode": "transaction",
            "disabled": False,
            "passwordless_access": True,
            "last_active": _stamp(30),
            "creation_source": "console",
            "created_at": _stamp(0),
            "updated_at": _stamp(30),
            "proxy_host": _region_domain(project.region_id),
            "suspend_timeout_seconds": 0,
            "provisioner": "k8s-neonvm",
        }


class _NotFound(Exception):
    pass


def _find_role(branch: SeedBranch, name: str) -> SeedRole:
    for role in branch.roles:
        if role.name == name:
            return role
    raise _NotFound


def _limit(request: web.Request, default: int, maximum: int) -> int | None:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        return None
    return int(raw)


def _after(ids: Sequence[str], cursor: str | None) -> int:
    if not cursor:
        return 0
    for index, item_id in enumerate(ids):
        if item_id == cursor:
            return index + 1
    return len(ids)


def _error(status: int, request_id: str) -> web.Response:
    if status == 524:
        # Cloudflare's timeout page: HTML, not the API's JSON error.
        html = "<html><body><h1>524: A timeout occurred</h1></body></html>"
        return web.Response(status=524, text=html, content_type="text/html")
    body: dict[str, str] = {"code": "", "message": _MESSAGES.get(status, "error")}
    if request_id:
        body["request_id"] = request_id
    return web.json_response(body, status=status)

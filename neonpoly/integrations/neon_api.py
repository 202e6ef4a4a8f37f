"""Async client for the Neon API v2: the few GET routes the integration needs, typed models.

Only the engine's discovery path talks to Neon; everything is injectable (transport, base URL,
key, sleep, random source) so tests point it at the loopback stand-in in `neon_standin`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from neonpoly import __version__
from neonpoly.defaults import ENV_NEON_API_HOST, ENV_NEON_API_KEY, environment

DEFAULT_BASE_URL = "https://console.neon.tech/api/v2"
REQUEST_ID_HEADER = "x-neon-ret-request-id"
API_KEY_ENV = ENV_NEON_API_KEY
API_HOST_ENV = ENV_NEON_API_HOST

# Statuses Neon documents as safe to repeat: rate limited, locked by a running operation,
# temporarily unavailable. Anything else is an answer, not a hiccup.
RETRYABLE_STATUSES = frozenset({423, 429, 503})

Sleep = Callable[[float], Awaitable[None]]


class NeonAPIError(Exception):
    """A failed Neon API call, printable as one line by a CLI.

    `status` is 0 when no HTTP answer arrived (network failure, missing key).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        *,
        method: str = "",
        path: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.method = method
        self.path = path
        self.attempts = attempts

    def __str__(self) -> str:
        where = f" on {self.method} {self.path}" if self.method else ""
        head = f"Neon API error {self.status}" if self.status else "Neon API unreachable"
        text = " ".join(self.message.split()) or "no message"
        if self.code:
            text = f"{text} [{self.code}]"
        if self.status == 401:
            text = f"{text}; set {API_KEY_ENV} to a valid Neon API key"
        if self.attempts > 1:
            text = f"{text}; gave up after {self.attempts} attempts"
        if self.request_id:
            text = f"{text} (request id {self.request_id})"
        return f"{head}{where}: {text}"


def _str(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key)
    return value if isinstance(value, str) else default


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _bool(data: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = data.get(key)
    return value if isinstance(value, bool) else default


def _int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    # bool is an int subclass; a stray true must not become 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    region_id: str
    pg_version: int | None
    proxy_host: str
    store_passwords: bool
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Project:
        return cls(
            id=_str(data, "id"),
            name=_str(data, "name"),
            region_id=_str(data, "region_id"),
            pg_version=_int(data, "pg_version"),
            proxy_host=_str(data, "proxy_host"),
            # Older projects omit the flag; Neon's default is to store passwords.
            store_passwords=_bool(data, "store_passwords", True),
            created_at=_str(data, "created_at"),
            updated_at=_str(data, "updated_at"),
        )


@dataclass(frozen=True)
class Branch:
    id: str
    project_id: str
    name: str
    default: bool
    current_state: str
    parent_id: str | None
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Branch:
        # `primary` is the deprecated spelling of `default`; older answers carry only it.
        is_default = _bool(data, "default") or _bool(data, "primary")
        return cls(
            id=_str(data, "id"),
            project_id=_str(data, "project_id"),
            name=_str(data, "name"),
            default=is_default,
            current_state=_str(data, "current_state"),
            parent_id=_opt_str(data, "parent_id"),
            created_at=_str(data, "created_at"),
            updated_at=_str(data, "updated_at"),
        )


@dataclass(frozen=True)
class Endpoint:
    id: str
    host: str
    project_id: str
    branch_id: str
    type: str
    current_state: str
    region_id: str
    pooler_enabled: bool
    suspend_timeout_seconds: int | None
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Endpoint:
        return cls(
            id=_str(data, "id"),
            host=_str(data, "host"),
            project_id=_str(data, "project_id"),
            branch_id=_str(data, "branch_id"),
            type=_str(data, "type"),
            current_state=_str(data, "current_state"),
            region_id=_str(data, "region_id"),
            pooler_enabled=_bool(data, "pooler_enabled"),
            suspend_timeout_seconds=_int(data, "suspend_timeout_seconds"),
            created_at=_str(data, "created_at"),
            updated_at=_str(data, "updated_at"),
        )


@dataclass(frozen=True)
class Database:
    id: int | None
    branch_id: str
    name: str
    owner_name: str
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Database:
        return cls(
            id=_int(data, "id"),
            branch_id=_str(data, "branch_id"),
            name=_str(data, "name"),
            owner_name=_str(data, "owner_name"),
            created_at=_str(data, "created_at"),
            updated_at=_str(data, "updated_at"),
        )


@dataclass(frozen=True)
class Role:
    branch_id: str
    name: str
    protected: bool
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Role:
        return cls(
            branch_id=_str(data, "branch_id"),
            name=_str(data, "name"),
            protected=_bool(data, "protected"),
            created_at=_str(data, "created_at"),
            updated_at=_str(data, "updated_at"),
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. Delays double from `base_delay` up to `max_delay`, half of each is
    jittered so many clients hitting the same 429 do not come back in lockstep."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    # A server asking for a very long pause is better answered by an error than a frozen UI.
    max_retry_after: float = 60.0


def resolve_base_url(explicit: str | None = None) -> str:
    """Explicit argument, then NEON_API_HOST, then the public API (as Neon's own CLI does)."""
    url = explicit or environment().neon_api_host or DEFAULT_BASE_URL
    if "://" not in url:
        url = f"https://{url}"
    return url.rstrip("/")


def _seg(value: str) -> str:
    # Role and database names may hold spaces, slashes or '@'; they are one path segment each.
    return quote(value, safe="")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _error_from_response(response: httpx.Response, method: str, path: str) -> NeonAPIError:
    code, message, request_id = "", "", None
    try:
        body = response.json()
    except ValueError:
        # A 524 from the edge is an HTML page; show the status text, not the markup.
        body = None
    if isinstance(body, dict):
        code = _str(body, "code")
        message = _str(body, "message")
        request_id = _opt_str(body, "request_id")
    if not message:
        message = response.reason_phrase or "request failed"
    request_id = request_id or response.headers.get(REQUEST_ID_HEADER)
    return NeonAPIError(response.status_code, code, message, request_id, method=method, path=path)


class NeonAPI:
    """The Neon API v2 over one pooled httpx.AsyncClient. Use as `async with NeonAPI() as api`."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        page_limit: int = 100,
    ) -> None:
        key = api_key if api_key is not None else environment().neon_api_key or ""
        if not key:
            raise NeonAPIError(401, "missing_api_key", "no API key given")
        self.base_url = resolve_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.page_limit = page_limit
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=timeout,
            headers={
                "Authorization": f"Bearer {key}",
                "Accept": "application/json",
                "User-Agent": f"neonpoly/{__version__}",
            },
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.retry.max_delay, self.retry.base_delay * 2.0 ** (attempt - 1))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    async def _get(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        attempts = max(1, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = await self._client.get(path, params=params)
            except httpx.TransportError as exc:
                # GETs change nothing, so a dropped connection or timeout is safe to repeat.
                if last:
                    raise NeonAPIError(
                        0, "", f"{type(exc).__name__}: {exc}", None,
                        method="GET", path=path, attempts=attempt,
                    ) from exc
                await self._sleep(self._backoff(attempt))
                continue
            if response.is_success:
                try:
                    return response.json()
                except ValueError as exc:
                    raise NeonAPIError(
                        response.status_code, "", "response is not JSON",
                        response.headers.get(REQUEST_ID_HEADER), method="GET", path=path,
                    ) from exc
            error = _error_from_response(response, "GET", path)
            if response.status_code not in RETRYABLE_STATUSES or last:
                error.attempts = attempt
                raise error
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is None:
                wait = self._backoff(attempt)
            elif wait > self.retry.max_retry_after:
                error.attempts = attempt
                raise error
            await self._sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    async def list_projects(self) -> list[Project]:
        projects: list[Project] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": self.page_limit}
            if cursor:
                params["cursor"] = cursor
            body = await self._get("/projects", params)
            page = body.get("projects") or []
            projects.extend(Project.from_json(p) for p in page)
            next_cursor = _opt_str(body.get("pagination") or {}, "cursor")
            # Neon returns a cursor even on the last page, so only a short page ends the list;
            # a repeated cursor would loop forever, so treat it as the end too.
            if len(page) < self.page_limit or not next_cursor or next_cursor == cursor:
                return projects
            cursor = next_cursor

    async def get_project(self, project_id: str) -> Project:
        body = await self._get(f"/projects/{_seg(project_id)}")
        return Project.from_json(body.get("project") or {})

    async def list_branches(self, project_id: str) -> list[Branch]:
        branches: list[Branch] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": self.page_limit}
            if cursor:
                params["cursor"] = cursor
            body = await self._get(f"/projects/{_seg(project_id)}/branches", params)
            page = body.get("branches") or []
            branches.extend(Branch.from_json(b) for b in page)
            next_cursor = _opt_str(body.get("pagination") or {}, "next")
            if len(page) < self.page_limit or not next_cursor or next_cursor == cursor:
                return branches
            cursor = next_cursor

    def _branch_path(self, project_id: str, branch_id: str) -> str:
        return f"/projects/{_seg(project_id)}/branches/{_seg(branch_id)}"

    async def list_endpoints(self, project_id: str, branch_id: str) -> list[Endpoint]:
        body = await self._get(f"{self._branch_path(project_id, branch_id)}/endpoints")
        return [Endpoint.from_json(e) for e in body.get("endpoints") or []]

    async def list_project_endpoints(self, project_id: str) -> list[Endpoint]:
        """Every endpoint of the project; finds the branch of an endpoint named on its own."""
        body = await self._get(f"/projects/{_seg(project_id)}/endpoints")
        return [Endpoint.from_json(e) for e in body.get("endpoints") or []]

    async def list_databases(self, project_id: str, branch_id: str) -> list[Database]:
        body = await self._get(f"{self._branch_path(project_id, branch_id)}/databases")
        return [Database.from_json(d) for d in body.get("databases") or []]

    async def list_roles(self, project_id: str, branch_id: str) -> list[Role]:
        body = await self._get(f"{self._branch_path(project_id, branch_id)}/roles")
        return [Role.from_json(r) for r in body.get("roles") or []]

    async def reveal_password(self, project_id: str, branch_id: str, role: str) -> str:
        path = f"{self._branch_path(project_id, branch_id)}/roles/{_seg(role)}/reveal_password"
        body = await self._get(path)
        return _str(body, "password")

    async def connection_uri(
        self,
        project_id: str,
        database: str,
        role: str,
        branch_id: str | None = None,
        endpoint_id: str | None = None,
        pooled: bool = False,
    ) -> str:
        params: dict[str, str | int] = {"database_name": database, "role_name": role}
        if branch_id:
            params["branch_id"] = branch_id
        if endpoint_id:
            params["endpoint_id"] = endpoint_id
        if pooled:
            params["pooled"] = "true"
        body = await self._get(f"/projects/{_seg(project_id)}/connection_uri", params)
        return _str(body, "uri")

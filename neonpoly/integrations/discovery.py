"""Find the origin a cache sits in front of, the way the Neon PolyScale integration did.

project → default ("primary") branch → its read_write endpoint → databases and roles → role
password → origin URL. `branch` and `endpoint` are the seed's "manual setup" for other branches
and read-only endpoints, which the console integration itself never offered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from neonpoly.integrations.neon_api import Branch, Database, Endpoint, NeonAPI, NeonAPIError, Project, Role

ProgressCallback = Callable[[str], None]

ORIGIN_PORT = 5432


class DiscoveryError(Exception):
    """Discovery cannot go on without the user choosing or supplying something."""


class ProjectChoiceRequired(DiscoveryError):
    def __init__(self, projects: Sequence[Project]) -> None:
        self.projects = tuple(projects)
        listed = ", ".join(f"{p.id} ({p.name})" for p in self.projects)
        super().__init__(
            f"this Neon account has {len(self.projects)} projects; choose one with "
            f"--project: {listed}"
        )


class PasswordUnavailable(DiscoveryError):
    def __init__(self, project_id: str, role: str) -> None:
        self.project_id = project_id
        self.role = role
        super().__init__(
            f"Neon does not store the password of role {role!r} in project {project_id} "
            f"(store_passwords is off); pass it with --password"
        )


@dataclass(frozen=True)
class ProjectRef:
    id: str
    name: str
    region: str


@dataclass(frozen=True)
class BranchRef:
    id: str
    name: str


@dataclass(frozen=True)
class EndpointRef:
    id: str
    host: str
    type: str
    state: str


def build_origin_url(
    host: str, role: str, password: str, database: str, port: int = ORIGIN_PORT
) -> str:
    """`postgresql://role:pw@host:port/db?sslmode=require`, every user part URL-encoded.

    No channel_binding=require: the proxy terminates the client's connection, and binding
    cannot cross it.
    """
    user = quote(role, safe="")
    secret = quote(password, safe="")
    db = quote(database, safe="")
    return f"postgresql://{user}:{secret}@{host}:{port}/{db}?sslmode=require"


@dataclass(frozen=True)
class DiscoveredOrigin:
    project: ProjectRef
    branch: BranchRef
    endpoint: EndpointRef
    databases: tuple[str, ...]
    roles: tuple[str, ...]
    database: str
    role: str
    # Kept out of repr so that logging the origin never leaks the secret.
    password: str = field(repr=False)

    @property
    def origin_url(self) -> str:
        return build_origin_url(self.endpoint.host, self.role, self.password, self.database)


def _noop(step: str) -> None:
    return None


def _default_branch(branches: Sequence[Branch]) -> Branch:
    for candidate in branches:
        if candidate.default:
            return candidate
    raise DiscoveryError("the project has no default (primary) branch")


def _match_branch(branches: Sequence[Branch], wanted: str) -> Branch:
    for candidate in branches:
        if wanted in (candidate.id, candidate.name):
            return candidate
    names = ", ".join(f"{b.name} ({b.id})" for b in branches)
    raise DiscoveryError(f"no branch {wanted!r} in the project; branches: {names}")


def _match_endpoint(endpoints: Sequence[Endpoint], wanted: str) -> Endpoint | None:
    for candidate in endpoints:
        if wanted in (candidate.id, candidate.host):
            return candidate
    return None


def _read_write(endpoints: Sequence[Endpoint], branch: Branch) -> Endpoint:
    for candidate in endpoints:
        if candidate.type == "read_write":
            return candidate
    raise DiscoveryError(
        f"branch {branch.name} ({branch.id}) has no read_write compute endpoint; "
        f"add one in Neon or name an endpoint with --endpoint"
    )


def _choose_database(databases: Sequence[Database], wanted: str | None) -> Database:
    if not databases:
        raise DiscoveryError("the branch has no databases; create one in Neon first")
    if wanted is None:
        return databases[0]
    for candidate in databases:
        if candidate.name == wanted:
            return candidate
    names = ", ".join(d.name for d in databases)
    raise DiscoveryError(f"no database {wanted!r} on the branch; databases: {names}")


def _choose_role(roles: Sequence[Role], wanted: str | None, database: Database) -> Role:
    if not roles:
        raise DiscoveryError("the branch has no roles; create one in Neon first")
    if wanted is not None:
        for candidate in roles:
            if candidate.name == wanted:
                return candidate
        names = ", ".join(r.name for r in roles)
        raise DiscoveryError(f"no role {wanted!r} on the branch; roles: {names}")
    # The owner of the chosen database is what Neon's own connection widget preselects.
    for candidate in roles:
        if candidate.name == database.owner_name:
            return candidate
    for candidate in roles:
        if not candidate.protected:
            return candidate
    return roles[0]


async def _find_project(api: NeonAPI, project_id: str | None) -> Project:
    if project_id:
        return await api.get_project(project_id)
    projects = await api.list_projects()
    if not projects:
        raise DiscoveryError("this Neon account has no projects; create one in Neon first")
    if len(projects) > 1:
        raise ProjectChoiceRequired(projects)
    return projects[0]


async def _find_branch_and_endpoint(
    api: NeonAPI,
    project: Project,
    branch: str | None,
    endpoint: str | None,
    progress: ProgressCallback,
) -> tuple[Branch, Endpoint]:
    branches = await api.list_branches(project.id)
    if branch is not None:
        chosen = _match_branch(branches, branch)
        progress(f"Branch {chosen.name}")
    elif endpoint is not None:
        # An endpoint named on its own decides the branch: look across the whole project.
        found = _match_endpoint(await api.list_project_endpoints(project.id), endpoint)
        if found is None:
            raise DiscoveryError(f"no endpoint {endpoint!r} in project {project.id}")
        chosen = _match_branch(branches, found.branch_id)
        progress(f"Branch {chosen.name}" if not chosen.default else f"Primary branch {chosen.name}")
    else:
        chosen = _default_branch(branches)
        progress(f"Primary branch {chosen.name}")
    endpoints = await api.list_endpoints(project.id, chosen.id)
    if endpoint is not None:
        picked = _match_endpoint(endpoints, endpoint)
        if picked is None:
            raise DiscoveryError(f"no endpoint {endpoint!r} on branch {chosen.name}")
    else:
        picked = _read_write(endpoints, chosen)
    progress(f"Endpoint {picked.id} ({picked.current_state or 'unknown'})")
    return chosen, picked


async def discover(
    api: NeonAPI,
    project_id: str | None = None,
    branch: str | None = None,
    endpoint: str | None = None,
    database: str | None = None,
    role: str | None = None,
    password: str | None = None,
    progress: ProgressCallback = _noop,
) -> DiscoveredOrigin:
    """Walk the Neon API to the origin; raises DiscoveryError or NeonAPIError with a message
    meant for the user."""
    progress("Finding project")
    project = await _find_project(api, project_id)
    chosen_branch, chosen_endpoint = await _find_branch_and_endpoint(
        api, project, branch, endpoint, progress
    )
    progress("Databases and roles")
    databases, roles = await asyncio.gather(
        api.list_databases(project.id, chosen_branch.id),
        api.list_roles(project.id, chosen_branch.id),
    )
    chosen_db = _choose_database(databases, database)
    chosen_role = _choose_role(roles, role, chosen_db)
    if password is None:
        progress("Reading role password")
        try:
            password = await api.reveal_password(project.id, chosen_branch.id, chosen_role.name)
        except NeonAPIError as exc:
            if exc.status == 412:
                raise PasswordUnavailable(project.id, chosen_role.name) from exc
            raise
    return DiscoveredOrigin(
        project=ProjectRef(project.id, project.name, project.region_id),
        branch=BranchRef(chosen_branch.id, chosen_branch.name),
        endpoint=EndpointRef(
            chosen_endpoint.id,
            chosen_endpoint.host,
            chosen_endpoint.type,
            chosen_endpoint.current_state,
        ),
        databases=tuple(d.name for d in databases),
        roles=tuple(r.name for r in roles),
        database=chosen_db.name,
        role=chosen_role.name,
        password=password,
    )


@dataclass(frozen=True)
class ConnectTo:
    """A curl-style `--connect-to HOST:PORT:TO_HOST:TO_PORT` rule.

    The proxy dials (to_host, to_port) but keeps the original host for TLS SNI, which is how
    Neon's proxy picks the endpoint. Empty HOST or PORT match any; empty TO_HOST or TO_PORT
    keep the original.
    """

    host: str | None
    port: int | None
    to_host: str | None
    to_port: int | None

    def matches(self, host: str, port: int) -> bool:
        return (self.host is None or self.host.lower() == host.lower()) and (
            self.port is None or self.port == port
        )

    def target(self, host: str, port: int) -> tuple[str, int]:
        """Where to dial for (host, port); unchanged when the rule does not apply."""
        if not self.matches(host, port):
            return host, port
        return self.to_host or host, self.to_port or port


def _split_fields(spec: str) -> list[str]:
    # IPv6 literals carry colons, so a bracketed part is one field.
    parts: list[str] = []
    current = ""
    depth = 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _port(text: str, spec: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in connect-to {spec!r}")
    return int(text)


def parse_connect_to(spec: str) -> ConnectTo:
    """Parse `HOST:PORT:TO_HOST:TO_PORT` (curl's --connect-to); raises ValueError."""
    fields = _split_fields(spec.strip())
    if len(fields) != 4:
        raise ValueError(f"connect-to must be HOST:PORT:TO_HOST:TO_PORT, got {spec!r}")
    host, port, to_host, to_port = (f.strip() for f in fields)
    return ConnectTo(
        host=host.strip("[]") or None,
        port=_port(port, spec),
        to_host=to_host.strip("[]") or None,
        to_port=_port(to_port, spec),
    )

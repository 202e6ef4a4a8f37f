"""Integrations: a cache in front of one origin, as Neon's PolyScale integration made them.

State lives in the state dir: `integrations.toml` holds what was added (never a secret) and
`secrets/<cache id>.toml` (0600) holds role passwords. Everything here is headless and shared
by the CLI (`neonpoly integrations …`), `neonpoly serve` and the console's `LocalControl`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import tomli_w

from neonpoly.defaults import DEFAULT_LISTEN
from neonpoly.integrations.discovery import DiscoveredOrigin, parse_connect_to
from neonpoly.proxy.origin import Origin
from neonpoly.state import write_private

OriginKind = Literal["neon", "url", "embedded"]
Progress = Callable[[str], None]

STATE_FILE = "integrations.toml"
SECRETS_DIR = "secrets"
API_KEY_FILE = "neon-api-key"
MASK = "••••••"
DEFAULT_WORKSPACE = "default"
LOCAL_NAME = "local"
_FORMAT = 1


class IntegrationError(Exception):
    """A problem the user can fix, shown as one line (the CLI exits non-zero)."""


@dataclass(frozen=True, slots=True)
class Integration:
    """One added integration: the cache id clients name and the origin it caches."""

    cache_id: str
    name: str
    workspace: str
    kind: OriginKind
    origin_host: str
    origin_port: int
    sslmode: str
    database: str
    role: str
    databases: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    connect_to: str | None = None
    project_id: str | None = None
    project_name: str | None = None
    region: str | None = None
    branch_id: str | None = None
    branch_name: str | None = None
    endpoint_id: str | None = None
    endpoint_host: str | None = None
    endpoint_type: str | None = None
    endpoint_state: str | None = None
    created_at: str = ""

    @property
    def origin_label(self) -> str:
        return f"{self.origin_host}:{self.origin_port}"

    def origin(self, connect_to: str | None = None) -> Origin:
        """How the proxy dials this origin; `connect_to` (e.g. `serve --connect-to`) wins over
        the stored override. The host stays the TLS SNI name either way."""
        origin = Origin(host=self.origin_host, port=self.origin_port, sslmode=self.sslmode)
        spec = connect_to or self.connect_to
        if spec:
            rule = parse_connect_to(spec)
            if rule.matches(origin.host, origin.port):
                origin = origin.connecting_to(*rule.target(origin.host, origin.port))
        return origin

    def to_toml(self) -> dict[str, Any]:
        # TOML has no null: absent keys mean None.
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_toml(cls, data: dict[str, Any]) -> Integration:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except TypeError as exc:
            raise IntegrationError(f"{STATE_FILE}: malformed integration entry: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StateFile:
    integrations: tuple[Integration, ...] = ()
    listen: tuple[str, int] = DEFAULT_LISTEN
    # The serve that recorded `listen` was given --upstream: it serves that URL alone, never
    # this state dir's integrations (so `add`/`remove` change nothing it serves).
    upstream_only: bool = False


class IntegrationStore:
    """Reads and writes the state dir; writes are atomic (temp file + rename) and serialised
    across processes with a lock file, since `serve` and the CLI may touch it together."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STATE_FILE
        self.secrets_dir = self.root / SECRETS_DIR

    # -- integrations.toml -------------------------------------------------------------
    def read(self) -> StateFile:
        try:
            data = tomllib.loads(self.path.read_text())
        except FileNotFoundError:
            return StateFile()
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise IntegrationError(f"cannot read {self.path}: {exc}") from exc
        items = tuple(Integration.from_toml(d) for d in data.get("integrations", []))
        listen = DEFAULT_LISTEN
        raw = data.get("listen")
        if isinstance(raw, str) and ":" in raw:
            host, _, port = raw.rpartition(":")
            if port.isdigit():
                listen = (host, int(port))
        return StateFile(items, listen, data.get("serves") == "upstream")

    def load(self) -> list[Integration]:
        return list(self.read().integrations)

    def mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".integrations.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, state: StateFile) -> None:
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "listen": f"{state.listen[0]}:{state.listen[1]}",
            "serves": "upstream" if state.upstream_only else "state",
            "integrations": [i.to_toml() for i in state.integrations],
        }
        tmp = self.path.with_suffix(".toml.tmp")
        tmp.write_text(tomli_w.dumps(doc))
        os.replace(tmp, self.path)

    def update(self, change: Callable[[StateFile], StateFile]) -> StateFile:
        with self._locked():
            new = change(self.read())
            self._write(new)
            return new

    def put(self, integration: Integration) -> None:
        def change(state: StateFile) -> StateFile:
            kept = [i for i in state.integrations if i.cache_id != integration.cache_id]
            existing = [i.cache_id for i in state.integrations]
            if integration.cache_id in existing:
                kept.insert(existing.index(integration.cache_id), integration)
            else:
                # Checked again under the lock: two concurrent adds must not both take a name,
                # since `remove <name>` would then have to guess which cache to delete.
                refuse_taken_name(state.integrations, integration.name)
                kept.append(integration)
            return replace(state, integrations=tuple(kept))

        self.update(change)

    def delete(self, cache_id: str) -> None:
        self.update(lambda s: replace(s, integrations=tuple(i for i in s.integrations if i.cache_id != cache_id)))
        with contextlib.suppress(FileNotFoundError):
            self._secret_file(cache_id).unlink()

    def set_listen(self, host: str, port: int, *, upstream_only: bool = False) -> None:
        """Remember where `serve` listens so `connection-string` prints the right address, and
        whether it serves only its --upstream."""
        state = self.read()
        if (state.listen, state.upstream_only) != ((host, port), upstream_only):
            self.update(lambda s: replace(s, listen=(host, port), upstream_only=upstream_only))

    def find(self, cache_id: str | None) -> Integration:
        """The integration with this cache id or name, or the only one when none is named.

        A name shared by several integrations (possible in state files written before names
        were unique) is refused with their ids rather than guessed: remove deletes a cache.
        """
        items = self.load()
        if not items:
            raise IntegrationError("no integrations yet; add one with `neonpoly integrations add`")
        if cache_id is None:
            if len(items) == 1:
                return items[0]
            listed = ", ".join(f"{i.cache_id} ({i.name})" for i in items)
            raise IntegrationError(f"{len(items)} integrations; name one by cache id: {listed}")
        found = _matching(items, cache_id)
        if found is None:
            raise IntegrationError(f"no integration {cache_id!r}; see `neonpoly integrations list`")
        return found

    def resolve_cache_id(self, ref: str) -> str:
        """`ref` as a cache id: an integration's name becomes its id; anything else is returned
        unchanged, since caches without an integration (`serve --upstream`'s "default") exist."""
        found = _matching(self.load(), ref)
        return ref if found is None else found.cache_id

    # -- secrets (0600 files) ----------------------------------------------------------
    def _secret_file(self, cache_id: str) -> Path:
        return self.secrets_dir / f"{cache_id}.toml"

    def passwords(self, cache_id: str) -> dict[str, str]:
        try:
            data = tomllib.loads(self._secret_file(cache_id).read_text())
        except (FileNotFoundError, tomllib.TOMLDecodeError):
            return {}
        raw = data.get("passwords", {})
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def save_passwords(self, cache_id: str, passwords: dict[str, str]) -> None:
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        merged = {**self.passwords(cache_id), **passwords}
        write_private(self._secret_file(cache_id), tomli_w.dumps({"passwords": merged}))

    def api_key(self) -> str | None:
        try:
            return (self.secrets_dir / API_KEY_FILE).read_text().strip() or None
        except FileNotFoundError:
            return None

    def save_api_key(self, key: str) -> None:
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        write_private(self.secrets_dir / API_KEY_FILE, key + "\n")


def connection_string(
    integration: Integration,
    host: str,
    port: int,
    *,
    password: str | None,
    database: str | None = None,
    role: str | None = None,
    reveal: bool = False,
) -> str:
    """The PolyScale-style string: neonpoly's listener, the cache id as application_name.

    No channel_binding=require: the proxy terminates the client's TLS/SCRAM exchange, so a
    binding to the origin's certificate cannot survive it. With no known password (a role of
    a URL origin other than the one added) the string carries none: the client supplies it.
    """
    user = role or integration.role
    db = database or integration.database
    if password is None:
        secret = ""  # not known (another role of a URL origin): the client gives it, psql asks
    elif not reveal:
        secret = ":" + MASK
    else:
        secret = ":" + quote(password, safe="")
    where = f"[{host}]" if ":" in host else host
    return (
        f"postgres://{quote(user, safe='')}{secret}@{where}:{port}/{quote(db, safe='')}"
        f"?application_name={integration.cache_id}&sslmode=disable"
    )


def _matching(items: list[Integration], ref: str) -> Integration | None:
    # Ids first: a name that happens to equal another cache's id must not shadow that id.
    for item in items:
        if item.cache_id == ref:
            return item
    named = [i for i in items if i.name == ref]
    if len(named) > 1:
        ids = ", ".join(i.cache_id for i in named)
        raise IntegrationError(f"{len(named)} integrations are named {ref!r}; name one by cache id: {ids}")
    return named[0] if named else None


def refuse_taken_name(items: tuple[Integration, ...] | list[Integration], name: str) -> None:
    for item in items:
        if item.name == name:
            raise IntegrationError(
                f"an integration named {name!r} already exists (cache id {item.cache_id}); "
                "choose another name with --name"
            )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_unique(store: IntegrationStore, new: Integration) -> None:
    for item in store.load():
        same_origin = (item.origin_host, item.origin_port) == (new.origin_host, new.origin_port)
        if item.kind == new.kind and same_origin and item.database == new.database:
            raise IntegrationError(
                f"{item.name} ({item.cache_id}) already caches "
                f"{item.origin_label}/{item.database}; "
                f"remove it first with `neonpoly integrations remove {item.cache_id}`"
            )
    refuse_taken_name(store.load(), new.name)


def record_neon(
    store: IntegrationStore,
    found: DiscoveredOrigin,
    *,
    workspace: str = DEFAULT_WORKSPACE,
    name: str | None = None,
    connect_to: str | None = None,
    extra_passwords: dict[str, str] | None = None,
) -> Integration:
    """Persist an integration for a discovered Neon endpoint (TLS required, SNI = its host)."""
    integration = Integration(
        cache_id=str(uuid.uuid4()),
        name=name or f"{found.project.name}-{found.branch.name}",
        workspace=workspace,
        kind="neon",
        origin_host=found.endpoint.host,
        origin_port=5432,
        sslmode="require",
        database=found.database,
        role=found.role,
        databases=found.databases,
        roles=found.roles,
        connect_to=connect_to,
        project_id=found.project.id,
        project_name=found.project.name,
        region=found.project.region,
        branch_id=found.branch.id,
        branch_name=found.branch.name,
        endpoint_id=found.endpoint.id,
        endpoint_host=found.endpoint.host,
        endpoint_type=found.endpoint.type,
        endpoint_state=found.endpoint.state,
        created_at=_now(),
    )
    _check_unique(store, integration)
    secrets = {**(extra_passwords or {}), found.role: found.password}
    store.save_passwords(integration.cache_id, secrets)
    store.put(integration)
    return integration


def record_url(
    store: IntegrationStore,
    url: str,
    *,
    workspace: str = DEFAULT_WORKSPACE,
    name: str | None = None,
    connect_to: str | None = None,
    database: str | None = None,
    role: str | None = None,
    password: str | None = None,
    databases: tuple[str, ...] = (),
    roles: tuple[str, ...] = (),
) -> Integration:
    """Persist an integration for any Postgres URL (no Neon account). `databases` and `roles`
    are what the origin offers (see probe.list_choices); the chosen ones are always listed."""
    try:
        origin = Origin.from_url(url)
    except ValueError as exc:
        raise IntegrationError(str(exc)) from exc
    if connect_to:
        try:
            parse_connect_to(connect_to)
        except ValueError as exc:
            raise IntegrationError(f"--connect-to: {exc}") from exc
    chosen_role = role or origin.user or "postgres"
    chosen_db = database or origin.database or chosen_role
    integration = Integration(
        cache_id=str(uuid.uuid4()),
        name=name or default_url_name(origin.host, chosen_db),
        workspace=workspace,
        kind="url",
        origin_host=origin.host,
        origin_port=origin.port,
        sslmode=origin.sslmode,
        database=chosen_db,
        role=chosen_role,
        databases=_with(databases, chosen_db),
        roles=_with(roles, chosen_role),
        connect_to=connect_to,
        created_at=_now(),
    )
    _check_unique(store, integration)
    secret = password or origin.password
    if secret:
        store.save_passwords(integration.cache_id, {chosen_role: secret})
    store.put(integration)
    return integration


def default_url_name(host: str, database: str) -> str:
    """A readable default name for a URL origin: `<db>-local` on this machine, `<db>-10-0-0-5`
    for another address, else the host's first label (`db` for db.example.com)."""
    bare = host.strip("[]")
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return f"{database}-local" if bare == "localhost" else bare.split(".")[0]
    if address.is_loopback:
        return f"{database}-local"
    return f"{database}-" + str(address).replace(".", "-").replace(":", "-").strip("-")


def _with(listed: tuple[str, ...], chosen: str) -> tuple[str, ...]:
    """The listed names with the chosen one among them (a select must hold its value)."""
    return tuple(sorted({*listed, chosen})) if listed else (chosen,)


def record_embedded(
    store: IntegrationStore,
    origin: Origin,
    user: str,
    database: str,
    password: str,
    *,
    workspace: str = DEFAULT_WORKSPACE,
    name: str | None = None,
) -> Integration:
    """The "local" integration for the embedded origin: a stable cache id and string."""
    for item in store.load():
        if item.kind == "embedded":
            return item
    chosen = name or LOCAL_NAME
    refuse_taken_name(store.load(), chosen)
    integration = Integration(
        cache_id=str(uuid.uuid4()),
        name=chosen,
        workspace=workspace,
        kind="embedded",
        origin_host=origin.host,
        origin_port=origin.port,
        sslmode=origin.sslmode,
        database=database,
        role=user,
        databases=(database,),
        roles=(user,),
        created_at=_now(),
    )
    store.save_passwords(integration.cache_id, {user: password})
    store.put(integration)
    return integration


def select(
    store: IntegrationStore, cache_id: str, *, database: str | None = None, role: str | None = None
) -> Integration:
    """Change the chosen database/role (the Manage drawer's drop-downs)."""
    item = store.find(cache_id)
    if database is not None and item.databases and database not in item.databases:
        raise IntegrationError(f"no database {database!r}; databases: {', '.join(item.databases)}")
    if role is not None and item.roles and role not in item.roles:
        raise IntegrationError(f"no role {role!r}; roles: {', '.join(item.roles)}")
    chosen = replace(item, database=database or item.database, role=role or item.role)
    store.put(chosen)
    return chosen


def update_choices(
    store: IntegrationStore, cache_id: str, databases: tuple[str, ...], roles: tuple[str, ...]
) -> Integration:
    """Record the databases and roles the origin offers now (the chosen ones stay listed)."""
    found: list[Integration] = []

    def change(state: StateFile) -> StateFile:
        items = []
        for item in state.integrations:
            if item.cache_id == cache_id:
                item = replace(item, databases=_with(databases, item.database), roles=_with(roles, item.role))
                found.append(item)
            items.append(item)
        return replace(state, integrations=tuple(items))

    store.update(change)
    if not found:
        raise IntegrationError(f"no integration {cache_id!r}; see `neonpoly integrations list`")
    return found[0]


def forget(store: IntegrationStore, cache_id: str, cache_root: Path | None) -> Integration:
    """Remove an integration from the state dir and delete its cache directory.

    A serving process must have closed the cache's store first (ProxyService.remove_cache);
    `destroy_store_dir` refuses directories that do not look like a neonpoly cache.
    """
    from neonpoly.cache.store import destroy_store_dir

    item = store.find(cache_id)
    store.delete(item.cache_id)
    if cache_root is not None:
        try:
            destroy_store_dir(cache_root / item.cache_id)
        except (OSError, ValueError) as exc:
            raise IntegrationError(f"removed {item.name}, but its cache directory stays: {exc}") from exc
    return item


def changed_ids(old: list[Integration], new: list[Integration]) -> tuple[set[str], set[str]]:
    """(added, removed) cache ids between two reads of the state file."""
    before = {i.cache_id for i in old}
    after = {i.cache_id for i in new}
    return after - before, before - after

"""`neonpoly integrations add|list|remove` and `neonpoly connection-string`.

The lead's cli.py wires these in: `register(subparsers)` adds the parsers, and for a command
in `COMMANDS` it runs `await dispatch(args)`. User mistakes leave as `neonpoly.cli.running.CLIError`
(one line, exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from neonpoly.cli.admin import nonempty, nonempty_path
from neonpoly.cli.running import CLIError
from neonpoly.defaults import ADMIN_DATABASE, LOCALHOST, environment
from neonpoly.integrations.probe import OriginCheckError, OriginChoices
from neonpoly.integrations.store import (
    DEFAULT_WORKSPACE,
    Integration,
    IntegrationError,
    IntegrationStore,
    connection_string,
    forget,
)

if TYPE_CHECKING:
    from neonpoly.admin.client import AdminClient
    from neonpoly.control.serving import EmbeddedRunner

COMMANDS = ("integrations", "connection-string")


def register(subparsers: Any) -> None:
    """Add the integration commands to cli.py's `add_subparsers()` object."""
    # Most options fall back to a default (or --upstream "" to another kind of origin) when
    # falsy, so an empty value, typically an unset shell variable, is refused instead.
    text = nonempty("omit the option for its default")
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        type=nonempty_path,
        metavar="DIR",
        help="neonpoly's state (default: platform data dir, or $NEONPOLY_STATE_DIR)",
    )

    integ = subparsers.add_parser(
        "integrations",
        help="add, list or remove PolyScale-style integrations (caches)",
        description="An integration is a cache in front of one origin; clients pick it with "
        "application_name=<cache id> in the connection string.",
    )
    verbs = integ.add_subparsers(dest="integrations_command", metavar="ACTION", required=True)

    add = verbs.add_parser(
        "add",
        parents=[state],
        help="create a cache for a Neon project, a Postgres URL, or the embedded origin",
        description="With NEON_API_KEY set: discover the project's primary branch and its "
        "read_write endpoint (as the Neon console integration did). With --upstream: cache any "
        "Postgres. With neither: cache an embedded PostgreSQL started in the state dir.",
    )
    add.add_argument("--project", type=text, metavar="ID", help="Neon project id (needed when the account has several)")
    add.add_argument(
        "--workspace",
        type=text,
        default=DEFAULT_WORKSPACE,
        metavar="W",
        help=f"the workspace the integration is listed under (default: {DEFAULT_WORKSPACE})",
    )
    add.add_argument(
        "--name",
        type=text,
        metavar="NAME",
        help="cache name, unique in the state dir (default: <project>-<branch>; for a URL the host's first "
        "label, or <database>-local on this machine; local for the embedded origin)",
    )
    add.add_argument("--branch", type=text, metavar="B", help="a branch other than the primary (manual setup)")
    add.add_argument("--endpoint", type=text, metavar="E", help="a specific endpoint, e.g. a read_only one")
    add.add_argument("--database", type=text, metavar="D", help="database for the connection string")
    add.add_argument("--role", type=text, metavar="R", help="role for the connection string")
    add.add_argument("--password", type=text, metavar="PW", help="the role's password when Neon does not store it")
    add.add_argument("--upstream", type=text, metavar="URL", help="any Postgres URL instead of Neon")
    add.add_argument(
        "--no-check",
        action="store_true",
        help="with --upstream: record the URL without logging in to the origin first (an origin that is "
        "down now, or a role whose password its clients give)",
    )
    add.add_argument(
        "--connect-to",
        type=text,
        metavar="HOST:PORT:TO_HOST:TO_PORT",
        help="dial TO_HOST:TO_PORT for HOST:PORT, TLS SNI stays HOST (like curl)",
    )
    add.add_argument("--api-host", type=text, metavar="URL", help="Neon API base URL (or $NEON_API_HOST)")

    listing = verbs.add_parser("list", parents=[state], help="show the integrations", description="The "
                               "integrations of the state dir: name, cache id, origin, database and role.")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    remove = verbs.add_parser(
        "remove",
        parents=[state],
        help="delete a cache and end its connections",
        description="Deletes the cache and its entries. When a `neonpoly serve` runs on the state dir, "
        "waits (up to a few seconds) until it has ended every connection using the cache (57P01) and "
        "refuses the old connection string, then says how many connections it ended.",
    )
    remove.add_argument(
        "cache_id", nargs="?", type=text, metavar="CACHE_ID", help="cache id or name (optional with one integration)"
    )
    remove.add_argument(
        "--cache-dir", type=nonempty_path, metavar="DIR", help="where entries persist (default: <state dir>/cache)"
    )

    conn = subparsers.add_parser(
        "connection-string",
        parents=[state],
        help="print the connection string of a cache",
        description="The PolyScale-style string: neonpoly's listener, the cache id as "
        "application_name. The password is hidden unless --reveal.",
    )
    conn.add_argument(
        "cache_id", nargs="?", type=text, metavar="CACHE_ID", help="cache id or name (optional with one integration)"
    )
    where = conn.add_mutually_exclusive_group()
    where.add_argument(
        "--database",
        type=text,
        metavar="D",
        help="another database of the origin (`integrations list --json` lists them)",
    )
    where.add_argument(
        "--admin",
        action="store_true",
        help="the string of neonpoly's admin database instead (psql it, then SHOW STATS, SHOW QUERIES, "
        "PURGE ALL …): same role and password, which the origin checks",
    )
    conn.add_argument(
        "--role",
        type=text,
        metavar="R",
        help="another role; when neonpoly does not know its password the string carries none (psql asks)",
    )
    conn.add_argument("--reveal", action="store_true", help="show the password")
    conn.add_argument(
        "--listen", type=text, metavar="HOST:PORT", help="neonpoly's address (default: where `serve` last listened)"
    )


def _user_error(message: str) -> Exception:
    return CLIError(message)


async def dispatch(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one integration command; returns the exit status."""
    from neonpoly.control.serving import USER_ERRORS
    from neonpoly.state import state_dir

    stream = out or sys.stdout
    store = IntegrationStore(state_dir(getattr(args, "state_dir", None)))
    try:
        if args.command == "connection-string":
            return _connection_string(store, args, stream)
        action = args.integrations_command
        if action == "add":
            return await _add(store, args, stream)
        if action == "list":
            return _list(store, args, stream)
        if action == "remove":
            return await _remove(store, args, stream)
    except USER_ERRORS as exc:
        raise _user_error(" ".join(str(exc).split())) from exc
    raise _user_error(f"unknown command {args.command}")


def _progress(step: str) -> None:
    print(f"  … {step}", file=sys.stderr, flush=True)


async def _add(store: IntegrationStore, args: argparse.Namespace, out: TextIO) -> int:

    from neonpoly.control.local import list_embedded_choices
    from neonpoly.control.serving import EmbeddedRunner
    from neonpoly.integrations.embedded_origin import EMBEDDED_DATABASE, EMBEDDED_USER
    from neonpoly.integrations.neon_api import API_KEY_ENV
    from neonpoly.integrations.neon_flow import add_neon
    from neonpoly.integrations.store import record_embedded, record_url, refuse_taken_name

    runner: EmbeddedRunner | None = None  # set when this command starts (or finds) the embedded cluster
    if args.name:
        # Before any API call or embedded start: a taken name fails the add anyway.
        refuse_taken_name(store.load(), args.name)
    if args.upstream:
        choices = None if args.no_check else await _check_upstream(args)
        item = record_url(
            store,
            args.upstream,
            workspace=args.workspace,
            name=args.name,
            connect_to=args.connect_to,
            database=args.database,
            role=args.role,
            password=args.password,
            databases=choices.databases if choices else (),
            roles=choices.roles if choices else (),
        )
    elif environment().neon_api_key:
        if args.connect_to:
            from neonpoly.integrations.discovery import parse_connect_to

            parse_connect_to(args.connect_to)  # fail before any API call on a typo
        item = await add_neon(
            store,
            api_host=args.api_host,
            project_id=args.project,
            branch=args.branch,
            endpoint=args.endpoint,
            database=args.database,
            role=args.role,
            password=args.password,
            workspace=args.workspace,
            name=args.name,
            connect_to=args.connect_to,
            progress=_progress,
        )
    else:
        if args.project or args.branch or args.endpoint:
            raise IntegrationError(f"--project/--branch/--endpoint need {API_KEY_ENV} set to a Neon API key")
        # Before touching the cluster: "starting" it adopts the postmaster of a serve running on
        # this state dir, and stopping it afterwards left that serve without its origin.
        _refuse_second_embedded(store)
        runner = EmbeddedRunner(store.root)
        try:
            handle, origin = await runner.ensure(_progress)
            item = record_embedded(
                store,
                origin,
                EMBEDDED_USER,
                EMBEDDED_DATABASE,
                handle.password,
                workspace=args.workspace,
                name=args.name,
            )
            item = await list_embedded_choices(store, item, origin, handle.password)
        except BaseException:
            await _release_embedded(store, runner, served=False)
            raise
    try:
        served, taken = await _pickup(store, item)
    except BaseException:
        if runner is not None:
            await _release_embedded(store, runner, served=False)
        raise
    cluster = await _release_embedded(store, runner, served=taken) if runner is not None else ""
    host, port = store.read().listen
    where = item.origin_label
    if item.kind == "neon":
        where += (
            f" (project {item.project_name} {item.project_id}, branch {item.branch_name}, "
            f"endpoint {item.endpoint_id} {item.endpoint_state})"
        )
    hidden = " (--reveal shows the password)" if store.passwords(item.cache_id).get(item.role) else ""
    print(
        f"Added integration {item.name}\n"
        f"  cache id    {item.cache_id}\n"
        f"  origin      {where}\n"
        f"  database    {item.database}   role {item.role}\n"
        f"  served      {served}\n{cluster}"
        f"Connection string{hidden}:\n"
        f"  {_string(store, item, host, port, reveal=False)}",
        file=out,
    )
    return 0


def _refuse_second_embedded(store: IntegrationStore) -> None:
    """The state dir has one embedded origin, and one integration for it."""
    for item in store.load():
        if item.kind == "embedded":
            raise IntegrationError(
                f"the embedded PostgreSQL already has its integration {item.name!r} ({item.cache_id}); "
                f"`neonpoly connection-string {item.name}` prints its string"
            )


async def _pickup(store: IntegrationStore, item: Integration) -> tuple[str, bool | None]:
    """Whether the neonpoly serving the state dir took the new integration: a `serve` that
    follows the state dir does within a second; one given --upstream never does, and saying
    "picks it up" then sent users to a string it refused. Also True/None/False: served, never
    will be (no serve, or one serving its --upstream), unknown."""
    from neonpoly.admin.client import AdminClientError
    from neonpoly.control.attached import FOLLOW_TIMEOUT, admin_client, find_running

    running = find_running(store.root)
    if running is None:
        return "not yet: no neonpoly serves this state dir; `neonpoly serve` will", None
    who = f"neonpoly (pid {running.pid}) at {running.where}"
    if running.upstream_only:
        return f"no: {who} serves only its --upstream; restart it without --upstream to serve this", None
    client = admin_client(running.address, store.root)
    try:
        served = await wait_served(client, item.cache_id, FOLLOW_TIMEOUT)
    except AdminClientError as exc:
        return f"unknown: {who} did not say ({exc.message})", False
    finally:
        await client.close()
    if served is None:
        return f"no: {who} serves only its --upstream; restart it without --upstream to serve this", None
    if not served:
        return f"not within {FOLLOW_TIMEOUT:g}s by {who} (a console does not follow the state dir)", False
    return f"now, by {who}", True


async def _release_embedded(store: IntegrationStore, runner: EmbeddedRunner, *, served: bool | None) -> str:
    """Stop the embedded cluster this command started, unless a running neonpoly now uses it;
    never one it found running while a neonpoly runs on the state dir (that serve started or
    adopted it, and stopping it would leave the serve without its origin). `served` is what
    `_pickup` learnt: None means no serve will take the integration. One line: what was done."""
    from neonpoly.control.attached import find_running

    handle = runner.handle
    if handle is None:
        return ""
    pid, running = handle.pid, find_running(store.root)
    if running is not None and (handle.adopted or served is not None):
        runner.handle = runner.origin = None  # forget it without stopping it
        why = "it was already running for" if handle.adopted else "started by this command for"
        return f"  embedded    PostgreSQL (pid {pid}) left running: {why} neonpoly (pid {running.pid})\n"
    await runner.stop()
    return "  embedded    PostgreSQL stopped again: no neonpoly uses it; `neonpoly serve` starts it\n"


async def wait_served(client: AdminClient, cache_id: str, timeout: float) -> bool | None:
    """Poll until the proxy serves `cache_id` (SHOW CACHES); False after `timeout`, None at
    once when it serves an explicit upstream (its cache "default"), which never follows the
    state dir. Raises AdminClientError when the proxy cannot answer."""
    from neonpoly.admin.client import AdminRefused

    deadline = time.monotonic() + timeout
    while True:
        try:
            caches = {r["cache"] for r in (await client.run("SHOW CACHES")).dicts()}
        except AdminRefused:
            # The login is checked by the origin of the cache it names, the new one: a serve that
            # has not taken it yet (or serves nothing, its last integration removed) refuses it.
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        if cache_id in caches:
            return True
        if "default" in caches:
            return None
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def _check_upstream(args: argparse.Namespace) -> OriginChoices | None:
    """Log in to the URL's origin as the integration will (role, database, password), so a
    typo fails the add instead of every client later; lists what the origin offers."""
    from neonpoly.integrations.probe import list_choices, url_origin

    origin = url_origin(args.upstream, args.connect_to)
    role = args.role or origin.user or "postgres"
    database = args.database or origin.database or role
    _progress(f"Checking the origin {origin.label} (role {role}, database {database})")
    try:
        choices = await list_choices(origin, user=role, password=args.password or origin.password, database=database)
    except OriginCheckError as exc:
        raise OriginCheckError(f"{exc}; nothing added (--no-check adds it anyway)") from exc
    if choices is None:
        _progress(f"The origin answers; role {role} needs a password, which its clients will give (not checked)")
    return choices


def _string(
    store: IntegrationStore,
    item: Integration,
    host: str,
    port: int,
    *,
    reveal: bool,
    database: str | None = None,
    role: str | None = None,
) -> str:
    password = store.passwords(item.cache_id).get(role or item.role)
    return connection_string(item, host, port, password=password, database=database, role=role, reveal=reveal)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _list(store: IntegrationStore, args: argparse.Namespace, out: TextIO) -> int:
    items = store.load()
    if args.json:
        # to_toml() never holds a secret: passwords live in secrets/*.toml only.
        json.dump([i.to_toml() for i in items], out, indent=2)
        out.write("\n")
        return 0
    if not items:
        print("No integrations. Add one with `neonpoly integrations add`.", file=out)
        return 0
    rows = [["NAME", "KIND", "ORIGIN", "ENDPOINT", "DATABASE", "ROLE", "WORKSPACE", "CACHE ID"]]
    for i in items:
        endpoint = f"{i.endpoint_id} ({i.endpoint_state})" if i.endpoint_id else "-"
        rows.append([i.name, i.kind, i.origin_label, endpoint, i.database, i.role, i.workspace, i.cache_id])
    print(_table(rows), file=out)
    return 0


async def _remove(store: IntegrationStore, args: argparse.Namespace, out: TextIO) -> int:
    """Forget the integration; when a neonpoly serves the state dir, wait until it let the
    cache go (it ends the connections and deletes the files it holds open)."""
    from neonpoly.admin.client import AdminClientError
    from neonpoly.control.attached import admin_client, cache_connections, find_running, wait_unserved
    from neonpoly.defaults import REMOVE_CONFIRM_TIMEOUT

    item = store.find(args.cache_id)
    running = find_running(store.root)
    if running is None:
        forget(store, item.cache_id, args.cache_dir or store.root / "cache")
        print(
            f"Removed integration {item.name}: its cache entries and directory are deleted. No neonpoly "
            f"is serving {store.root}, so there were no connections to end.",
            file=out,
        )
        return 0
    who = f"neonpoly (pid {running.pid}) at {running.where}"
    if running.upstream_only:
        # A `serve --upstream` serves that URL alone: it never opened this cache (its login
        # would not even be this integration's), so the files are deleted here.
        forget(store, item.cache_id, args.cache_dir or store.root / "cache")
        print(
            f"Removed integration {item.name}: its cache entries and directory are deleted. {who} serves only "
            f"its --upstream and never served {item.name}: it is unaffected, its connections stay.",
            file=out,
        )
        return 0
    client = admin_client(running.address, store.root)
    try:
        try:
            before = await cache_connections(client, item.cache_id)
        except AdminClientError as exc:
            forget(store, item.cache_id, None)
            raise CLIError(f"removed {item.name} from the state dir, but cannot confirm that {who} let it go: "
                           f"{exc.message}") from exc
        forget(store, item.cache_id, None)  # the serving process deletes the files it holds open
        try:
            gone = await wait_unserved(client, item.cache_id, REMOVE_CONFIRM_TIMEOUT)
        except AdminClientError as exc:
            raise CLIError(f"removed {item.name} from the state dir, but cannot confirm that {who} let it go: "
                           f"{exc.message}") from exc
    finally:
        await client.close()
    if not gone:
        raise CLIError(
            f"removed {item.name} from the state dir, but {who} still serves it after "
            f"{REMOVE_CONFIRM_TIMEOUT:g}s (a console does not follow the state dir: remove it there)"
        )
    print(
        f"Removed integration {item.name}: {who} ended {before} connection{'' if before == 1 else 's'} "
        "and deleted its cache entries; the old connection string is refused.",
        file=out,
    )
    return 0


def _connection_string(store: IntegrationStore, args: argparse.Namespace, out: TextIO) -> int:
    item = store.find(args.cache_id)
    if args.listen:
        host, _, port_text = args.listen.rpartition(":")
        if not port_text.isdigit():
            raise IntegrationError(f"--listen must be HOST:PORT, got {args.listen!r}")
        host, port = host or LOCALHOST, int(port_text)
    else:
        host, port = store.read().listen
    if args.database and item.databases and args.database not in item.databases:
        raise IntegrationError(f"no database {args.database!r}; databases: {', '.join(item.databases)}")
    if args.role and item.roles and args.role not in item.roles:
        raise IntegrationError(f"no role {args.role!r}; roles: {', '.join(item.roles)}")
    database = ADMIN_DATABASE if args.admin else args.database
    print(_string(store, item, host, port, reveal=args.reveal, database=database, role=args.role), file=out)
    role = args.role or item.role
    if role not in store.passwords(item.cache_id):
        print(f"neonpoly: no password is stored for role {role}: the string carries none; psql asks for it",
              file=sys.stderr)
    if not args.listen and not args.admin:
        from neonpoly.control.attached import find_running

        running = find_running(store.root)
        if running is not None and running.upstream_only:
            print(f"neonpoly: the neonpoly at {running.where} (pid {running.pid}) serves only its --upstream and "
                  "refuses this string; restart it without --upstream to serve it", file=sys.stderr)
    return 0

"""`neonpoly stats | queries | purge | rules` — clients of a running neonpoly's admin console.

They connect with asyncpg to the database `neonpoly` on the proxy's listener, so the CLI,
psql and scripts all see exactly the same answers. `--json` prints rows as a JSON array.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from neonpoly.admin.client import (
    AdminClient,
    AdminClientError,
    AdminRefused,
    AdminUnreachable,
    Answer,
    quote_ident,
)
from neonpoly.cli.args import host_port
from neonpoly.cli.tables import NOT_APPLICABLE, number, render_table
from neonpoly.defaults import DEFAULT_LISTEN_TEXT, ENV_ADMIN_PASSWORD, ENV_ADMIN_USER, TEXT_WIDTH

COMMANDS = ("stats", "queries", "purge", "rules")
DEFAULT_ADMIN = DEFAULT_LISTEN_TEXT

SqlBuilder = Callable[[argparse.Namespace], str]

# A table written the way SQL spells one: unquoted or "quoted" parts, optionally schema-qualified.
_SQL_NAME = re.compile(r'(?:[A-Za-z_][\w$]*|"(?:[^"]|"")+")(?:\.(?:[A-Za-z_][\w$]*|"(?:[^"]|"")+"))*')


def nonempty(instead: str) -> Callable[[str], str]:
    """An argparse type refusing "" (and blanks): several options mean "everything" when
    absent, so an empty value from a script's unset variable must not silently mean that too."""

    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"empty value; {instead}")
        return text

    return check


def nonempty_path(text: str) -> Path:
    # Path("") is the current directory: state would silently land wherever the shell is.
    return Path(nonempty("give a directory, or omit the option for the default")(text))


def _ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, not {text!r}")
    return value


def _template_arg(text: str) -> str:
    """A template id as `neonpoly queries` prints it (16 hex digits): anything else matches
    nothing, so a purge would remove 0 entries and a rule would never apply, both silently."""
    value = nonempty("give a template id from `neonpoly queries`")(text).strip()
    if not re.fullmatch(r"[0-9a-fA-F]{16}", value):
        raise argparse.ArgumentTypeError(f"not a template id: {text!r} (16 hex digits; `neonpoly queries` lists them)")
    return value


def _for_cache(args: argparse.Namespace) -> str:
    return f" FOR CACHE {quote_ident(args.cache)}" if getattr(args, "cache", None) else ""


def _table(name: str) -> str:
    # Written as SQL (Items, public.items, "MyTab"), the name is reduced to the spelling the
    # classifier tags entries with (unquoted folds to lower case, schema dropped) before quoting;
    # anything else ("My Tab", a"b) can only be a literal table name and is quoted as given.
    from neonpoly.cache.rules import normalize_table

    text = name.strip()
    return quote_ident(normalize_table(text) if _SQL_NAME.fullmatch(text) else text)


def _purge_sql(args: argparse.Namespace) -> str:
    if args.table is not None:
        return f"PURGE TABLE {_table(args.table)}{_for_cache(args)}"
    if args.query is not None:
        return f"PURGE QUERY {quote_ident(args.query.strip())}{_for_cache(args)}"
    return f"PURGE ALL{_for_cache(args)}"


def _rules_sql(args: argparse.Namespace) -> str:
    action = getattr(args, "rules_action", None) or "list"
    if action == "list":
        return f"SHOW RULES{_for_cache(args)}"
    if action == "add":
        target = f"TABLE {_table(args.table)}" if args.table is not None else f"QUERY {quote_ident(args.query.strip())}"
        what = "NEVER" if args.never else f"TTL {args.ttl:g}"
        return f"CREATE RULE ON {target} {what}{_for_cache(args)}"
    if action == "drop":
        return f"DROP RULE {quote_ident(args.rule_id.strip())}"
    if args.mode is None:
        return f"SHOW CACHES{_for_cache(args)}"  # `rules mode` alone: the mode in force
    return f"SET MODE {args.mode}{_for_cache(args)}"


_TALKS = (
    "It talks to a running neonpoly (`neonpoly serve` or the console) through its admin database "
    "`neonpoly` on the proxy's listener, so psql 'postgres://…/neonpoly' sees the same answers. "
    "Without --admin it uses the address `serve` recorded in the state dir, else "
    f"{DEFAULT_ADMIN}. --cache takes a cache id or an integration name."
)
DESCRIPTIONS = {
    "stats": "Cache totals per cache and overall: calls, hits, misses, pass-throughs, hit rate, "
    f"time saved, entries, bytes and connections (SHOW STATS). {_TALKS} Example: neonpoly stats --cache local",
    "queries": "One row per query template: its id, calls, hits, latency with and without the "
    f"cache, and the TTL in force (SHOW QUERIES). {_TALKS} Example: neonpoly queries --json",
    "purge": "Drop cached entries now: every entry, or only those that read --table T, or only "
    "those of one query template (--query ID, from `neonpoly queries`); the next run of a purged "
    f"query goes to the origin. {_TALKS} Example: neonpoly purge --table orders",
    "rules": "List, add and drop cache rules (a fixed TTL or never-cache for a table or a query "
    "template) and set the mode: auto learns a TTL per template, fixed uses the configured TTL (serve "
    f"--ttl), off caches only what a TTL rule names. {_TALKS} Example: neonpoly rules add --table orders --ttl 5",
}


def register(subparsers: Any) -> None:
    """Add the admin commands to `neonpoly`'s subparsers (argparse _SubParsersAction)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="the running neonpoly's listener (default: where `serve` last listened, per the state dir; "
        f"else {DEFAULT_ADMIN})",
    )
    common.add_argument(
        "--state-dir",
        type=nonempty_path,
        metavar="DIR",
        help="neonpoly's state, for the default --admin and --cache names "
        "(default: platform data dir, or $NEONPOLY_STATE_DIR)",
    )
    common.add_argument(
        "--user",
        type=nonempty("omit --user for the default role"),
        default=None,
        metavar="ROLE",
        help=f"admin role (default ${ENV_ADMIN_USER}, else the role of an integration whose password "
        "the state dir holds, else your OS user)",
    )
    common.add_argument(
        "--password",
        type=nonempty(f"omit --password to use ${ENV_ADMIN_PASSWORD}"),
        default=None,
        metavar="PW",
        help=f"neonpoly's admin password if the serve has one (default ${ENV_ADMIN_PASSWORD}), else the "
        "role's password on the origin (default: the integration's, from the state dir)",
    )
    common.add_argument("--json", action="store_true", help="print rows as a JSON array")
    common.add_argument(
        "--wide", action="store_true", help=f"every column, in full (default: fit {TEXT_WIDTH} columns)"
    )
    common.add_argument(
        "--cache",
        type=nonempty("omit --cache for every cache"),
        metavar="ID|NAME",
        help="only this cache: a cache id or an integration name",
    )
    table = nonempty("name a table")
    template = _template_arg

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, parents=[common], help=help_text, description=DESCRIPTIONS[name]
        )
        return parser

    stats = command("stats", "cache totals (SHOW STATS)")
    stats.set_defaults(admin_sql=lambda a: f"SHOW STATS{_for_cache(a)}")
    queries = command("queries", "per query template: calls, hits, latency, TTL (SHOW QUERIES)")
    queries.set_defaults(admin_sql=lambda a: f"SHOW QUERIES{_for_cache(a)}")
    purge = command("purge", "drop cached entries")
    which = purge.add_mutually_exclusive_group()
    which.add_argument("--table", type=table, metavar="T", help="only entries that read table T")
    which.add_argument("--query", type=template, metavar="ID", help="only entries of this template id")
    purge.set_defaults(admin_sql=_purge_sql)

    rules = command("rules", "list, add and drop cache rules; set the mode")
    rules.set_defaults(admin_sql=_rules_sql)
    actions = rules.add_subparsers(dest="rules_action", metavar="ACTION")
    actions.add_parser("list", parents=[common], help="list rules (default)")
    add = actions.add_parser("add", parents=[common], help="add a rule")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--table", type=table, metavar="T", help="the rule covers every query reading table T")
    target.add_argument("--query", type=template, metavar="ID", help="template id (see `neonpoly queries`)")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--ttl", type=_ttl, metavar="SECONDS", help="cache for at most this long")
    what.add_argument("--never", action="store_true", help="never cache")
    drop = actions.add_parser(
        "drop",
        parents=[common],
        help="drop a rule",
        description="Drop a cache rule by its id (the `id` column of `neonpoly rules`); its table or "
        "template is cached by the mode's TTL again. Example: neonpoly rules drop r1",
    )
    drop.add_argument(
        "rule_id", type=nonempty("give a rule id from `neonpoly rules`"), metavar="ID", help="the rule's id, e.g. r1"
    )
    mode = actions.add_parser(
        "mode", parents=[common], help="show the mode, or set it: auto (learned TTL), fixed or off"
    )
    mode.add_argument(
        "mode",
        nargs="?",
        choices=("auto", "fixed", "off"),
        help="auto learns a TTL per template, fixed uses serve's --ttl, off caches only what a TTL rule "
        "names; without it, show the mode of each cache",
    )


def _admin_target(args: argparse.Namespace) -> tuple[tuple[str, int], str | None, dict[str, str]]:
    """Where to connect, the cache id, and the integrations' names by cache id, from the state
    dir unless given on the command line."""
    from neonpoly.control.attached import dialable
    from neonpoly.integrations.store import IntegrationStore
    from neonpoly.state import state_dir

    store = IntegrationStore(state_dir(getattr(args, "state_dir", None)))
    names = {i.cache_id: i.name for i in store.load()}
    cache = getattr(args, "cache", None)
    if cache is not None:
        cache = store.resolve_cache_id(cache)
    if args.admin is not None:
        return args.admin, cache, names
    return dialable(store.read().listen), cache, names


def _why_unreachable(exc: AdminUnreachable, args: argparse.Namespace) -> AdminClientError:
    """A refused default address most often means no serve runs on this state dir (another
    --state-dir, or none started yet): say which state dir was looked at."""
    from neonpoly.control.attached import find_running
    from neonpoly.state import state_dir

    if exc.hint is not None or args.admin is not None:
        return exc
    root = state_dir(getattr(args, "state_dir", None))
    if find_running(root) is not None:
        return exc
    return AdminUnreachable(
        exc.message,
        f"no neonpoly serves the state dir {root}: start `neonpoly serve`, or give its --state-dir or --admin",
    )


def _print_error(exc: AdminClientError) -> None:
    # One line, the hint after the message: what went wrong and what to do, greppable together.
    print(f"neonpoly: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), file=sys.stderr)


async def dispatch(args: argparse.Namespace) -> int:
    """Run one admin command; 0 on success, 1 for an error answer, 2 if unreachable."""
    from neonpoly.control.attached import admin_client
    from neonpoly.integrations.store import IntegrationError
    from neonpoly.state import state_dir

    try:
        address, args.cache, names = _admin_target(args)
    except IntegrationError as exc:
        print(f"neonpoly: {exc}", file=sys.stderr)
        return 2
    sql: str = args.admin_sql(args)
    client = admin_client(address, state_dir(getattr(args, "state_dir", None)), user=args.user, password=args.password)
    try:
        answer = await client.run(sql)
    except AdminUnreachable as exc:
        _print_error(_why_unreachable(exc, args))
        return 2
    except AdminRefused as exc:
        _print_error(exc)
        return 2
    except AdminClientError as exc:
        if exc.sqlstate == "42704" and args.cache and exc.message.startswith("no cache "):
            exc = await _name_the_caches(client, exc, names)
        elif exc.sqlstate == "42704" and exc.message.startswith("no rule "):
            exc = await _name_the_rules(client, exc)
        _print_error(exc)
        return 1
    finally:
        await client.close()
    if args.json:
        rows = [_named(row, names) for row in answer.dicts()]
        print(json.dumps(rows if answer.columns else {"status": answer.tag}, default=_json_default, indent=2))
    else:
        print(present(args, answer, names))
    return 0


async def _name_the_caches(client: AdminClient, exc: AdminClientError, names: dict[str, str]) -> AdminClientError:
    """`--cache nope`: one line naming what the running neonpoly does serve, by the names
    --cache takes (the server's hint, SHOW CACHES, means nothing outside psql)."""
    try:
        served = [r["cache"] for r in (await client.run("SHOW CACHES")).dicts()]
    except AdminClientError:
        return exc
    listed = ", ".join(f"{names[c]} ({c})" if c in names else c for c in served) or "none"
    return AdminClientError(f"{exc.message}; --cache takes one of: {listed}")


async def _name_the_rules(client: AdminClient, exc: AdminClientError) -> AdminClientError:
    """`rules drop r99`: one line with the rule ids there are (not a statement for psql)."""
    try:
        ids = [str(r["id"]) for r in (await client.run("SHOW RULES")).dicts()]
    except AdminClientError:
        return exc
    what = f"the rules are {', '.join(ids)} (`neonpoly rules list`)" if ids else "there are no rules"
    return AdminClientError(f"{exc.message.partition(' (')[0]}; {what}")


def _named(row: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A JSON row with the integration's name next to its cache id."""
    if "cache" not in row:
        return row
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[key] = value
        if key == "cache":
            out["cache_name"] = names.get(value, value) if isinstance(value, str) else value
    return out


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# What the text output shows when not --wide: (column, heading), the flexible column last.
NARROW = {
    "stats": (
        ("cache", "cache"), ("calls", "calls"), ("hits", "hits"), ("misses", "misses"),
        ("passthrough", "passthrough"), ("hit_rate", "hit_rate"), ("time_saved_ms", "saved_ms"),
        ("entries", "entries"), ("bytes", "bytes"), ("connections", "conns"), ("statuses", "statuses"),
    ),
    "queries": (
        ("cache", "cache"), ("template_id", "template_id"), ("calls", "calls"), ("hits", "hits"),
        ("hit_rate", "hit_rate"), ("hit_p50_ms", "hit_ms"), ("miss_p50_ms", "miss_ms"), ("ttl_s", "ttl_s"),
        ("template", "template"),
    ),
}  # fmt: skip


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def present(args: argparse.Namespace, answer: Answer, names: dict[str, str]) -> str:
    """The text a person reads: sentences for actions, fitted tables for listings."""
    cache = f"from {names.get(args.cache, args.cache)}" if args.cache else "from every cache"
    scope = f"for {names.get(args.cache, args.cache)}" if args.cache else "for every cache"
    if args.command == "purge":
        removed = int(answer.rows[0][0]) if answer.rows else 0
        what = _plural(removed, "entry", "entries")
        if args.table is not None:
            what += f" reading {args.table}"
        elif args.query is not None:
            what += f" of query {args.query}"
        return f"Purged {what} {cache}."
    action = getattr(args, "rules_action", None)
    if args.command == "rules" and action == "add" and answer.rows:
        rule = answer.dicts()[0]
        kept = "never cached" if rule["ttl_s"] is None else f"cached for at most {number(rule['ttl_s'])} s"
        return f"Added rule {rule['id']}: {rule['target']} {rule['name']} {kept} {scope}."
    if args.command == "rules" and action == "drop":
        return f"Dropped rule {args.rule_id.strip()}."
    if args.command == "rules" and action == "mode":
        if args.mode is not None:
            return f"Mode {args.mode} {scope}."
        modes = [(names.get(r["cache"], r["cache"]), r["mode"]) for r in answer.dicts()]
        return render_table(("cache", "mode"), modes)
    if not answer.columns:
        return answer.tag
    rows: list[list[object]] = [
        [names.get(v, v) if c == "cache" and isinstance(v, str) else v for c, v in zip(answer.columns, r, strict=True)]
        for r in answer.rows
    ]
    columns = list(answer.columns)
    if {"hits", "misses", "hit_rate"} <= set(columns):
        # No cacheable read (all pass-through: catalog reads, writes…) has no hit rate; "0"
        # read as a cache that failed. A dash, as the console shows it (JSON keeps the number).
        h, m, r = (columns.index(c) for c in ("hits", "misses", "hit_rate"))
        for row in rows:
            if not row[h] and not row[m]:
                row[r] = NOT_APPLICABLE
    narrow = NARROW.get(args.command)
    if args.wide:
        return render_table(columns, rows)
    if narrow is None:
        return render_table(columns, rows, width=TEXT_WIDTH, flex=columns[-1])
    keep = [(columns.index(c), heading) for c, heading in narrow if c in columns]
    if args.command == "queries" and len({r[columns.index("cache")] for r in rows}) <= 1:
        keep = [(i, h) for i, h in keep if h != "cache"]  # one cache: the column says nothing
    return render_table(
        [h for _, h in keep], [[r[i] for i, _ in keep] for r in rows], width=TEXT_WIDTH, flex=keep[-1][1]
    )

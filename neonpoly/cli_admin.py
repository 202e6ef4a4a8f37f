"""`neonpoly stats | queries | purge | rules` — clients of a running neonpoly's admin console.

They connect with asyncpg to the database `neonpoly` on the proxy's listener, so the CLI,
psql and scripts all see exactly the same answers. `--json` prints rows as a JSON array.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from neonpoly.cli_args import host_port

COMMANDS = ("stats", "queries", "purge", "rules")
DEFAULT_ADMIN = "127.0.0.1:6543"
ENV_USER = "NEONPOLY_ADMIN_USER"
ENV_PASSWORD = "NEONPOLY_ADMIN_PASSWORD"

SqlBuilder = Callable[[argparse.Namespace], str]


def _for_cache(args: argparse.Namespace) -> str:
    return f' FOR CACHE "{args.cache}"' if getattr(args, "cache", None) else ""


def _quote(name: str) -> str:
    # Table names go to the console as given; quote only when they need it.
    return name if name.replace("_", "").replace(".", "").isalnum() else '"' + name.replace('"', '""') + '"'


def _purge_sql(args: argparse.Namespace) -> str:
    if args.table:
        return f"PURGE TABLE {_quote(args.table)}{_for_cache(args)}"
    if args.query:
        return f"PURGE QUERY {args.query}{_for_cache(args)}"
    return f"PURGE ALL{_for_cache(args)}"


def _rules_sql(args: argparse.Namespace) -> str:
    action = getattr(args, "rules_action", None) or "list"
    if action == "list":
        return f"SHOW RULES{_for_cache(args)}"
    if action == "add":
        target = f"TABLE {_quote(args.table)}" if args.table else f"QUERY {args.query}"
        what = "NEVER" if args.never else f"TTL {args.ttl:g}"
        return f"CREATE RULE ON {target} {what}{_for_cache(args)}"
    if action == "drop":
        return f"DROP RULE {args.rule_id}"
    return f"SET MODE {args.mode}{_for_cache(args)}"


def register(subparsers: Any) -> None:
    """Add the admin commands to `neonpoly`'s subparsers (argparse _SubParsersAction)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        type=host_port,
        default=host_port(DEFAULT_ADMIN),
        metavar="HOST:PORT",
        help=f"the running neonpoly's listener (default {DEFAULT_ADMIN})",
    )
    common.add_argument(
        "--user",
        default=None,
        metavar="ROLE",
        help=f"admin role (default ${ENV_USER}, else your OS user)",
    )
    common.add_argument(
        "--password",
        default=None,
        help=f"admin password, if one is configured (default ${ENV_PASSWORD})",
    )
    common.add_argument("--json", action="store_true", help="print rows as a JSON array")
    common.add_argument("--cache", metavar="ID", help="only this cache")

    stats = subparsers.add_parser("stats", parents=[common], help="cache totals (SHOW STATS)")
    stats.set_defaults(admin_sql=lambda a: f"SHOW STATS{_for_cache(a)}")
    queries = subparsers.add_parser(
        "queries",
        parents=[common],
        help="per query template: calls, hits, latency, TTL (SHOW QUERIES)",
    )
    queries.set_defaults(admin_sql=lambda a: f"SHOW QUERIES{_for_cache(a)}")
    purge = subparsers.add_parser("purge", parents=[common], help="drop cached entries")
    which = purge.add_mutually_exclusive_group()
    which.add_argument("--table", metavar="T", help="only entries that read table T")
    which.add_argument("--query", metavar="ID", help="only entries of this template id")
    purge.set_defaults(admin_sql=_purge_sql)

    rules = subparsers.add_parser("rules", parents=[common], help="list, add and drop cache rules; set the mode")
    rules.set_defaults(admin_sql=_rules_sql)
    actions = rules.add_subparsers(dest="rules_action", metavar="ACTION")
    actions.add_parser("list", parents=[common], help="list rules (default)")
    add = actions.add_parser("add", parents=[common], help="add a rule")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--table", metavar="T")
    target.add_argument("--query", metavar="ID", help="template id (see `neonpoly queries`)")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--ttl", type=float, metavar="SECONDS")
    what.add_argument("--never", action="store_true", help="never cache")
    drop = actions.add_parser("drop", parents=[common], help="drop a rule")
    drop.add_argument("rule_id", metavar="ID")
    mode = actions.add_parser("mode", parents=[common], help="auto (learned TTL), fixed or off")
    mode.add_argument("mode", choices=("auto", "fixed", "off"))


async def dispatch(args: argparse.Namespace) -> int:
    """Run one admin command; 0 on success, 1 for an error answer, 2 if unreachable."""
    import asyncpg

    sql: str = args.admin_sql(args)
    host, port = args.admin
    user = args.user or os.environ.get(ENV_USER) or _os_user()
    password = args.password or os.environ.get(ENV_PASSWORD)
    try:
        conn = await asyncpg.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            database="neonpoly",
            ssl=False,
            timeout=10,
        )
    except (OSError, TimeoutError) as exc:
        print(f"neonpoly: cannot reach neonpoly at {host}:{port}: {exc}", file=sys.stderr)
        return 2
    except asyncpg.PostgresError as exc:
        print(f"neonpoly: {exc}", file=sys.stderr)
        return 2
    try:
        stmt = await conn.prepare(sql)
        records = await stmt.fetch()
        tag = stmt.get_statusmsg() or ""
        columns = [a.name for a in stmt.get_attributes()]
    except asyncpg.PostgresError as exc:
        hint = getattr(exc, "hint", None)
        print(f"neonpoly: {exc}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    finally:
        await conn.close()
    rows = [dict(zip(columns, tuple(r), strict=True)) for r in records]
    if args.json:
        print(json.dumps(rows if columns else {"status": tag}, default=_json_default, indent=2))
    elif columns:
        print(render_table(columns, [tuple(r) for r in records]))
    else:
        print(tag)
    return 0


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "neonpoly"


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "NaN"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def render_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table for people; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)

"""The `neonpoly` command line: the parser, and dispatch to serve, tui and the other commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from neonpoly import __version__
from neonpoly.cli.args import Parser, at_least_one, host_port, positive_seconds, seconds
from neonpoly.cli.running import CLIError, run
from neonpoly.defaults import (
    DEFAULT_CHANGE_FEED,
    DEFAULT_FEED_DDL,
    DEFAULT_FEED_IDLE,
    DEFAULT_FEED_TTL,
    DEFAULT_LISTEN_TEXT,
)

if TYPE_CHECKING:
    from neonpoly.control.interface import Control

EPILOG = """\
examples:
  neonpoly serve                                  cache an embedded PostgreSQL (no setup)
  neonpoly serve --upstream postgres://u:pw@db.example.com/app?sslmode=require
  psql 'postgres://u:pw@127.0.0.1:6543/app'       then point your app at neonpoly
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but only real ones (not None, not False flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        size = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MB or 2GB)") from exc
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"a cache needs at least 1MB, not {text!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="neonpoly",
        description="A caching PostgreSQL proxy (Neon's PolyScale integration, on your machine) "
        "and the console that manages it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"neonpoly {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v: every query's cache status, redacted)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the caching proxy",
        description="Run the caching proxy. Clients connect to --listen exactly as they would to "
        "PostgreSQL; reads are cached (a new query is stored on its 2nd run and served from its 3rd), "
        "writes through neonpoly evict what they touch.",
        formatter_class=_Help,
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="origin PostgreSQL URL (default: the integrations in the state dir, else an embedded PostgreSQL)",
    )
    serve.add_argument(
        "--listen", type=host_port, default=DEFAULT_LISTEN_TEXT, metavar="HOST:PORT", help="where clients connect"
    )
    serve.add_argument(
        "--cache-dir", type=Path, metavar="DIR", help="where entries persist (default: <state dir>/cache)"
    )
    serve.add_argument(
        "--ttl",
        type=positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="the longest an entry may be served; in auto mode (the default) templates whose tables are "
        "written often get shorter TTLs (see `neonpoly rules`)",
    )
    serve.add_argument(
        "--admit-after",
        type=at_least_one,
        default=2,
        metavar="N",
        help="store a query's result on its Nth run (served from run N+1)",
    )
    serve.add_argument(
        "--max-cache-size",
        type=_size,
        default="1GB",
        metavar="SIZE",
        help="disk bound of the cache; older entries are evicted",
    )
    serve.add_argument("--no-cache", action="store_true", help="pure pass-through: relay only, cache nothing")
    serve.add_argument(
        "--reveal", action="store_true", help="print connection strings with the password (hidden: logs keep them)"
    )
    serve.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="answer clients' SSLRequest with TLS using this certificate"
    )
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="private key for --tls-cert")
    serve.add_argument(
        "--connect-to",
        metavar="HOST:PORT:TO_HOST:TO_PORT",
        help="dial TO_HOST:TO_PORT when the origin is HOST:PORT (TLS SNI stays HOST), like curl",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="neonpoly's state (default: platform data dir, or $NEONPOLY_STATE_DIR)",
    )
    serve.add_argument(
        "--grace",
        type=seconds,
        default=5.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long in-flight queries may finish",
    )
    serve.add_argument("--metrics-listen", type=host_port, metavar="HOST:PORT", help="serve Prometheus /metrics here")
    serve.add_argument(
        "--change-feed",
        choices=("auto", "on", "off"),
        default=DEFAULT_CHANGE_FEED,
        help="follow the origin's logical replication stream, so writes made elsewhere (another app, the SQL "
        "editor) evict too: auto = when the origin allows it (wal_level=logical, a role with REPLICATION), "
        "on = refuse to start without it",
    )
    serve.add_argument(
        "--change-feed-ddl",
        choices=("poll", "install"),
        default=DEFAULT_FEED_DDL,
        help="how the feed sees DDL: poll the catalogs every second, or install an event trigger on the origin "
        "that puts DDL in the stream (needs a superuser; `integrations remove` drops it)",
    )
    serve.add_argument(
        "--change-feed-idle",
        type=positive_seconds,
        default=DEFAULT_FEED_IDLE,
        metavar="SECONDS",
        help="close the feed after this long without clients, so a Neon compute can scale to zero "
        "(reopening it evicts that database's entries)",
    )
    serve.add_argument(
        "--change-feed-ttl",
        type=positive_seconds,
        default=DEFAULT_FEED_TTL,
        metavar="SECONDS",
        help="while the feed follows every database a cache's clients use, auto-mode TTLs of reads of "
        "permanent tables may grow up to this (every committed change evicts anyway; rules still win)",
    )
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="share invalidations with the other neonpoly nodes on this Redis (redis://[:PASSWORD@]HOST:PORT/DB; "
        "default $NEONPOLY_REDIS_URL): a write through one node is never followed by a stale hit on another, "
        "one node runs each origin's change feed; while Redis is down every node passes through",
    )
    serve.add_argument(
        "--workers",
        type=at_least_one,
        default=1,
        metavar="N",
        help="relay processes sharing the port (SO_REUSEPORT, Linux); with N > 1 they share invalidations "
        "through --redis, else through a private redis-server this command starts on a unix socket",
    )
    serve.add_argument(
        "--node-id",
        metavar="NAME",
        help="this node's name on the invalidation plane (default HOST:PORT of --listen); keep it stable: a node "
        "that stops without its goodbye pauses the others' hits until it returns under the same name",
    )
    serve.add_argument(
        "--admin-role",
        action="append",
        metavar="ROLE",
        help="role allowed on the admin database `neonpoly` (repeatable; default: neonpoly, postgres, your OS user)",
    )
    tui = sub.add_parser(
        "tui",
        help="the console: Integrations page, Add/Manage PolyScale drawers, live cache view (default)",
        description="The console (also what bare `neonpoly` runs in a terminal). It runs the proxy in the "
        "background on --listen: add the PolyScale integration (a Neon project with NEON_API_KEY, a "
        "Postgres URL with --upstream, or the embedded PostgreSQL), copy the connection string, and "
        "watch hits arrive in the cache view. Every action has a key; ? shows them, ctrl+p searches them.",
        formatter_class=_Help,
    )
    tui.add_argument(
        "--listen", type=host_port, default=DEFAULT_LISTEN_TEXT, metavar="HOST:PORT", help="where clients connect"
    )
    tui.add_argument(
        "--upstream",
        metavar="URL",
        help="add the integration for this Postgres URL instead of Neon or the embedded origin",
    )
    tui.add_argument("--project", metavar="ID", help="Neon project (default: the only one on the account)")
    tui.add_argument(
        "--api-host", metavar="URL", help="Neon API base URL (default: $NEON_API_HOST or console.neon.tech)"
    )
    tui.add_argument(
        "--connect-to",
        metavar="HOST:PORT:TO_HOST:TO_PORT",
        help="dial TO_HOST:TO_PORT for the origin HOST:PORT (SNI stays HOST)",
    )
    tui.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="neonpoly's state (default: platform data dir, or $NEONPOLY_STATE_DIR)",
    )
    tui.add_argument("--cache-dir", type=Path, metavar="DIR", help="where entries persist (default: <state dir>/cache)")
    # --attach: the console on a running `neonpoly serve` (same state dir) instead of its own proxy.
    tui.add_argument(
        "--attach",
        type=host_port,
        metavar="HOST:PORT",
        help="attach to a running `neonpoly serve` through its admin console instead of starting a proxy "
        "(the default when a serve already runs on the state dir)",
    )
    tui.add_argument(
        "--admin-user",
        metavar="ROLE",
        help="admin role with --attach (default $NEONPOLY_ADMIN_USER, else the role of an integration whose "
        "password the state dir holds, else your OS user)",
    )
    tui.add_argument(
        "--admin-password",
        metavar="PW",
        help="admin password with --attach (default $NEONPOLY_ADMIN_PASSWORD, else the integration's password "
        "on the origin, from the state dir)",
    )
    from neonpoly.cli import admin as cli_admin
    from neonpoly.cli import integrations as cli_integrations
    from neonpoly.cli import plane as cli_plane

    cli_integrations.register(sub)
    cli_admin.register(sub)
    cli_plane.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `serve --workers` starts each worker with it
    logging.getLogger("sqlglot").setLevel(logging.WARNING)  # its INFO notes are not ours to show
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2)
        if args.command != "serve"
        else logging.INFO - 10 * min(args.verbose, 1),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            from neonpoly.cli.serve import serve

            return run(serve(args))
        from neonpoly.cli import admin as cli_admin
        from neonpoly.cli import integrations as cli_integrations
        from neonpoly.cli import plane as cli_plane

        if args.command in cli_integrations.COMMANDS:
            return run(cli_integrations.dispatch(args))
        if args.command in cli_admin.COMMANDS:
            return run(cli_admin.dispatch(args))
        if args.command in cli_plane.COMMANDS:
            return run(cli_plane.dispatch(args))
        if args.command is None:
            if not (sys.stdin.isatty() and sys.stdout.isatty()):
                parser.print_help()  # no terminal (a script, CI): the console cannot run
                return 0
            args = parser.parse_args([*(argv or sys.argv[1:]), "tui"])
        if args.command == "tui":
            return _tui(args)
        parser.error(f"unknown command {args.command}")
    except CLIError as exc:
        print(f"neonpoly: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _tui(args: argparse.Namespace) -> int:
    if not sys.stdout.isatty():
        # Textual would write escape codes into a file or a pipe.
        raise CLIError(
            "the console needs a terminal and stdout is not one; "
            "`neonpoly serve` runs the proxy alone, `neonpoly stats` prints its numbers"
        )
    from neonpoly.tui import run_tui

    control, root = console_control(args)
    # The proxy log would draw over the console: keep only warnings, in a file.
    logging.getLogger().handlers.clear()
    handler = logging.FileHandler(root / "neonpoly.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    run_tui(control)
    return 0


def console_control(args: argparse.Namespace) -> tuple[Control, Path]:
    """The console's Control and state dir: attached to the neonpoly already serving the state
    dir (a `serve`, found through the state lock and the address it recorded) or given by
    --attach; otherwise a proxy of its own in this process."""
    from neonpoly.control.attached import AttachedControl, find_running
    from neonpoly.control.local import open_control
    from neonpoly.service import CacheSettings, ProxySettings
    from neonpoly.state import state_dir

    root = state_dir(args.state_dir)
    attach = args.attach
    if attach is None and (running := find_running(root)) is not None:
        print(f"neonpoly: attaching to the neonpoly (pid {running.pid}) serving {root} at {running.where}",
              file=sys.stderr, flush=True)  # fmt: skip
        attach = running.address
    if attach:
        return AttachedControl(
            attach,
            root,
            user=args.admin_user,
            password=args.admin_password,
            upstream=args.upstream,
            project_id=args.project,
            api_host=args.api_host,
            connect_to=args.connect_to,
        ), root
    settings = ProxySettings(
        listen=args.listen, cache_dir=args.cache_dir or root / "cache", cache=CacheSettings(), rules_dir=root
    )
    return open_control(
        root,
        settings=settings,
        upstream=args.upstream,
        project_id=args.project,
        api_host=args.api_host,
        connect_to=args.connect_to,
    ), root


if __name__ == "__main__":  # pragma: no cover - `python -m neonpoly.cli` uses __main__.py
    sys.exit(main())

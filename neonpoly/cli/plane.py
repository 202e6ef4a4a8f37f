"""`neonpoly plane` and `neonpoly plane forget NODE`: the invalidation plane as Redis holds it
(no running neonpoly needed), and the operator's way out when a node is gone for good.

A node that stops without its goodbye (crashed, killed, or cut off from Redis) is *lost*:
every node passes the origins it followed through until it comes back under the same name
(`serve --node-id`, by default host:port). `forget` says it never will."""

from __future__ import annotations

import argparse
import json
from typing import Any

from neonpoly.cli.running import CLIError
from neonpoly.cli.tables import render_table
from neonpoly.defaults import environment

COMMANDS = ("plane",)


def register(subparsers: Any) -> None:
    plane = subparsers.add_parser(
        "plane",
        help="show the invalidation plane's nodes (from Redis), or forget a lost one",
        description="Read the invalidation plane (`serve --redis`) straight from Redis: the nodes following "
        "each origin and the lost ones (gone without a goodbye), which make every node pass that origin "
        "through until they return. `plane forget NODE` purges its origins everywhere and stops waiting "
        "for it: only for a node that is really gone.",
    )
    plane.add_argument(
        "action", nargs="?", choices=("status", "forget"), default="status",
        help="status: the nodes and the lost ones (default); forget: a lost node is gone for good",
    )  # fmt: skip
    plane.add_argument("node", nargs="?", help="the lost node's name (plane forget)")
    plane.add_argument("--redis", metavar="URL", help="the plane's Redis (default $NEONPOLY_REDIS_URL)")
    plane.add_argument("--json", action="store_true", help="print JSON")


async def dispatch(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from neonpoly.freshness import redis_members

    url = args.redis or environment().redis_url
    if not url:
        raise CLIError("plane: give --redis redis://HOST:PORT (or set NEONPOLY_REDIS_URL)")
    try:
        if args.action == "forget":
            if not args.node:
                raise CLIError("plane forget: which node? (`neonpoly plane` lists the lost ones)")
            origins = await redis_members.forget(url, args.node)
            if not origins:
                raise CLIError(f"plane forget: no origin knows a node {args.node!r}")
            print(f"forgot {args.node}; purged everywhere: {', '.join(origins)}")
            return 0
        rows = await redis_members.members(url)
    except (RedisError, OSError) as exc:
        raise CLIError(f"plane: cannot read Redis: {' '.join(str(exc).split()) or type(exc).__name__}") from exc
    if args.json:
        print(json.dumps([{"origin": r.origin, "live": r.live, "expired": r.expired, "lost": r.lost} for r in rows]))
        return 0
    table = [
        (r.origin, ", ".join(r.live) or "-", ", ".join([*r.lost, *(f"{n} (expired)" for n in r.expired)]) or "-",
         "paused" if r.lost or r.expired else "served")
        for r in rows
    ]  # fmt: skip
    print(render_table(("origin", "live nodes", "lost nodes", "hits"), table) if table else "no origin on this plane")
    return 0

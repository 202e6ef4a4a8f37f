"""`neonpoly serve`: the proxy in the foreground until SIGINT/SIGTERM, through start_serving."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from urllib.parse import quote

from neonpoly.cli.running import CLIError
from neonpoly.control.interface import ControlError
from neonpoly.control.serving import Serving, start_serving
from neonpoly.defaults import environment
from neonpoly.freshness.changefeed import FeedSettings
from neonpoly.freshness.plane import PlaneSettings
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from neonpoly.state import StateInUse, StateLock, state_dir

log = logging.getLogger("neonpoly")


async def serve(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CLIError("--tls-cert and --tls-key go together")
    root = state_dir(args.state_dir)
    redis_url = args.redis or environment().redis_url
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise CLIError("--redis: expected redis://HOST:PORT/DB, rediss://… or unix:///path")
    settings = ProxySettings(
        listen=args.listen,
        cache_dir=args.cache_dir or root / "cache",
        cache=CacheSettings(
            enabled=not args.no_cache, ttl=args.ttl, admit_after=args.admit_after, max_bytes=args.max_cache_size
        ),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        rules_dir=root,
        change_feed=FeedSettings(mode=args.change_feed, ddl=args.change_feed_ddl, idle=args.change_feed_idle),
        redis=PlaneSettings(redis_url) if redis_url else None,
    )
    lock = StateLock(root)
    try:
        lock.acquire()
    except StateInUse as exc:
        raise CLIError(str(exc)) from exc
    try:
        try:
            service = ProxyService(settings)
        except (OSError, ssl.SSLError) as exc:
            raise CLIError(f"cannot load --tls-cert/--tls-key: {exc.strerror or exc}") from exc
        try:
            serving = await start_serving(
                service,
                root,
                upstream=args.upstream,
                connect_to=args.connect_to,
                admin_roles=args.admin_role,
                metrics_listen=args.metrics_listen,
            )
        except ControlError as exc:
            raise CLIError(str(exc)) from exc
        _announce(args, serving, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down (grace %.1fs)", args.grace)
        await serving.close(args.grace)
        return 0
    finally:
        lock.release()


def _announce(args: argparse.Namespace, serving: Serving, settings: ProxySettings) -> None:
    host, port = serving.address
    cache_note = "off (--no-cache)" if args.no_cache else str(settings.cache_dir)
    log.info("listening on %s:%d; cache %s", host, port, cache_note)
    for item in serving.served:
        hidden = "" if args.reveal else " (password hidden; --reveal or `neonpoly connection-string --reveal`)"
        print(
            f"neonpoly: {item.integration.name} ({item.origin.label}) ready; connect with{hidden}:\n"
            f"  psql '{item.connection_string(host, port, reveal=args.reveal)}'",
            file=sys.stderr,
            flush=True,
        )
    if not serving.served:
        origin = serving.service.routes.by_id["default"].origin
        user = quote(origin.user or "USER", safe="")
        database = quote(origin.database or "DATABASE", safe="")
        print(
            f"neonpoly: caching {origin.label}; connect as you would to it, at neonpoly's address:\n"
            f"  psql 'postgres://{user}@{host}:{port}/{database}'",
            file=sys.stderr,
            flush=True,
        )

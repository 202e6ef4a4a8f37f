"""`neonpoly serve`: the proxy in the foreground until SIGINT/SIGTERM, through start_serving.

With `--workers N` (N > 1) this process becomes the parent of N workers (control/workers.py)
and each worker runs this same command, told its place in $NEONPOLY_WORKER.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from urllib.parse import quote

from neonpoly.cli.running import CLIError
from neonpoly.control.interface import ControlError
from neonpoly.control.serving import EmbeddedRunner, Serving, start_serving
from neonpoly.control.workers import (
    Supervisor,
    WorkerPlan,
    WorkerRole,
    join_workers,
    signal_ready,
    without_workers,
    worker_settings,
)
from neonpoly.defaults import environment
from neonpoly.freshness.changefeed import FeedSettings
from neonpoly.freshness.plane import PlaneSettings
from neonpoly.proxy.origin import Origin
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from neonpoly.state import StateInUse, StateLock, state_dir

log = logging.getLogger("neonpoly")


def _stop_event() -> tuple[asyncio.Event, list[int]]:
    """An event set by SIGINT/SIGTERM, and the signals received (the parent forwards them)."""
    stop = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, int(sig))
    return stop, received


async def serve(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CLIError("--tls-cert and --tls-key go together")
    root = state_dir(args.state_dir)
    redis_url = args.redis or environment().redis_url
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise CLIError("--redis: expected redis://HOST:PORT/DB, rediss://… or unix:///path")
    role = _role()
    if args.workers > 1 and role is None:
        return await _supervise(args, root, redis_url)
    if role is not None:  # the workers' plane: --redis, else the parent's private redis-server
        redis_url = role.bus
    settings = ProxySettings(
        listen=args.listen,
        cache_dir=args.cache_dir or root / "cache",
        cache=CacheSettings(
            enabled=not args.no_cache, ttl=args.ttl, admit_after=args.admit_after, max_bytes=args.max_cache_size
        ),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        rules_dir=root,
        change_feed=FeedSettings(
            mode=args.change_feed, ddl=args.change_feed_ddl, idle=args.change_feed_idle, ttl=args.change_feed_ttl
        ),
        redis=_plane(args, role, redis_url) if redis_url else None,
    )
    if role is not None:
        try:
            settings = worker_settings(settings, role)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
    lock = StateLock(root)
    if role is None:  # a worker's parent holds the state dir's lock
        try:
            lock.acquire()
        except StateInUse as exc:
            raise _in_use(root, exc) from exc
    try:
        try:
            service = ProxyService(settings)
        except (OSError, ssl.SSLError) as exc:
            raise CLIError(f"cannot load --tls-cert/--tls-key: {exc.strerror or exc}") from exc
        embedded = None
        if role is not None and role.embedded is not None:
            host, port = role.embedded
            embedded = EmbeddedRunner(root, attached=Origin(host=host, port=port, sslmode="disable"))
        try:
            serving = await start_serving(
                service,
                root,
                upstream=args.upstream,
                connect_to=args.connect_to,
                admin_roles=args.admin_role,
                # One worker serves /metrics (every worker's figures, merged): one port cannot take two.
                metrics_listen=args.metrics_listen if role is None or role.index == 0 else None,
                embedded=embedded,
                record_listen=role is None,
            )
        except ControlError as exc:
            raise CLIError(str(exc)) from exc
        fleet = None
        stop, _ = _stop_event()
        probe = None
        if role is None:
            _print(_announcement(args, serving))
            if args.upstream:
                probe = asyncio.get_running_loop().create_task(
                    warn_if_unreachable(serving.service.routes.by_id["default"].origin)
                )
        else:
            fleet = await join_workers(serving, role)
            signal_ready(role, _announcement(args, serving))
        await stop.wait()
        if probe is not None:
            probe.cancel()
        log.info("shutting down (grace %.1fs)", args.grace)
        if role is not None:
            # A worker whose parent is gone (SIGKILL) has nobody to kill it should its shutdown
            # hang: past the grace and a margin, dump every thread's stack and exit.
            faulthandler.dump_traceback_later(args.grace + 15, exit=True)
        if fleet is not None:
            await fleet.close()
        await serving.close(args.grace)
        faulthandler.cancel_dump_traceback_later()
        return 0
    finally:
        lock.release()


async def warn_if_unreachable(origin: Origin, timeout: float = 3.0) -> bool:
    """Log a warning when nothing answers at the origin now. `serve --upstream` starts anyway
    (the origin may come up later), but a mistyped port should not wait for the first client
    to show; False when it did not answer."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(*origin.dial)
    except (OSError, TimeoutError) as exc:
        why = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        log.warning("the origin %s does not answer now (%s); its clients get "
                    "\"could not connect to origin\" until it does", origin.label, why)  # fmt: skip
        return False
    writer.close()
    return True


def _in_use(root: Path, exc: StateInUse) -> CLIError:
    """The lock knows the other process's pid; the state dir also knows where it listens,
    which the user needs to reach it (the lock's own message can only say HOST:PORT)."""
    from neonpoly.control.attached import find_running

    running = find_running(root)
    if running is None:
        return CLIError(str(exc))
    return CLIError(
        f"another neonpoly (pid {running.pid}) is already serving from {root}, at {running.where}: stop it, "
        f"use it (`neonpoly tui --state-dir {root}` attaches to it), or use another --state-dir"
    )


def _plane(args: argparse.Namespace, role: WorkerRole | None, url: str) -> PlaneSettings:
    """The plane's settings: this node's stable name (a lost node is known by it when it comes
    back), and on the workers' private redis-server, which cannot lose its data and outlive
    them (the set stops when it dies), no rejoin grace, and table bumps through memory alone
    (its only nodes are the workers, which share their generations: cache/siblings.py)."""
    node = args.node_id
    if node is None and args.listen[1] != 0:
        node = f"{socket.gethostname()}:{args.listen[1]}"
    if node is not None and role is not None:
        node = f"{node}/w{role.index}"
    private = role is not None and args.redis is None and environment().redis_url is None
    # Every node of the private redis-server is a sibling: table bumps need not travel through it.
    return PlaneSettings(url, node=node, grace=0.0 if private else None, siblings_only=private)


def _role() -> WorkerRole | None:
    """This process's place among the workers of a `serve --workers N` (None: not one)."""
    text = environment().worker
    if text is None:
        return None
    try:
        return WorkerRole.from_json(text)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


async def _supervise(args: argparse.Namespace, root: Path, redis_url: str | None) -> int:
    lock = StateLock(root)
    try:
        lock.acquire()
    except StateInUse as exc:
        raise _in_use(root, exc) from exc
    try:
        plan = WorkerPlan(
            count=args.workers,
            argv=without_workers(args.argv),
            root=root,
            listen=args.listen,
            redis=redis_url,
            upstream=args.upstream,
            grace=args.grace,
        )
        stop, received = _stop_event()
        supervisor = Supervisor(plan, _print)
        try:
            return await supervisor.run(stop, lambda: received[0] if received else int(signal.SIGTERM))
        except ControlError as exc:
            raise CLIError(str(exc)) from exc
    finally:
        lock.release()


def _print(lines: list[str]) -> None:
    """The announcement in one write: print() sends a line and its newline separately, and a
    log record from another thread (the change feed's) landing between them cut the `psql`
    line that scripts and the tests wait for."""
    text = "".join(line + "\n" for line in lines)
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError):  # captured in-process (tests): no descriptor of its own
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


def _announcement(args: argparse.Namespace, serving: Serving) -> list[str]:
    host, port = serving.address
    cache_note = "off (--no-cache)" if args.no_cache else str(serving.service.settings.cache_dir)
    log.info("listening on %s:%d; cache %s", host, port, cache_note)
    lines: list[str] = []
    for item in serving.served:
        hidden = "" if args.reveal else " (password hidden; --reveal or `neonpoly connection-string --reveal`)"
        lines.append(
            f"neonpoly: {item.integration.name} ({item.origin.label}) ready; connect with{hidden}:\n"
            f"  psql '{item.connection_string(host, port, reveal=args.reveal)}'"
        )
    if not serving.served:
        origin = serving.service.routes.by_id["default"].origin
        user = quote(origin.user or "USER", safe="")
        database = quote(origin.database or "DATABASE", safe="")
        lines.append(
            f"neonpoly: caching {origin.label}; connect as you would to it, at neonpoly's address:\n"
            f"  psql 'postgres://{user}@{host}:{port}/{database}'"
        )
    return lines

"""`neonpoly serve --workers N`: N relay processes on one port, started and watched by the
`serve` process (the parent), which serves nothing itself.

What the parent does, in order: checks the port is free (and picks one for port 0), so two
runs never end up in one SO_REUSEPORT group; starts the Redis the workers share when no
`--redis` is given (a private `redis-server` on a unix socket in the state dir, no
persistence); starts the embedded origin once, when it is what is served (the workers get
its address, and the parent stops it last); makes the memory where the workers share their
table generations (cache/siblings.py: a write through one is seen by the others' next hit
check, with no message); starts the workers, each with its own cache directory, and waits
until every one listens; then watches them.

Supervision: a worker that dies is never restarted silently. The parent logs it loudly,
stops every other worker and exits with status 1, so whatever runs `serve` (systemd, a
container runtime, a shell) sees the failure and restarts the whole set. Keeping the rest
running would hide it: the kernel would quietly send the dead worker's share to the others,
SHOW WORKERS would report it missing forever, and a crash is as likely to hit the siblings
(same code, same traffic). SIGINT/SIGTERM are forwarded to every worker (each gives its
in-flight queries `--grace` seconds), then children still running are killed by PID. Each
child also asks Linux to send it SIGTERM should the parent die without doing so (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from neonpoly.admin.fleet import WorkerFleet, WorkerPlace
from neonpoly.cache.siblings import SiblingBoard
from neonpoly.control.interface import ControlError
from neonpoly.control.serving import USER_ERRORS, EmbeddedRunner, Serving, listen_failure
from neonpoly.defaults import ENV_WORKER
from neonpoly.integrations.embedded_origin import EMBEDDED_DATABASE, EMBEDDED_USER
from neonpoly.integrations.store import IntegrationStore, record_embedded
from neonpoly.service import ProxySettings

log = logging.getLogger("neonpoly.workers")

REDIS_SOCKET = "workers-redis.sock"  # in the state dir (a short temporary dir when that path is too long)
READY_TIMEOUT = 120.0  # a worker that has not listened by then is stuck: stop everything
STOP_MARGIN = 10.0  # beyond --grace, how long stopping workers may take before they are killed


def die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM this child when the parent dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; the parent forks from its main thread, which lives as long as it).
    prctl is resolved before the fork, so the child runs no imports."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def check_port(host: str, port: int) -> int:
    """The port the workers will share: bound once without SO_REUSEPORT, so a port another
    process listens on (even another neonpoly with SO_REUSEPORT) is refused here, and port 0
    becomes a real one. Raises ControlError."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ControlError(listen_failure(host, port, exc)) from exc
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Child:
    """A process the parent started: its Popen, and a pidfd to await its end on the loop."""

    name: str
    proc: subprocess.Popen[bytes]
    ended: asyncio.Future[int] = field(init=False)

    def __post_init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.ended = loop.create_future()
        fd = os.pidfd_open(self.proc.pid)

        def reaped() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            code = self.proc.wait()
            if not self.ended.done():
                self.ended.set_result(code)

        loop.add_reader(fd, reaped)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if not self.ended.done() and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, sig: int, timeout: float) -> None:
        """Signal it, wait up to `timeout`, then SIGKILL (by PID) and reap."""
        self.signal(sig)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.ended)
        except TimeoutError:
            log.error("%s (pid %d) did not stop within %.0fs: killed", self.name, self.pid, timeout)
            self.signal(signal.SIGKILL)
            await self.ended


class PrivateRedis:
    """The workers' Redis when no `--redis` is given: no persistence, no TCP port, a unix
    socket only its owner may open."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.child: Child | None = None
        self._tmp: Path | None = None
        path = root / REDIS_SOCKET
        if len(str(path)) > 100:  # sun_path holds 108 bytes
            self._tmp = Path(tempfile.mkdtemp(prefix="neonpoly-"))
            path = self._tmp / "redis.sock"
        self.socket = path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ControlError(
                "--workers needs redis-server to share invalidations between the workers: install it "
                "(Debian: apt-get install redis-server) or give --redis redis://HOST:PORT"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a run that was killed
        args = [
            binary, "--save", "", "--appendonly", "no", "--port", "0", "--unixsocket", str(self.socket),
            "--unixsocketperm", "700", "--dir", str(self.socket.parent), "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent(os.getpid()),
            start_new_session=True,
        )  # fmt: skip
        self.child = Child("redis-server", proc)
        deadline = time.monotonic() + timeout
        while not await _redis_answers(self.socket):
            if self.child.ended.done():
                raise ControlError(f"redis-server exited with status {self.child.ended.result()} at start")
            if time.monotonic() > deadline:
                await self.stop()
                raise ControlError(f"redis-server did not answer on {self.socket} within {timeout:.0f}s")
            await asyncio.sleep(0.05)
        log.info("workers share a private redis-server (pid %d) on %s", proc.pid, self.socket)

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(signal.SIGTERM, 5.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


async def _redis_answers(path: Path) -> bool:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        async with asyncio.timeout(1.0):
            return (await reader.readline()).startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass(slots=True)
class WorkerPlan:
    """What `serve --workers N` was asked, as the parent needs it."""

    count: int
    argv: Sequence[str]  # the command line after `neonpoly`, `--workers` removed
    root: Path
    listen: tuple[str, int]
    redis: str | None  # --redis; None: a private redis-server
    upstream: str | None
    grace: float


def without_workers(argv: Sequence[str]) -> list[str]:
    """The command line minus `--workers N` / `--workers=N` (each worker is one process)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


class Supervisor:
    """The parent of `serve --workers N` (see the module's docstring)."""

    def __init__(self, plan: WorkerPlan, announce: Callable[[list[str]], None]) -> None:
        self.plan = plan
        self.announce = announce
        self.workers: list[Child] = []
        self.redis: PrivateRedis | None = None
        self.board: SiblingBoard | None = None
        self.embedded = EmbeddedRunner(plan.root)
        self.group = secrets.token_hex(6)

    async def _prepare_origin(self) -> tuple[str, int] | None:
        """Start the embedded origin here, once, when it is served; its address for the workers."""
        if self.plan.upstream:
            return None
        store = IntegrationStore(self.plan.root)
        try:
            items = store.load()
            if items and all(i.kind != "embedded" for i in items):
                return None
            handle, origin = await self.embedded.ensure()
            if not items:
                record_embedded(store, origin, EMBEDDED_USER, EMBEDDED_DATABASE, handle.password)
            for item in items:
                if item.kind == "embedded" and (origin.host, origin.port) != (item.origin_host, item.origin_port):
                    store.put(replace(item, origin_host=origin.host, origin_port=origin.port))
        except USER_ERRORS as exc:
            raise ControlError(str(exc)) from exc
        return origin.host, origin.port

    def _spawn(self, index: int, port: int, bus: str, embedded: tuple[str, int] | None) -> tuple[Child, int]:
        ready_r, ready_w = os.pipe()
        host = self.plan.listen[0]
        args = [
            sys.executable, "-m", "neonpoly.cli", *self.plan.argv,
            "--listen", f"{host}:{port}",
        ]  # fmt: skip
        board = self.board.fileno() if self.board is not None else None
        role = WorkerRole(index, self.plan.count, self.group, bus, ready_w, embedded, board)
        env = {**os.environ, ENV_WORKER: role.to_json()}
        fds = (ready_w,) if board is None else (ready_w, board)
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, pass_fds=fds, env=env, preexec_fn=die_with_parent(os.getpid()),
                start_new_session=True,  # a terminal's ^C reaches the parent, which forwards it
            )  # fmt: skip
        finally:
            os.close(ready_w)
        log.info("worker %d started (pid %d)", index, proc.pid)
        return Child(f"worker {index}", proc), ready_r

    async def _ready(self, child: Child, fd: int) -> dict[str, object]:
        """The worker's one line on its ready pipe (it listens); raises if it ended first."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = await reader.readline()
        finally:
            transport.close()
        if not line:
            code = await child.ended
            raise ControlError(f"{child.name} exited with status {code} before it was ready (its log is above)")
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def run(self, stop: asyncio.Event, stop_signal: Callable[[], int]) -> int:
        """Serve until `stop` is set (`stop_signal()` says which signal to forward) or a child
        dies. Returns the exit status; raises ControlError for what the user can fix."""
        plan = self.plan
        port = check_port(*plan.listen)
        try:
            bus = plan.redis
            if bus is None:
                self.redis = PrivateRedis(plan.root)
                await self.redis.start()
                bus = self.redis.url
            embedded = await self._prepare_origin()
            self.board = SiblingBoard.create(plan.count)
            pipes = []
            for index in range(plan.count):
                child, fd = self._spawn(index, port, bus, embedded)
                self.workers.append(child)
                pipes.append(fd)
            messages = await asyncio.gather(*(self._ready(c, fd) for c, fd in zip(self.workers, pipes, strict=True)))
            IntegrationStore(plan.root).set_listen(plan.listen[0], port, upstream_only=bool(plan.upstream))
            lines = messages[0].get("announce", [])
            self.announce([str(line) for line in lines] if isinstance(lines, list) else [])
            log.info(
                "%d workers listening on %s:%d (pids %s)", plan.count, plan.listen[0], port,
                ", ".join(str(w.pid) for w in self.workers),
            )  # fmt: skip
            return await self._watch(stop, stop_signal)
        finally:
            await self._stop_all(signal.SIGTERM)

    async def _watch(self, stop: asyncio.Event, stop_signal: Callable[[], int]) -> int:
        children = [*self.workers, *([self.redis.child] if self.redis and self.redis.child else [])]
        waiting: dict[asyncio.Future[Any], Child | None] = {asyncio.ensure_future(stop.wait()): None}
        waiting.update({c.ended: c for c in children})
        done, _ = await asyncio.wait(list(waiting), return_when=asyncio.FIRST_COMPLETED)
        for fut in waiting:
            if fut not in done and waiting[fut] is None:
                fut.cancel()
        dead = [waiting[f] for f in done if waiting[f] is not None]
        if not dead:
            await self._stop_all(stop_signal())
            return 0
        for child in dead:
            assert child is not None
            log.error(
                "%s (pid %d) exited unexpectedly with status %s: stopping every worker; nothing is restarted "
                "(whatever runs neonpoly restarts the set)", child.name, child.pid, child.ended.result(),
            )  # fmt: skip
        await self._stop_all(signal.SIGTERM)
        return 1

    async def _stop_all(self, sig: int) -> None:
        await asyncio.gather(*(w.stop(sig, self.plan.grace + STOP_MARGIN) for w in self.workers))
        if self.redis is not None:  # after the workers: their plane closes cleanly
            await self.redis.stop()
            self.redis = None
        if self.board is not None:
            self.board.close()
            self.board = None
        await self.embedded.stop()


# --- the worker's side -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """A worker's place, as the parent passes it (in $NEONPOLY_WORKER, as JSON)."""

    index: int
    count: int
    group: str
    bus: str  # the Redis the workers share
    ready_fd: int | None
    embedded: tuple[str, int] | None  # the parent's embedded origin
    board: int | None = None  # the fd of the memory the workers share generations in (cache/siblings.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerRole:
        """Raises ValueError when `text` is not what a parent writes."""
        try:
            d = json.loads(text)
            embedded = d.get("embedded")
            return cls(
                index=int(d["index"]), count=int(d["count"]), group=str(d["group"]), bus=str(d["bus"]),
                ready_fd=None if d.get("ready_fd") is None else int(d["ready_fd"]),
                embedded=(str(embedded[0]), int(embedded[1])) if embedded else None,
                board=None if d.get("board") is None else int(d["board"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(
                f"${ENV_WORKER} is set by `serve --workers N` for its workers, not by hand ({exc})"
            ) from exc


def worker_settings(settings: ProxySettings, role: WorkerRole) -> ProxySettings:
    """One worker's engine settings: the port shared (SO_REUSEPORT), a cache directory of its
    own (table generations and stored stamps are per process, and one diskcache directory
    must not have two write-behind threads), its share of the size bound, and its row of the
    generations the workers share (raises ValueError when the parent's memory cannot be mapped)."""
    cache = replace(settings.cache, max_bytes=max(settings.cache.max_bytes // role.count, 1 << 20))
    cache_dir = settings.cache_dir / f"worker-{role.index}" if settings.cache_dir is not None else None
    board = SiblingBoard.attach(role.board, role.index) if role.board is not None else None
    return replace(settings, cache=cache, cache_dir=cache_dir, reuse_port=True, siblings=board)


async def join_workers(serving: Serving, role: WorkerRole) -> WorkerFleet:
    """Make a started worker answer for the set: admin statements and /metrics merged over
    every worker, cancels routed to the worker holding the session, rule changes loaded."""
    service = serving.service
    fleet = WorkerFleet(WorkerPlace(role.index, role.count, role.group, role.bus), service, serving.admin.executor)
    await fleet.start()
    fleet.reload_rules = service.rules.reload
    serving.admin.gather = fleet.run
    service.server.unknown_cancel = fleet.forward_cancel
    if serving.metrics is not None:
        serving.metrics.gather = fleet.report
    return fleet


def signal_ready(role: WorkerRole, announce: list[str]) -> None:
    """Tell the parent this worker listens (worker 0 also hands over what to print)."""
    if role.ready_fd is None:
        return
    message = {"announce": announce} if role.index == 0 else {}
    with os.fdopen(role.ready_fd, "w") as pipe:
        pipe.write(json.dumps(message) + "\n")

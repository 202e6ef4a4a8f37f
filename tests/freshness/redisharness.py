"""A throwaway redis-server for the invalidation plane's tests: 127.0.0.1 on a free port, no
persistence (`--save '' --appendonly no`), stopped by its PID. `kill` and `start` again on the
same port are how the tests take Redis away mid-run and bring it back empty."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="neonpoly-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        # A process start: on a loaded 2-core machine seconds, not milliseconds (a wait only).
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--protected-mode", "yes", "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / f"redis-{self.starts}.log").open("wb"),
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.02)

    def age_epoch(self, seconds: float = 3600.0, prefix: str = "neonpoly") -> None:
        """Make the plane's epoch as if this Redis had served it for `seconds`, with nobody cut
        off: nodes then join as they join a long-running plane, without rule 5's wait for
        nodes cut off when Redis lost its data (which a fresh Redis otherwise means: `fence`,
        up to 11 s with the attacks' timings). A Redis killed and started again, or flushed,
        mid-test is fresh as ever: the tests of rule 5 lose its data after this."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            # MAKE_EPOCH's value (token@ms, Redis's clock), set with NX before any node does.
            script = (
                "local t = redis.call('TIME') "
                "local made = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2]) "
                "return redis.call('SET', KEYS[1], ARGV[1] .. '@' .. made, 'NX')"
            )
            args = ["EVAL", script, "1", f"{prefix}:epoch", os.urandom(8).hex(), str(int(seconds * 1000))]
            conn.sendall(
                f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
            )
            reply = conn.recv(64)
            assert reply.startswith(b"+OK"), reply

    def kill(self) -> None:
        """SIGKILL by PID: Redis vanishes as in a crash, with its data (no persistence)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Pair:
    """One relayed connection: what flows each way (a frozen direction reads and drops)."""

    __slots__ = ("down", "reader", "up", "writers")

    def __init__(self, writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter], frozen: bool) -> None:
        self.writers = writers
        self.up = not frozen  # client -> Redis forwarded
        self.down = not frozen  # Redis -> client forwarded
        self.reader = False  # it sent an XREAD: a plane node's reader connection


class CuttableLink:
    """A loopback TCP relay to a Redis that a test can cut (every connection through it closed,
    new ones refused) and restore: one node cut off from Redis while the others still reach
    it, the partition the fence is for. It can also go silent without closing anything
    (`freeze`: a blackholed link, found only by the client's io timeout), and lose the replies
    of a reader's round that did execute (`drop_replies_after`)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[_Pair] = []
        self.frozen = False
        self._trap: bytes | None = None
        self.tripped = asyncio.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def cut(self) -> None:
        await self._close_server()
        for pair in self._pairs:
            for writer in pair.writers:
                writer.transport.abort()
        self._pairs.clear()

    def freeze(self) -> None:
        """Stop forwarding either way, on every connection and new ones, closing nothing."""
        self.frozen = True
        for pair in self._pairs:
            pair.up = pair.down = False

    def thaw(self) -> None:
        self.frozen = False
        for pair in self._pairs:
            pair.up = pair.down = True

    def drop_replies_after(self, marker: bytes) -> None:
        """Once a reader connection forwarded a request holding `marker`, drop every reply on
        it (the request executed; its client never hears back), close every other connection
        and refuse new ones; `tripped` is set."""
        self._trap = marker

    def _tripped(self, pair: _Pair) -> None:
        self._trap = None
        pair.down = False
        for other in self._pairs:
            if other is not pair:
                for writer in other.writers:
                    writer.transport.abort()
        self._pairs = [pair]
        if self._server is not None:
            self._server.close()
            self._server = None
        self.tripped.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = _Pair((writer, up_writer), self.frozen)
        self._pairs.append(pair)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if upward:
                        pair.reader = pair.reader or b"XREAD" in data
                        if pair.up:
                            dst.write(data)
                            await dst.drain()
                            if self._trap is not None and pair.reader and self._trap in data:
                                self._tripped(pair)
                    elif pair.down:
                        dst.write(data)
                        await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        if pair in self._pairs:
            self._pairs.remove(pair)

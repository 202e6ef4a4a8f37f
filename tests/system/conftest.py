"""System tests: the integration lifecycle as a user drives it (CLI entry points in-process,
real psql and asyncpg clients, the `pg` fixture standing in for a Neon endpoint)."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from neonpoly._testing.neon_standin import (
    NeonStandin,
    SeedBranch,
    SeedDatabase,
    SeedEndpoint,
    SeedProject,
    SeedRole,
)
from neonpoly.cli.integrations import dispatch, register
from tests.pgharness import NEON_HOST, PgServer

ROLE = "scram_user"
DATABASE = "app"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neonpoly")
    register(parser.add_subparsers(dest="command"))
    return parser


async def run_cli(*argv: str) -> str:
    """`neonpoly <argv>` through the same parser and dispatch the real CLI uses; stdout."""
    out = io.StringIO()
    args = _parser().parse_args(list(argv))
    assert await dispatch(args, out) == 0
    return out.getvalue()


async def psql(url: str, sql: str) -> str:
    """The real psql binary; run as a subprocess so the proxy on this loop keeps serving."""
    proc = await asyncio.create_subprocess_exec(
        shutil.which("psql") or "psql",
        url,
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode().strip()


async def psql_failure(url: str, sql: str) -> str:
    """Run psql expecting it to fail; returns its stderr (the server's message)."""
    proc = await asyncio.create_subprocess_exec(
        shutil.which("psql") or "psql",
        url,
        "-X",
        "-At",
        "-c",
        sql,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    return stderr.decode()


def pg_project(pg: PgServer) -> SeedProject:
    """A Neon project whose primary branch's read_write endpoint is the `pg` fixture (reached
    through --connect-to; the fixture's certificate names NEON_HOST)."""
    endpoint_id = NEON_HOST.split(".")[0]
    return SeedProject(
        "shop",
        branches=[
            SeedBranch(
                "main",
                default=True,
                endpoints=[
                    SeedEndpoint("read_only", "active"),
                    SeedEndpoint("read_write", "idle", id=endpoint_id, host=NEON_HOST),
                ],
                databases=[SeedDatabase(DATABASE, ROLE)],
                roles=[SeedRole(ROLE, pg.password_for(ROLE))],
            )
        ],
    )


@pytest.fixture
async def neon_for_pg(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NeonStandin]:
    async with NeonStandin([pg_project(pg)]) as standin:
        monkeypatch.setenv("NEON_API_KEY", standin.api_key)
        monkeypatch.delenv("NEON_API_HOST", raising=False)
        yield standin


def connect_to(pg: PgServer) -> str:
    return f"{NEON_HOST}:5432:127.0.0.1:{pg.port}"


class ServeProcess:
    """`neonpoly serve` as a user starts it: a real subprocess on a state dir, stopped with
    SIGTERM. `port` is where it listens (read from its log line, not guessed)."""

    def __init__(self, state: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neonpoly.cli", "serve", "--state-dir", str(state), "--grace", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.lines: list[str] = []
        self.port = int(self.wait_for(r"listening on [\d.]+:(\d+)", 60).group(1))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line of serve's stderr (so far or to come) that matches `pattern`."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        pending = b""
        while True:
            for line in self.lines:
                if found := re.search(pattern, line):
                    return found
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"no {pattern!r} from serve: {''.join(self.lines)}")
            pending += chunk
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode() + "\n" for line in complete)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def start_serve() -> Iterator[Callable[..., ServeProcess]]:
    """Start `neonpoly serve` subprocesses; every one is stopped after the test."""
    started: list[ServeProcess] = []

    def start(state: Path, *args: str) -> ServeProcess:
        started.append(ServeProcess(state, *args))
        return started[-1]

    yield start
    for serve in started:
        serve.stop()

"""`neonpoly serve` as a user runs it: --help, a real subprocess, SIGTERM (must-show 6)."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.pgharness import PgServer


def _neonpoly(*args: str) -> list[str]:
    return [sys.executable, "-m", "neonpoly.cli", *args]


def test_serve_help_mentions_upstream() -> None:
    done = subprocess.run(_neonpoly("serve", "--help"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "--upstream" in done.stdout and "--listen" in done.stdout
    top = subprocess.run(_neonpoly("--help"), capture_output=True, text=True, timeout=30)
    assert top.returncode == 0 and "serve" in top.stdout


def test_serve_rejects_a_bad_upstream_url(tmp_path: Path) -> None:
    done = subprocess.run(
        _neonpoly("serve", "--upstream", "mysql://x@y/z", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert "not a postgres URL" in done.stderr


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, lines: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.lines = lines


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> tuple[re.Match[str], list[str]]:
    """Lines of serve's stderr up to the one matching `pattern`, plus every complete line
    that arrived with it. Reads the pipe's bytes itself: a text-mode readline may pull two
    lines into Python's buffer, after which select() waits on an empty pipe."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    lines: list[str] = []
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        lines.extend(line.decode() + "\n" for line in complete)
        for line in lines:
            found = re.search(pattern, line)
            if found:
                return found, lines
    raise AssertionError(f"no {pattern!r} in serve's stderr: {''.join(lines)}")


@pytest.fixture
def served(pg: PgServer, tmp_path: Path) -> Iterator[Served]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _neonpoly(
            "serve",
            "--upstream",
            pg.url("postgres", sslmode="require"),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
            "--state-dir",
            str(tmp_path / "state"),
            "--grace",
            "1",
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        found, lines = _read_until(proc, r"listening on [\d.]+:(\d+)", 30)
        yield Served(proc, int(found.group(1)), lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_relays_and_sigterm_is_graceful(served: Served, pg: PgServer) -> None:
    def url(role: str) -> str:
        return f"postgresql://{role}:{pg.password_for(role)}@127.0.0.1:{served.port}/app?sslmode=disable"

    with psycopg.connect(url("scram_user")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    idle = psycopg.connect(url("md5_user"), autocommit=True)  # still open at SIGTERM
    try:
        assert idle.execute("SELECT 1").fetchone() == (1,)
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        _, err = served.proc.communicate(timeout=15)
        took = time.monotonic() - started
        assert served.proc.returncode == 0, err
        # The open session was told why it ends (57P01), rather than just dropped.
        with pytest.raises(psycopg.OperationalError, match=r"shutting down|terminating|closed"):
            idle.execute("SELECT 1")
    finally:
        idle.close()
    stderr = "".join(served.lines) + err
    conn_lines = [line for line in stderr.splitlines() if "connection client=" in line]
    assert len(conn_lines) == 2, stderr
    assert any("role=scram_user" in line and "outcome='client terminated'" in line for line in conn_lines)
    assert any("role=md5_user" in line and "shutdown" in line for line in conn_lines)
    for line in conn_lines:
        assert re.search(r"database=app .*duration_ms=\d+ bytes_in=\d+ bytes_out=\d+", line), line
    assert "Traceback" not in stderr
    assert took < 10


def test_admin_commands_find_a_serve_with_upstream_and_listen(served: Served, pg: PgServer, tmp_path: Path) -> None:
    """`serve --upstream … --listen HOST:PORT` records where it listens in its state dir, so
    `neonpoly stats` with the same state dir reaches it without --admin (the login: the role's
    password on the origin, as no integration of the state dir holds one)."""
    login = ["--user", "postgres", "--password", pg.password_for("postgres")]
    done = subprocess.run(
        _neonpoly("stats", "--json", "--state-dir", str(tmp_path / "state"), *login),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [row["cache"] for row in json.loads(done.stdout)] == ["default", "(all)"]
    shown = subprocess.run(
        _neonpoly("connection-string", "--state-dir", str(tmp_path / "state")),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert shown.returncode != 0 and "no integrations yet" in shown.stderr  # --upstream adds none


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--ttl", "-1"], "--ttl"),
        (["--admit-after", "0"], "--admit-after"),
        (["--max-cache-size", "0"], "--max-cache-size"),
        (["--grace", "-1"], "--grace"),
        (["--listen", "127.0.0.1:99999"], "--listen"),
        (["--upstream", "postgres://u@h/db?sslmode=bogus"], "sslmode"),
        (["--upstream", "postgres://u@h/db", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], "tls"),
    ],
)
def test_serve_rejects_nonsense_in_one_line(tmp_path: Path, args: list[str], complaint: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "neonpoly.cli", "serve", "--state-dir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert complaint in result.stderr.lower() or complaint in result.stderr, result.stderr


def test_serve_hides_the_password_unless_revealed(pg: PgServer, tmp_path: Path) -> None:
    """The connection string `serve` prints lands in service logs: the password is masked."""
    state = tmp_path / "state"
    url = pg.url("postgres", sslmode="require")
    added = subprocess.run(
        _neonpoly("integrations", "add", "--upstream", url, "--state-dir", str(state)),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert added.returncode == 0, added.stderr
    for reveal in (False, True):
        proc = subprocess.Popen(
            _neonpoly("serve", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--grace", "0",
                      *(["--reveal"] if reveal else [])),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            # Up to the string's own line: print() writes its final newline apart, so the
            # heading may arrive alone.
            _, lines = _read_until(proc, r"^\s+psql '", 60)
            heading = next(i for i, line in enumerate(lines) if "ready; connect with" in line)
            printed = lines[heading + 1]
            lines = lines[: heading + 1]
            assert printed.lstrip().startswith("psql '"), printed
            assert (pg.password_for("postgres") in printed) is reveal, printed
            assert ("password hidden" in lines[-1]) is not reveal
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)

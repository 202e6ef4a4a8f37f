"""Where neonpoly keeps its state: integrations, cache entries, the embedded origin."""

from __future__ import annotations

import os
import time
from pathlib import Path

import platformdirs

from neonpoly.defaults import ENV_STATE_DIR, environment

STATE_DIR_ENV = ENV_STATE_DIR


def state_dir(explicit: Path | None = None) -> Path:
    """`--state-dir`, else $NEONPOLY_STATE_DIR, else the platform's user data dir."""
    if explicit is not None:
        path = explicit
    elif (env := environment().state_dir) is not None:
        path = Path(env)
    else:
        path = Path(platformdirs.user_data_dir("neonpoly", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


class StateInUse(Exception):
    """Another neonpoly process serves from this state dir (its embedded origin, its caches)."""


class StateLock:
    """One serving neonpoly per state dir.

    Two processes on one state dir would share (and stop) one embedded PostgreSQL and fight
    over the cache directories, so the second one refuses to start, naming the first.
    The lock is an flock: it dies with the process, so a crash never leaves it behind.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "neonpoly.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # A few tries: `holder()` in another process holds a shared lock for an instant.
            for attempt in range(5):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 4:
                        raise
                    time.sleep(0.02)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateInUse(
                f"another neonpoly (pid {holder}) is already serving from {self.path.parent}; "
                "stop it, attach to it with `neonpoly tui --attach HOST:PORT`, or use --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> int | None:
        """The pid of the process serving from this state dir, or None when none is.

        Tries a shared lock without waiting (flock cannot be queried) and drops it at once;
        a holder whose pid is unreadable counts as pid 0.
        """
        import fcntl

        if self._fd is not None:
            return os.getpid()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # never served from here, or not ours to read: nothing to find
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

"""Where neonpoly keeps its state: integrations, cache entries, the embedded origin."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

STATE_DIR_ENV = "NEONPOLY_STATE_DIR"


def state_dir(explicit: Path | None = None) -> Path:
    """`--state-dir`, else $NEONPOLY_STATE_DIR, else the platform's user data dir."""
    if explicit is not None:
        path = explicit
    elif os.environ.get(STATE_DIR_ENV):
        path = Path(os.environ[STATE_DIR_ENV])
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

"""Copying to the system clipboard when this machine has one, so "Copied" is true.

Textual's `copy_to_clipboard` only writes an OSC 52 sequence: the terminal may put the text
on the clipboard, or ignore it (tmux does by default, so do several terminals), and the app
cannot know which. A clipboard tool of the desktop the console runs on is certain; over SSH or
on a bare console there is none, and the console says what it did instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

TIMEOUT_SECONDS = 2.0


def clipboard_command(
    env: Mapping[str, str] | None = None, platform: str | None = None
) -> Sequence[str] | None:
    """The command that copies its stdin to the system clipboard here, or None."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    candidates: list[list[str]] = []
    if platform == "darwin":
        candidates.append(["pbcopy"])
    if env.get("WAYLAND_DISPLAY"):
        candidates.append(["wl-copy"])
    if env.get("DISPLAY"):
        candidates.append(["xclip", "-selection", "clipboard"])
        candidates.append(["xsel", "--clipboard", "--input"])
    if platform == "win32" or env.get("WSL_DISTRO_NAME"):
        candidates.append(["clip.exe"])
    for command in candidates:
        path = shutil.which(command[0], path=env.get("PATH"))
        if path is not None:
            return [path, *command[1:]]
    return None


def copy_with(command: Sequence[str], text: str) -> bool:
    """Run the clipboard tool with `text` on stdin; True when it says it succeeded.

    Blocking (up to TIMEOUT_SECONDS): call it from a thread. xclip and wl-copy stay in the
    background to serve the selection, so their output goes nowhere rather than to a pipe
    that would keep this call waiting."""
    try:
        done = subprocess.run(
            list(command),
            input=text.encode(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def tool_name(command: Sequence[str]) -> str:
    return os.path.basename(command[0])

"""Checkers that need no fixture (mypy: half a minute of CPU from a cold cache) started as soon
as the run is collected, on the core the single-threaded test run leaves mostly idle; their
test then only waits for the verdict. The same command, the same assertion: only when it
runs changes. `@starts_early(job)` marks such a test; tests/conftest.py starts the jobs of
the collected (not deselected) tests and stops any still running when the run ends.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Background:
    def __init__(self, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.cwd, self.env = list(argv), cwd, env
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        if self._proc is None:
            # A file, not a pipe: a long report must not block the checker until its test runs.
            self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by result or stop)
            self._proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def result(self, timeout: float) -> tuple[int, str]:
        """(exit status, output): of the run started early, or of one started now."""
        self.start()
        assert self._proc is not None and self._out is not None
        code = self._proc.wait(timeout)
        self._out.seek(0)
        output = self._out.read().decode(errors="replace")
        self._out.close()
        self._proc = self._out = None  # asked again (pytest --count, reruns): run again
        return code, output

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        if self._out is not None:
            self._out.close()
        self._proc = self._out = None


def starts_early(job: Background) -> Callable[[F], F]:
    def mark(test: F) -> F:
        test.background = job  # type: ignore[attr-defined]
        return test

    return mark

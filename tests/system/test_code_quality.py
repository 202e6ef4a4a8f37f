"""The house rules on types and style are checked like everything else: by the test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.background import Background, starts_early

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = run(str(BIN / "ruff"), "check", "neonpoly", "tests", "benchmarks", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


MYPY = Background(str(BIN / "mypy"), cwd=ROOT)  # packages and strictness from pyproject.toml


@starts_early(MYPY)  # as the run starts: its test only waits for the verdict
@pytest.mark.timeout(600)  # a cold cache on a loaded 2-core machine takes minutes (as run() allows)
def test_mypy_strict_is_clean() -> None:
    code, output = MYPY.result(timeout=600)
    assert code == 0, output

"""The layering rules of ARCHITECTURE.md, enforced rather than hoped for (the contracts
themselves are `[tool.importlinter]` in pyproject.toml; these tests run them and add a few
rules import-linter cannot say)."""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "neonpoly"

SQLGLOT_ALLOWED = {
    "cache/policy.py",
    "cache/queries.py",
    "cache/statements.py",
    "cache/template.py",
    "cache/volatility.py",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            prefix = "neonpoly." if node.level and not node.module.startswith("neonpoly") else ""
            found.add(prefix + node.module)
            # `from neonpoly import tui` imports the module neonpoly.tui
            found.update(f"{prefix}{node.module}.{alias.name}" for alias in node.names)
    return found


@functools.cache  # parsed once a run (0.8 s of CPU), not by each of the tests that ask
def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports_of(p) for p in PACKAGE.rglob("*.py")}


def uses(imports: set[str], package: str) -> bool:
    return any(name == package or name.startswith(package + ".") for name in imports)


def test_engine_never_imports_textual() -> None:
    offenders = [m for m, imp in modules().items() if uses(imp, "textual") and not m.startswith("tui/")]
    assert offenders == []


def test_codec_imports_nothing_of_neonpoly() -> None:
    assert not uses(modules()["pgwire.py"], "neonpoly")


def test_only_the_disk_tier_imports_diskcache() -> None:
    assert [m for m, imp in modules().items() if uses(imp, "diskcache")] == ["cache/disk.py"]


def test_only_the_policy_imports_sqlglot() -> None:
    users = {m for m, imp in modules().items() if uses(imp, "sqlglot")}
    assert users <= SQLGLOT_ALLOWED, users - SQLGLOT_ALLOWED


def test_the_import_contracts_hold() -> None:
    """Layers, no cycles (TYPE_CHECKING imports count), the console kept off the engine, test
    doubles kept out of the product: `[tool.importlinter]` in pyproject.toml."""
    # PYTHONPATH: analyse this checkout's package, whichever one the venv was installed from.
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_top_of_the_package_stays_small() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top


def test_no_file_grows_past_600_lines() -> None:
    roots = [PACKAGE, PACKAGE.parent / "tests", PACKAGE.parent / "benchmarks", PACKAGE.parent / "scripts"]
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for root in roots
        for p in root.rglob("*.py")
        if ".venv" not in p.parts and (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_the_engine_bounds_awaits_with_asyncio_timeout_never_wait_for() -> None:
    """Python 3.11's `asyncio.wait_for` swallows a cancel that lands as the awaited call ends
    (the task goes on as if never cancelled). The plane's reader loop, cancelled by close()
    just as its rejoin ended, then ran on and close() never returned (a CI hang, 1 run in
    5 of the workers' suite under load). `asyncio.timeout` counts cancels and re-raises."""
    calls = {
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "wait_for"
        and isinstance(node.value, ast.Name) and node.value.id == "asyncio"
    }
    assert calls == set()


def test_running_the_proxy_loads_no_textual() -> None:
    code = (
        "import sys, neonpoly.service, neonpoly.admin.console, neonpoly.control.serving, neonpoly.cli.serve;"
        "assert 'textual' not in sys.modules, 'textual imported by the engine'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_session_never_knows_its_server() -> None:
    """The session talks to a SessionHost (proxy/host.py); only the server imports the session."""
    for module, imported in modules().items():
        if module.startswith("proxy/") and module != "proxy/server.py":
            assert not uses(imported, "neonpoly.proxy.server"), module

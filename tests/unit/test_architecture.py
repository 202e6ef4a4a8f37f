"""The layering rules of architecture.md, enforced rather than hoped for."""

from __future__ import annotations

import ast
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


def test_imports_flow_one_way() -> None:
    """cli → tui → control → proxy → cache / pgwire / stats; never backwards."""
    for module, imported in modules().items():
        if module.startswith(("proxy/", "cache/")) or module in ("pgwire.py", "stats.py"):
            for upper in ("neonpoly.tui", "neonpoly.cli", "neonpoly.control", "neonpoly.control_impl"):
                assert not uses(imported, upper), f"{module} imports {upper}"
        if module.startswith("cache/"):  # the cache serves the proxy, never the reverse
            assert not uses(imported, "neonpoly.proxy"), module
        if not module.startswith("cli"):
            clis = [name for name in imported if name.startswith("neonpoly.cli")]
            assert not clis, f"{module} imports the command line: {clis}"
        if module.startswith("tui/"):
            for engine in ("neonpoly.proxy", "neonpoly.cache", "neonpoly.service"):
                assert not uses(imported, engine), f"{module} reaches past control into {engine}"


def test_running_the_proxy_loads_no_textual() -> None:
    code = (
        "import sys, neonpoly.service, neonpoly.admin, neonpoly.control_impl;"
        "assert 'textual' not in sys.modules, 'textual imported by the engine'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


ENGINE = ("proxy/", "cache/")


def module_name(path: str) -> str:
    name = "neonpoly." + path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def engine_graph() -> dict[str, set[str]]:
    """Imports among the modules of proxy/ and cache/, TYPE_CHECKING ones included."""
    found = {module_name(m): imp for m, imp in modules().items() if m.startswith(ENGINE)}
    return {m: {i for i in imp if i in found and i != m} for m, imp in found.items()}


def test_engine_modules_import_each_other_without_cycles() -> None:
    graph = engine_graph()
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_a_session_never_knows_its_server() -> None:
    """The session talks to a SessionHost (proxy/host.py); only the server imports the session."""
    for module, imported in modules().items():
        if module.startswith("proxy/") and module != "proxy/server.py":
            assert not uses(imported, "neonpoly.proxy.server"), module


def test_no_module_is_too_long() -> None:
    """A module past 600 lines holds more than one responsibility: split it."""
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in lengths.items() if n > 600} == {}

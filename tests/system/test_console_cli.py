"""`neonpoly tui` from the command line: no terminal is one line, and a state dir already
served by `neonpoly serve` is attached to rather than fought over."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from neonpoly.cli.main import build_parser, console_control
from neonpoly.control.attached import AttachedControl
from neonpoly.control.local import LocalControl
from tests.pgharness import PgServer
from tests.system.conftest import DATABASE, ROLE, ServeProcess, run_cli


def test_tui_without_a_terminal_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "neonpoly.cli", "tui", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""  # no escape codes written anywhere
    assert done.stderr.count("\n") == 1 and "needs a terminal" in done.stderr, done.stderr


async def test_a_second_console_attaches_to_the_running_serve(
    pg: PgServer, state_root: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    await run_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    args = build_parser().parse_args(["tui", "--state-dir", str(state_root)])
    alone, _ = console_control(args)
    assert isinstance(alone, LocalControl)  # nothing serves the state dir: a proxy of its own

    serve = start_serve(state_root, "--listen", "127.0.0.1:0")
    control, root = console_control(args)
    assert root == state_root
    assert isinstance(control, AttachedControl) and control.address == ("127.0.0.1", serve.port)
    await control.start()
    try:
        header = control.header()
        assert header.running and header.listen == f"127.0.0.1:{serve.port} (attached)"
        [view] = control.integrations()
        assert view.name == "shop" and control.status(view.cache_id).origin == f"127.0.0.1:{pg.port}"
    finally:
        await control.close()

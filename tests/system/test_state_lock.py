"""One serving neonpoly per state dir: a second one refuses instead of sharing (and stopping)
the first one's embedded PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from neonpoly.control.interface import ControlError
from neonpoly.control.local import LocalControl
from neonpoly.service import ProxySettings
from neonpoly.state import StateLock
from tests.pgharness import PgServer


def serve(state: Path, pg: PgServer) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "neonpoly.cli", "serve", "--upstream", pg.url("postgres", "app"),
         "--listen", "127.0.0.1:0", "--state-dir", str(state), "--no-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip


@pytest.mark.timeout(300)  # two serve processes start, one after the other
async def test_second_instance_on_a_state_dir_refuses(pg: PgServer, tmp_path: Path) -> None:
    first = serve(tmp_path, pg)
    try:
        # A Python process's start (imports, the state dir, the origin check) took over 20 s on
        # a 2-core machine under a load of 10: a wait, not a bound.
        deadline = time.monotonic() + 90
        while not (tmp_path / "neonpoly.pid").exists() or not (tmp_path / "neonpoly.pid").read_text().strip():
            assert time.monotonic() < deadline and first.poll() is None, "first serve did not start"
            time.sleep(0.1)
        assert StateLock(tmp_path).holder() == first.pid  # how `integrations remove` and `tui` find it
        second = serve(tmp_path, pg)
        _, err = second.communicate(timeout=90)
        assert second.returncode == 2
        lines = [line for line in err.splitlines() if line.startswith("neonpoly:")]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "already serving" in lines[0], err
        # How to use it: the lock alone could only say `tui --attach HOST:PORT`, a placeholder.
        assert f"`neonpoly tui --state-dir {tmp_path}` attaches" in lines[0], err
        assert "Traceback" not in err
        control = LocalControl(tmp_path, ProxySettings(listen=("127.0.0.1", 0)))
        with pytest.raises(ControlError, match="already serving"):
            await control.start()
        await control.close()
        assert first.poll() is None  # the first one is untouched
    finally:
        first.terminate()
        first.communicate(timeout=30)
    # Once it is gone, the state dir is free again (the lock dies with its process).
    assert StateLock(tmp_path).holder() is None
    control = LocalControl(tmp_path, ProxySettings(listen=("127.0.0.1", 0)))
    await control.start()
    await control.close()

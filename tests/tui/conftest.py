"""Fixtures for console tests: a Neon stand-in whose primary branch's read-write endpoint is
the session's real PostgreSQL (`pg`), and a LocalControl on a fresh state dir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from textual.app import App
from textual.notifications import SeverityLevel

from neonpoly._testing.neon_standin import (
    NeonStandin,
    SeedBranch,
    SeedDatabase,
    SeedEndpoint,
    SeedProject,
    SeedRole,
)
from neonpoly.control.local import LocalControl
from neonpoly.integrations.neon_api import RetryPolicy
from neonpoly.service import ProxySettings
from neonpoly.tui import clipboard
from tests.pgharness import NEON_HOST, PgServer

# Two databases and two roles on the primary branch, so the Manage drawer's selects matter.
DATABASES = ("app", "postgres")
ROLES = ("scram_user", "md5_user")


def shop_project(pg: PgServer) -> SeedProject:
    endpoint_id = NEON_HOST.split(".")[0]
    return SeedProject(
        "shop",
        branches=[
            SeedBranch("dev", endpoints=[SeedEndpoint("read_write", "active")]),
            SeedBranch(
                "main",
                default=True,
                endpoints=[
                    SeedEndpoint("read_only", "active"),
                    SeedEndpoint("read_write", "idle", id=endpoint_id, host=NEON_HOST),
                ],
                databases=[SeedDatabase(name, "scram_user") for name in DATABASES],
                roles=[SeedRole(name, pg.password_for(name)) for name in ROLES],
            ),
        ],
    )


@pytest.fixture(autouse=True)
def no_system_clipboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Console tests never write to the clipboard of the machine running them: `c` sends
    OSC 52 only (headless: nowhere), unless a test hands the app a clipboard tool."""
    monkeypatch.setattr(clipboard, "clipboard_command", lambda *args, **kwargs: None)


# How long a test's notifications last: the tests read what the console said from
# `app._notifications`, and a note expires after its timeout (5 s by default) of wall time,
# which a loaded 2-core machine spent between a key and the read (test_keys, test_flow).
LASTING_NOTES = 3600.0


@pytest.fixture(autouse=True)
def lasting_notifications(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every notification lasts the whole test (what it says is unchanged)."""
    notify = App.notify

    def lasting(
        self: App[object],
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        notify(self, message, title=title, severity=severity, timeout=LASTING_NOTES, markup=markup)

    monkeypatch.setattr(App, "notify", lasting)


@pytest.fixture
async def neon_shop(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NeonStandin]:
    async with NeonStandin([shop_project(pg)]) as standin:
        monkeypatch.setenv("NEON_API_KEY", standin.api_key)
        monkeypatch.delenv("NEON_API_HOST", raising=False)
        yield standin


@pytest.fixture
def control(pg: PgServer, neon_shop: NeonStandin, state_root: Path) -> LocalControl:
    """The real facade: Neon discovery against the stand-in, the proxy on a free port, the
    origin dialled at the `pg` fixture under the endpoint's host name."""
    return LocalControl(
        state_root,
        ProxySettings(listen=("127.0.0.1", 0), cache_dir=state_root / "cache"),
        api_host=neon_shop.base_url,
        connect_to=f"{NEON_HOST}:5432:127.0.0.1:{pg.port}",
        retry=RetryPolicy(attempts=1),
    )

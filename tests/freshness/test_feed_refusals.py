"""An origin without logical replication: `auto` serves without a feed and says why (one log
line, SHOW CACHES); `on` refuses to start with one readable line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from neonpoly.control.interface import ControlError
from neonpoly.freshness.changefeed import FeedSettings
from tests.freshness.conftest import feed_proxy, until
from tests.pgharness import PgServer

REASON = "wal_level is replica (a change feed needs wal_level=logical)"


async def test_auto_is_off_with_the_reason_in_show_caches(
    pg: PgServer, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="neonpoly.changefeed")
    async with feed_proxy(pg, state_dir, FeedSettings(mode="auto")) as proxy:
        await until(lambda: proxy.service.report().caches[0].change_feed.startswith("off"), "the feed's verdict")
        assert proxy.service.report().caches[0].change_feed == f"off: {REASON}"
        admin = await asyncpg.connect(**{**proxy.dsn("neonpoly")})
        try:
            [row] = await admin.fetch("SHOW CACHES")
        finally:
            await admin.close()
        assert row["change_feed"] == f"off: {REASON}"
        assert row["feed_changes"] == 0 and row["feed_last_change"] is None
        # Serving goes on without it: a client's session does not make the feed ask again.
        client = await asyncpg.connect(**proxy.dsn())
        try:
            assert await client.fetchval("SELECT 1") == 1
        finally:
            await client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "neonpoly.changefeed" and "off" in r.getMessage()]
    assert lines == [f"change feed off for {pg.host}:{pg.port}/app: {REASON}"]


async def test_auto_is_off_for_a_role_without_replication(pg_logical: PgServer, state_dir: Path) -> None:
    async with feed_proxy(pg_logical, state_dir, FeedSettings(mode="auto"), role="scram_user") as proxy:
        await until(lambda: proxy.service.report().caches[0].change_feed.startswith("off"), "the feed's verdict")
        assert proxy.service.report().caches[0].change_feed == (
            "off: role scram_user may not replicate (it needs the REPLICATION attribute)"
        )


async def test_on_refuses_to_start(pg: PgServer, state_dir: Path) -> None:
    with pytest.raises(ControlError) as refused:
        async with feed_proxy(pg, state_dir, FeedSettings(mode="on")):
            pass
    assert str(refused.value) == f"--change-feed on: no change feed for {pg.host}:{pg.port}/app: {REASON}"


def test_serve_with_change_feed_on_exits_with_one_line(pg: PgServer, state_dir: Path) -> None:
    env = {**os.environ, "NEONPOLY_STATE_DIR": str(state_dir / "state")}
    done = subprocess.run(
        [sys.executable, "-m", "neonpoly.cli", "serve", "--upstream", pg.url("postgres", "app"),
         "--listen", "127.0.0.1:0", "--change-feed", "on"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"neonpoly: --change-feed on: no change feed for {pg.host}:{pg.port}/app: {REASON}"
    ), done.stderr
    assert "Traceback" not in done.stderr

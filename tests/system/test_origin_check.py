"""`integrations add --upstream` logs in to the origin before recording it (issue 12, point 3),
and the origin's databases and roles are what the Manage drawer offers (point 9)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from neonpoly.cli import integrations as cli_integrations
from neonpoly.cli.main import build_parser
from neonpoly.cli.running import CLIError
from neonpoly.control.attached import AttachedControl
from neonpoly.control.interface import ControlError
from neonpoly.control.local import LocalControl
from neonpoly.control.serving import start_serving
from neonpoly.integrations.store import MASK, IntegrationStore
from neonpoly.service import ProxyService, ProxySettings
from tests.pgharness import PgServer
from tests.system.conftest import ROLE, psql


async def add(*argv: str) -> str:
    out = io.StringIO()
    args = build_parser().parse_args(["integrations", "add", *argv])
    assert await cli_integrations.dispatch(args, out) == 0
    return out.getvalue()


async def add_error(*argv: str) -> str:
    args = build_parser().parse_args(["integrations", "add", *argv])
    with pytest.raises(CLIError) as info:
        await cli_integrations.dispatch(args, io.StringIO())
    message = str(info.value)
    assert "\n" not in message and "--no-check" in message, message
    return message


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound by us but not listening: a connection to it is refused, and no other
    process can take it while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _url(pg: PgServer, password: str, *, port: int | None = None, host: str = "127.0.0.1", db: str = "app") -> str:
    return f"postgres://{ROLE}:{password}@{host}:{port or pg.port}/{db}?sslmode=require"


async def test_an_origin_that_refuses_is_not_added(pg: PgServer, state_root: Path, closed_port: int) -> None:
    good = pg.password_for(ROLE)
    cases = [
        (_url(pg, good, port=closed_port), f"cannot reach the origin 127.0.0.1:{closed_port}: connection refused"),
        (_url(pg, good, host="nosuch.invalid"), "cannot reach the origin nosuch.invalid:"),
        (_url(pg, "not-the-password"), f"refused role '{ROLE}': password authentication failed"),
        (_url(pg, good, db="nosuchdb"), "has no database 'nosuchdb'"),
    ]
    for url, complaint in cases:
        message = await add_error("--upstream", url)
        assert complaint in message and "nothing added" in message, message
    assert IntegrationStore(state_root).load() == []

    # --no-check records it anyway (the origin may be down right now).
    out = await add("--upstream", _url(pg, good, port=closed_port), "--no-check", "--name", "later")
    assert "Added integration later" in out
    assert [i.name for i in IntegrationStore(state_root).load()] == ["later"]


def test_the_command_line_exits_non_zero_with_one_line(pg: PgServer, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "neonpoly.cli", "integrations", "add", "--state-dir", str(tmp_path / "state"),
         "--upstream", _url(pg, "wrong")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("neonpoly:")]
    assert len(errors) == 1 and "password authentication failed" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


async def test_a_checked_origin_lists_its_databases_and_roles(pg: PgServer, state_root: Path) -> None:
    out = await add("--upstream", _url(pg, pg.password_for(ROLE)))
    assert "Added integration app-local" in out  # not "127": the database, on this machine
    [item] = IntegrationStore(state_root).load()
    assert {"app", "postgres"} <= set(item.databases) and "template1" not in item.databases
    assert {"postgres", ROLE, "md5_user", "trust_user"} <= set(item.roles)
    assert (item.database, item.role) == ("app", ROLE)


async def test_a_role_without_a_password_is_reachable_but_unchecked(
    pg: PgServer, state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgres://{ROLE}@127.0.0.1:{pg.port}/app?sslmode=require"  # clients give the password
    out = await add("--upstream", url)
    assert "Added integration app-local" in out
    assert "needs a password, which its clients will give" in capsys.readouterr().err


async def test_refresh_lists_the_origin_now_and_other_roles_carry_no_password(
    pg: PgServer, state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add("--upstream", _url(pg, pg.password_for(ROLE)), "--no-check")  # lists only its own
    [item] = IntegrationStore(state_root).load()
    assert (item.databases, item.roles) == (("app",), (ROLE,))
    database = f"refresh_{os.getpid()}"
    async with pg.superuser_conn() as conn:
        await conn.execute(f"DROP DATABASE IF EXISTS {database}")
        await conn.execute(f"CREATE DATABASE {database}")
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=state_root / "cache"))
    running = await start_serving(service, state_root, follow=False)
    control = LocalControl(state_root, ProxySettings(listen=running.address))
    try:
        view = await control.refresh_choices(item.cache_id)
        assert database in view.databases and {"app", "postgres"} <= set(view.databases)
        assert {ROLE, "md5_user", "trust_user", "postgres"} <= set(view.roles)
        assert IntegrationStore(state_root).load()[0].roles == view.roles  # recorded
        assert view.password_known

        # Another role: neonpoly has no password for it, so the string carries none.
        view = control.select(item.cache_id, role="md5_user", database=database)
        assert not view.password_known
        for reveal in (False, True):
            url = control.connection_string(item.cache_id, reveal=reveal)
            assert url.startswith(f"postgres://md5_user@127.0.0.1:{running.address[1]}/{database}?"), url
            assert MASK not in url
        monkeypatch.setenv("PGPASSWORD", pg.password_for("md5_user"))  # what the user types
        assert await psql(url, "SELECT current_user || '@' || current_database()") == f"md5_user@{database}"

        # The attached console asks the origin the same way.
        attached = AttachedControl(running.address, state_root)
        assert (await attached.refresh_choices(item.cache_id)).databases == view.databases
    finally:
        await running.close(grace=0.5)
        async with pg.superuser_conn() as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


async def test_refresh_of_an_unreachable_origin_is_one_line(state_root: Path, closed_port: int) -> None:
    await add("--upstream", f"postgres://u:pw@127.0.0.1:{closed_port}/app", "--no-check")
    [item] = IntegrationStore(state_root).load()
    with pytest.raises(ControlError) as info:
        await LocalControl(state_root).refresh_choices(item.name)
    assert "connection refused" in str(info.value) and "\n" not in str(info.value)

"""What a newcomer ran into in a first hour with the CLI, driven through the real parser and
dispatchers (a real in-process proxy where a serve is needed; nothing mocked)."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from neonpoly.admin.commands import AdminError
from neonpoly.admin.commands import parse as parse_admin
from neonpoly.cli.serve import warn_if_unreachable
from neonpoly.control.serving import start_serving
from neonpoly.integrations.store import IntegrationStore, record_embedded
from neonpoly.proxy.origin import Origin
from neonpoly.service import ProxyService, ProxySettings
from neonpoly.state import StateLock
from tests.pgharness import PgServer
from tests.system.conftest import DATABASE, ROLE
from tests.system.test_cli_rough_edges import Captured, admin_cli, integrations_cli, integrations_error, parse


@pytest.mark.parametrize(
    ("argv", "command", "error"),
    [
        (["serve", "--bogus"], "neonpoly serve", "unrecognized arguments: --bogus"),
        (["serve", "--listen", "bogus"], "neonpoly serve", "argument --listen: not HOST:PORT"),
        (["rules", "add", "--table", "t", "--ttl", "1", "--zzz"], "neonpoly rules add", "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line_naming_the_commands_help(
    argv: list[str], command: str, error: str, capsys: Captured
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()  # not a dozen lines of usage first
    assert line.startswith(f"{command}: error: {error}") and f"`{command} --help`" in line, line


async def test_admin_command_without_a_serve_names_the_state_dir(state_root: Path, capsys: Captured) -> None:
    with socket.socket() as spare:  # a port nothing listens on, recorded as a serve would
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    IntegrationStore(state_root).set_listen("127.0.0.1", port)
    status, _, err = await admin_cli(capsys, "stats")
    assert status == 2
    assert err.splitlines() == [
        f"neonpoly: cannot reach neonpoly at 127.0.0.1:{port}: connection refused; no neonpoly serves the state "
        f"dir {state_root}: start `neonpoly serve`, or give its --state-dir or --admin"
    ], err  # one line, the hint after the message


def _service(root: Path) -> ProxyService:
    return ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=root / "cache", rules_dir=root))


async def test_add_says_whether_the_running_serve_took_it(pg: PgServer, state_root: Path) -> None:
    await integrations_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    lock = StateLock(state_root)  # held as `neonpoly serve` holds it: how the CLI finds the serve
    lock.acquire()
    try:
        # A serve given --upstream serves that alone: "picks it up" would send users to a refused string.
        running = await start_serving(_service(state_root), state_root, upstream=pg.url(ROLE, DATABASE, "require"))
        try:
            out = await integrations_cli("integrations", "add", "--upstream", pg.url(ROLE, "postgres"), "--name", "a")
        finally:
            await running.close(grace=0)
        assert "served      no: neonpoly (pid " in out and "restart it without --upstream" in out, out

        running = await start_serving(_service(state_root), state_root, follow_every=0.05)
        try:
            other = pg.url(ROLE, "postgres", host="localhost")  # the same server under another name
            out = await integrations_cli("integrations", "add", "--upstream", other, "--name", "b")
            cache_id = next(i.cache_id for i in IntegrationStore(state_root).load() if i.name == "b")
            assert cache_id in running.service.routes.by_id
        finally:
            await running.close(grace=0)
        assert f"served      now, by neonpoly (pid {lock.holder()}) at 127.0.0.1:{running.address[1]}" in out, out
    finally:
        lock.release()


async def test_a_second_embedded_add_leaves_the_running_cluster_alone(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NEON_API_KEY", raising=False)
    store = IntegrationStore(state_root)
    # Recorded as a serve's first start does; the port is nobody's: nothing may try to start it.
    record_embedded(store, Origin(host="127.0.0.1", port=1, sslmode="disable"), "neon", "neondb", "pw")
    message = await integrations_error("integrations", "add", "--name", "second")
    assert "already has its integration 'local'" in message and "connection-string local" in message, message
    assert not (state_root / "embedded").exists()
    assert [i.name for i in store.load()] == ["local"]


async def test_connection_string_admin_opens_the_admin_database(state_root: Path, capsys: Captured) -> None:
    await integrations_cli("integrations", "add", "--upstream", "postgres://u:pw@db.example.com/app", "--no-check")
    url = urlsplit((await integrations_cli("connection-string", "--admin", "--reveal")).strip())
    cache_id = IntegrationStore(state_root).load()[0].cache_id
    assert (url.username, url.password, url.path) == ("u", "pw", "/neonpoly")
    assert f"application_name={cache_id}" in url.query  # the login is checked by this cache's origin
    with pytest.raises(SystemExit):
        parse("connection-string", "--admin", "--database", "app")
    assert "not allowed with argument --admin" in capsys.readouterr().err


@pytest.mark.parametrize("sql", ["PURGE QUERY nope", "CREATE RULE ON QUERY zzz NEVER", "PURGE QUERY 3be04863778f63e"])
def test_a_template_id_that_cannot_exist_is_refused(sql: str) -> None:
    # Before: "0 removed", or a rule that silently never applied.
    with pytest.raises(AdminError) as info:
        parse_admin(sql)
    assert info.value.sqlstate == "22023" and info.value.message.startswith("not a template id: ")
    assert parse_admin("PURGE QUERY 3BE04863778F63ED").name == "3be04863778f63ed"


@pytest.mark.parametrize("argv", [["purge", "--query", "nope"], ["rules", "add", "--query", "zzz", "--never"]])
def test_the_cli_refuses_a_template_id_before_dialling(argv: list[str], capsys: Captured) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "not a template id" in capsys.readouterr().err


async def test_serve_upstream_warns_when_the_origin_does_not_answer(caplog: pytest.LogCaptureFixture) -> None:
    # Before, `serve --upstream` with a mistyped port said "caching 127.0.0.1:1" and nothing
    # else until the first client failed.
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
        assert not await warn_if_unreachable(Origin(host="127.0.0.1", port=port, sslmode="disable"))
        [record] = [r for r in caplog.records if r.name == "neonpoly"]
        assert record.levelname == "WARNING" and f"the origin 127.0.0.1:{port} does not answer now" in record.message
        spare.listen()
        assert await warn_if_unreachable(Origin(host="127.0.0.1", port=port, sslmode="disable"))

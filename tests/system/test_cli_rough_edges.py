"""Rough edges a new user hit, driven through the real `neonpoly` parser and dispatchers.

Admin commands run against a real in-process proxy (integrations served from the state dir,
`install_admin` as `neonpoly serve` does); nothing is mocked.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from neonpoly.admin.console import AdminConsole
from neonpoly.cli import admin as cli_admin
from neonpoly.cli import integrations as cli_integrations
from neonpoly.cli.main import build_parser
from neonpoly.cli.running import CLIError
from neonpoly.control.serving import start_serving
from neonpoly.integrations.store import IntegrationStore
from neonpoly.service import ProxyService, ProxySettings
from tests.pgharness import PgServer
from tests.system.conftest import DATABASE, ROLE

Captured = pytest.CaptureFixture[str]


def parse(*argv: str) -> argparse.Namespace:
    """`neonpoly <argv>` through the parser the real CLI builds."""
    return build_parser().parse_args(list(argv))


async def admin_cli(capsys: Captured, *argv: str) -> tuple[int, str, str]:
    """Run an admin command as `neonpoly` would; (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = await cli_admin.dispatch(parse(*argv))
    out, err = capsys.readouterr()
    return status, out, err


async def integrations_cli(*argv: str) -> str:
    out = io.StringIO()
    assert await cli_integrations.dispatch(parse(*argv), out) == 0
    return out.getvalue()


async def integrations_error(*argv: str) -> str:
    with pytest.raises(CLIError) as info:
        await cli_integrations.dispatch(parse(*argv), io.StringIO())
    message = str(info.value)
    assert "\n" not in message, message
    return message


@dataclass
class Serving:
    service: ProxyService
    console: AdminConsole
    port: int
    cache_ids: dict[str, str]  # integration name -> cache id


@pytest.fixture
async def serving(pg: PgServer, state_root: Path) -> AsyncIterator[Serving]:
    """Two URL integrations served like `neonpoly serve` does, on a port other than 6543."""
    await integrations_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    await integrations_cli("integrations", "add", "--upstream", pg.url(ROLE, "postgres", "require"), "--name", "ops")
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=state_root / "cache"))
    running = await start_serving(service, state_root, follow=False)  # records where it listens
    try:
        port = running.address[1]
        assert port != 6543
        ids = {i.name: i.cache_id for i in IntegrationStore(state_root).load()}
        yield Serving(service, running.admin, port, ids)
    finally:
        await running.close(grace=0.5)


# -- 1. empty values are usage errors, never "everything" ---------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["purge", "--table", ""],
        ["purge", "--query", ""],
        ["purge", "--table", "  "],
        ["rules", "add", "--table", "", "--ttl", "5"],
        ["rules", "add", "--query", "", "--never"],
        ["rules", "drop", ""],
        ["stats", "--cache", ""],
        ["queries", "--user", ""],
        ["stats", "--password", ""],
        ["stats", "--state-dir", ""],
        ["integrations", "add", "--upstream", ""],
        ["integrations", "add", "--name", ""],
        ["integrations", "remove", ""],
        ["connection-string", "--listen", ""],
    ],
)
def test_empty_values_are_argparse_errors(argv: list[str], capsys: Captured) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("neonpoly ") and "error: argument" in err[-1] and "empty value" in err[-1], err


@pytest.mark.parametrize("ttl", ["-1", "nan", "inf", "soon"])
def test_rule_ttl_must_be_finite_seconds(ttl: str, capsys: Captured) -> None:
    with pytest.raises(SystemExit) as info:
        parse("rules", "add", "--table", "t", "--ttl", ttl)
    assert info.value.code == 2
    assert "argument --ttl" in capsys.readouterr().err


# -- 2 and 5. integration names: unique on add, never guessed on lookup -------------------


async def test_add_refuses_a_taken_name(state_root: Path) -> None:
    await integrations_cli(
        "integrations", "add", "--upstream", "postgres://u@db.example.com/app", "--no-check", "--name", "shop"
    )
    message = await integrations_error(
        "integrations", "add", "--upstream", "postgres://u@other.example.com/app", "--no-check", "--name", "shop"
    )
    assert "'shop' already exists" in message and "--name" in message
    # The default name (the URL's first host label) is checked too.
    await integrations_cli("integrations", "add", "--upstream", "postgres://u@db.example.com/other", "--no-check")
    message = await integrations_error(
        "integrations", "add", "--upstream", "postgres://u@db.example.org/app", "--no-check"
    )
    assert "'db' already exists" in message and "--name" in message
    assert [i.name for i in IntegrationStore(state_root).load()] == ["shop", "db"]


def _duplicate_locals(state_root: Path) -> list[str]:
    """A state file from before names were unique: two integrations both named "local"."""
    store = IntegrationStore(state_root)
    store.update(
        lambda s: replace(s, integrations=tuple(replace(i, name="local") for i in s.integrations), listen=s.listen)
    )
    return [i.cache_id for i in store.load()]


async def test_ambiguous_names_are_refused_with_their_ids(state_root: Path, capsys: Captured) -> None:
    await integrations_cli("integrations", "add", "--upstream", "postgres://u@a.example.com/app", "--no-check")
    await integrations_cli("integrations", "add", "--upstream", "postgres://u@b.example.com/app", "--no-check")
    ids = _duplicate_locals(state_root)

    for argv in (["integrations", "remove", "local"], ["connection-string", "local"]):
        message = await integrations_error(*argv)
        assert "2 integrations are named 'local'" in message and all(i in message for i in ids), message
    assert [i.cache_id for i in IntegrationStore(state_root).load()] == ids  # nothing removed

    # --cache is resolved before dialling: no proxy needed to refuse the ambiguity.
    status, _, err = await admin_cli(capsys, "stats", "--cache", "local", "--admin", "127.0.0.1:1")
    assert status == 2 and err.count("\n") == 1 and all(i in err for i in ids), err

    # An id still picks exactly one, and removing it makes the name unambiguous again.
    assert "Removed integration local" in await integrations_cli("integrations", "remove", ids[0])
    assert [i.cache_id for i in IntegrationStore(state_root).load()] == ids[1:]
    assert f"application_name={ids[1]}" in await integrations_cli("connection-string", "local")


# -- 3 and 5. the admin address and --cache names come from the state dir -----------------


async def test_admin_commands_find_serve_through_the_state_dir(serving: Serving, capsys: Captured) -> None:
    # No --admin: the address `serve` recorded (not 127.0.0.1:6543) is used.
    status, out, err = await admin_cli(capsys, "stats", "--json", "--user", "postgres")
    assert status == 0, err
    assert {r["cache"] for r in json.loads(out)} == {*serving.cache_ids.values(), "(all)"}

    # --cache takes an integration name.
    status, out, err = await admin_cli(capsys, "stats", "--json", "--user", "postgres", "--cache", "shop")
    assert status == 0, err
    assert [r["cache"] for r in json.loads(out)] == [serving.cache_ids["shop"]]
    status, out, err = await admin_cli(
        capsys, "rules", "add", "--table", "orders", "--ttl", "5", "--cache", "ops", "--user", "postgres"
    )
    assert status == 0, err
    status, out, err = await admin_cli(capsys, "rules", "--json", "--user", "postgres")
    rules = json.loads(out)
    assert [(r["cache"], r["name"], r["ttl_s"]) for r in rules] == [(serving.cache_ids["ops"], "orders", 5.0)]


async def test_state_dir_option_wins_over_the_environment(
    serving: Serving, state_root: Path, capsys: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = state_root.parent / "elsewhere"
    monkeypatch.setenv("NEONPOLY_STATE_DIR", str(elsewhere))
    # The empty state dir knows no serve: the last fallback, 127.0.0.1:6543, is dialled.
    status, _, err = await admin_cli(capsys, "stats", "--user", "postgres")
    assert status == 2 and "127.0.0.1:6543" in err, err
    status, out, err = await admin_cli(capsys, "queries", "--state-dir", str(state_root), "--user", "postgres")
    assert status == 0 and "template_id" in out, err


# -- 4. errors print once; identifiers are quoted ----------------------------------------


async def test_admin_error_prints_message_and_one_hint(serving: Serving, capsys: Captured) -> None:
    status, out, err = await admin_cli(capsys, "stats", "--cache", "nosuch", "--user", "postgres")
    assert status == 1 and out == ""
    assert err.splitlines() == ['neonpoly: no cache "nosuch"', "hint: SHOW CACHES lists them"], err


async def test_quotes_in_names_reach_the_console_intact(serving: Serving, capsys: Captured) -> None:
    # Unescaped, 'x"y' left a stray quote: the console could not even read the statement.
    status, _, err = await admin_cli(capsys, "stats", "--cache", 'x"y', "--user", "postgres")
    assert status == 1 and err.startswith("neonpoly: no cache") and "cannot read" not in err, err

    for table in ('my"tab', "My Tab", "Public.Orders", '"Mixed"'):
        status, out, err = await admin_cli(capsys, "purge", "--table", table, "--user", "postgres")
        assert status == 0 and out.startswith("Purged 0 entries reading "), (table, out, err)
        status, out, err = await admin_cli(
            capsys, "rules", "add", "--table", table, "--never", "--user", "postgres", "--cache", "shop"
        )
        assert status == 0, (table, err)
    status, out, _ = await admin_cli(capsys, "rules", "--json", "--user", "postgres")
    # SQL spellings fold like SQL (unquoted lower case, schema dropped); other text is literal.
    assert sorted(r["name"] for r in json.loads(out)) == sorted(['my"tab', "My Tab", "orders", "Mixed"])


# -- 6 and 7. wording that is true, and help that explains ---------------------------------


async def test_add_message_is_true_with_or_without_a_running_serve(state_root: Path) -> None:
    out = await integrations_cli("integrations", "add", "--upstream", "postgres://u@db.example.com/app", "--no-check")
    assert "run `neonpoly serve` to serve it" not in out
    assert "a running `neonpoly serve` picks it up within a second; otherwise start one" in out


@pytest.mark.parametrize("command", cli_admin.COMMANDS)
def test_admin_commands_have_a_description(command: str, capsys: Captured) -> None:
    with pytest.raises(SystemExit) as info:
        parse(command, "--help")
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "admin database `neonpoly`" in text and f"Example: neonpoly {command}" in text
    assert "--state-dir" in text and "integration name" in text

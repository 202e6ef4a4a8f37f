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
from tests.system.conftest import DATABASE, ROLE, psql

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
    status, out, err = await admin_cli(capsys, "stats", "--json")
    assert status == 0, err
    assert {r["cache"] for r in json.loads(out)} == {*serving.cache_ids.values(), "(all)"}

    # --cache takes an integration name.
    status, out, err = await admin_cli(capsys, "stats", "--json", "--cache", "shop")
    assert status == 0, err
    assert [r["cache"] for r in json.loads(out)] == [serving.cache_ids["shop"]]
    status, out, err = await admin_cli(
        capsys, "rules", "add", "--table", "orders", "--ttl", "5", "--cache", "ops"
    )
    assert status == 0, err
    status, out, err = await admin_cli(capsys, "rules", "--json")
    rules = json.loads(out)
    assert [(r["cache"], r["name"], r["ttl_s"]) for r in rules] == [(serving.cache_ids["ops"], "orders", 5.0)]


async def test_state_dir_option_wins_over_the_environment(
    serving: Serving, state_root: Path, capsys: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = state_root.parent / "elsewhere"
    monkeypatch.setenv("NEONPOLY_STATE_DIR", str(elsewhere))
    # The empty state dir knows no serve: the last fallback, 127.0.0.1:6543, is dialled.
    status, _, err = await admin_cli(capsys, "stats")
    assert status == 2 and "127.0.0.1:6543" in err, err
    status, out, err = await admin_cli(capsys, "queries", "--state-dir", str(state_root))
    assert status == 0 and "template_id" in out, err


# -- 4. errors print once; identifiers are quoted ----------------------------------------


async def test_an_unknown_cache_is_one_line_naming_the_served_ones(serving: Serving, capsys: Captured) -> None:
    # Before: 'no cache "nosuch"' and "hint: SHOW CACHES lists them", a statement for psql.
    status, out, err = await admin_cli(capsys, "stats", "--cache", "nosuch")
    assert status == 1 and out == ""
    listed = ", ".join(f"{name} ({cid})" for name, cid in sorted(serving.cache_ids.items(), key=lambda x: x[1]))
    assert err.splitlines() == [f'neonpoly: no cache "nosuch"; --cache takes one of: {listed}'], err


async def test_quotes_in_names_reach_the_console_intact(serving: Serving, capsys: Captured) -> None:
    # Unescaped, 'x"y' left a stray quote: the console could not even read the statement.
    status, _, err = await admin_cli(capsys, "stats", "--cache", 'x"y')
    assert status == 1 and err.startswith("neonpoly: no cache") and "cannot read" not in err, err

    for table in ('my"tab', "My Tab", "Public.Orders", '"Mixed"'):
        status, out, err = await admin_cli(capsys, "purge", "--table", table)
        assert status == 0 and out.startswith("Purged 0 entries reading "), (table, out, err)
        status, out, err = await admin_cli(
            capsys, "rules", "add", "--table", table, "--never", "--cache", "shop"
        )
        assert status == 0, (table, err)
    status, out, _ = await admin_cli(capsys, "rules", "--json")
    # SQL spellings fold like SQL (unquoted lower case, schema dropped); other text is literal.
    assert sorted(r["name"] for r in json.loads(out)) == sorted(['my"tab', "My Tab", "orders", "Mixed"])


# -- 6 and 7. wording that is true, and help that explains ---------------------------------


async def test_add_message_is_true_with_or_without_a_running_serve(state_root: Path) -> None:
    out = await integrations_cli("integrations", "add", "--upstream", "postgres://u@db.example.com/app", "--no-check")
    assert "run `neonpoly serve` to serve it" not in out
    assert "served      not yet: no neonpoly serves this state dir; `neonpoly serve` will" in out


@pytest.mark.parametrize("command", cli_admin.COMMANDS)
def test_admin_commands_have_a_description(command: str, capsys: Captured) -> None:
    with pytest.raises(SystemExit) as info:
        parse(command, "--help")
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "admin database `neonpoly`" in text and f"Example: neonpoly {command}" in text
    assert "--state-dir" in text and "integration name" in text


# -- issue 12: output people read ----------------------------------------------------------


async def _traffic(pg: PgServer, serving: Serving, name: str, sql: str, runs: int) -> None:
    """Run `sql` `runs` times through the integration `name`, with the string it prints."""
    async with pg.superuser_conn() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS cli_items (id int PRIMARY KEY, name text);"
            f"INSERT INTO cli_items VALUES (1, 'lamp') ON CONFLICT DO NOTHING; GRANT SELECT ON cli_items TO {ROLE}"
        )
    url = (await integrations_cli("connection-string", name, "--reveal")).strip()
    for _ in range(runs):
        await psql(url, sql)


async def test_text_output_names_integrations_rounds_and_fits(
    pg: PgServer, serving: Serving, capsys: Captured
) -> None:
    long = "SELECT id AS " + ", name AS ".join(f"column_with_a_long_name_{i}" for i in range(12))
    await _traffic(pg, serving, "shop", long + " FROM cli_items WHERE id = 1", 4)  # miss, miss, hit, hit

    status, out, err = await admin_cli(capsys, "queries")
    assert status == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    header = lines[0].split()
    row = next(line for line in lines if "SELECT id AS column_with" in line).split()
    assert row[header.index("calls")] == "4" and row[header.index("hits")] == "2"
    assert row[header.index("hit_rate")] == "0.5"
    assert row[-1].endswith("…")  # the template is cut to fit, not wrapped

    status, wide, _ = await admin_cli(capsys, "queries", "--wide")
    assert status == 0 and "column_with_a_long_name_11" in wide and "last_seen" in wide.splitlines()[0]

    status, out, _ = await admin_cli(capsys, "stats")
    names = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert names == ["ops", "shop", "(all)"] or names == ["shop", "ops", "(all)"], out
    status, out, _ = await admin_cli(capsys, "stats", "--json", "--cache", "shop")
    [row_json] = json.loads(out)
    assert (row_json["cache"], row_json["cache_name"]) == (serving.cache_ids["shop"], "shop")


async def test_purge_answers_in_a_sentence(pg: PgServer, serving: Serving, capsys: Captured) -> None:
    await _traffic(pg, serving, "shop", "SELECT name FROM cli_items WHERE id = 1", 2)
    route = serving.service.routes.by_id[serving.cache_ids["shop"]]
    assert route.cache is not None
    route.cache.store.flush()
    status, out, err = await admin_cli(capsys, "purge", "--cache", "shop")
    assert (status, out) == (0, "Purged 1 entry from shop.\n"), err
    status, out, _ = await admin_cli(capsys, "purge", "--table", "orders")
    assert out == "Purged 0 entries reading orders from every cache.\n"


async def test_rules_mode_alone_shows_the_mode(serving: Serving, capsys: Captured) -> None:
    status, out, err = await admin_cli(capsys, "rules", "mode")
    assert status == 0, err
    modes = dict(line.split() for line in out.splitlines()[2:-1])
    assert modes == {"ops": "auto", "shop": "auto"}, out
    status, out, _ = await admin_cli(capsys, "rules", "mode", "fixed", "--cache", "shop")
    assert out == "Mode fixed for shop.\n"
    status, out, _ = await admin_cli(capsys, "rules", "mode", "--cache", "shop", "--json")
    assert [(r["cache_name"], r["mode"]) for r in json.loads(out)] == [("shop", "fixed")]
    status, out, _ = await admin_cli(capsys, "rules", "add", "--table", "orders", "--ttl", "2.5", "--cache", "ops")
    assert out.startswith("Added rule ") and out.endswith(": table orders cached for at most 2.5 s for ops.\n"), out


def test_every_option_has_help() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "neonpoly")
    assert missing == []


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("postgres://u@127.0.0.1:5432/app", "app-local"),
        ("postgres://u@localhost/shop", "shop-local"),
        ("postgres://u@[::1]:5433/app", "app-local"),
        ("postgres://u@10.0.0.5/app", "app-10-0-0-5"),
        ("postgres://u@db.example.com/app", "db"),
        ("postgres://u@127.0.0.1/", "u-local"),  # no database: libpq's default, the role's name
    ],
)
async def test_default_names_are_readable(url: str, name: str, state_root: Path) -> None:
    out = await integrations_cli("integrations", "add", "--upstream", url, "--no-check")
    assert out.startswith(f"Added integration {name}\n"), out

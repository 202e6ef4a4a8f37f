"""What a newcomer still ran into after the first hour's fixes (test_cli_first_hour.py), driven
through the real parser and dispatchers against real proxies and PostgreSQL processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import asyncpg
import pytest

from neonpoly.control.interface import ControlError
from neonpoly.control.serving import start_serving
from neonpoly.integrations.embedded import process_alive
from neonpoly.integrations.store import IntegrationStore
from neonpoly.proxy.origin import Origin
from neonpoly.service import ProxyService, ProxySettings
from neonpoly.state import StateLock
from tests.pgharness import PgServer
from tests.system.conftest import DATABASE, ROLE, psql
from tests.system.test_cli_rough_edges import (  # noqa: F401 (serving: a fixture)
    Captured,
    Serving,
    _traffic,
    admin_cli,
    integrations_cli,
    serving,
)


def _service(root: Path) -> ProxyService:
    return ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=root / "cache", rules_dir=root))


async def test_adding_the_embedded_origin_again_leaves_the_serves_cluster_running(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: `add` adopted the postmaster the serve had started, then stopped it on its way out,
    # and the serve took the new integration with its origin gone ("Connection refused").
    monkeypatch.delenv("NEON_API_KEY", raising=False)
    state_root.mkdir(parents=True)
    lock = StateLock(state_root)  # held as `neonpoly serve` holds it: how the CLI finds the serve
    lock.acquire()
    try:
        running = await start_serving(_service(state_root), state_root, follow_every=0.05)
        try:
            assert running.embedded.handle is not None
            postmaster = running.embedded.handle.cluster.pid
            assert postmaster is not None
            await integrations_cli("integrations", "remove", "local")
            out = await integrations_cli("integrations", "add")
            assert process_alive(postmaster), out
            assert (
                f"  embedded    PostgreSQL (pid {postmaster}) left running: "
                f"it was already running for neonpoly (pid {lock.holder()})\n"
            ) in out, out
            assert "served      now, by neonpoly" in out, out  # not "unknown": the login waits for the serve
            [item] = IntegrationStore(state_root).load()
            assert item.cache_id in running.service.routes.by_id
            host, port = running.address
            url = (await integrations_cli("connection-string", "--reveal", "--listen", f"{host}:{port}")).strip()
            assert await psql(url, "SELECT 41 + 1") == "42"
        finally:
            await running.close(grace=0)
    finally:
        lock.release()
    # With no serve on the state dir, `add` stops the cluster it started, and says so.
    await integrations_cli("integrations", "remove", "local")
    out = await integrations_cli("integrations", "add")
    assert "  embedded    PostgreSQL stopped again: no neonpoly uses it; `neonpoly serve` starts it\n" in out, out
    assert not (state_root / "embedded" / "postmaster.pid").exists()


async def test_remove_says_a_serve_given_upstream_is_unaffected(
    pg: PgServer, state_root: Path, capsys: Captured
) -> None:
    # Before: the CLI logged in to that serve as the integration's role, which its --upstream
    # origin refused, and said it could not confirm the serve "let it go" (leaving the files).
    await integrations_cli("integrations", "add", "--upstream", "postgres://u:pw@db.example.com/app", "--no-check")
    [item] = IntegrationStore(state_root).load()
    (state_root / "cache" / item.cache_id).mkdir(parents=True)  # as an earlier serve left it
    lock = StateLock(state_root)
    lock.acquire()
    try:
        running = await start_serving(_service(state_root), state_root, upstream=pg.url(ROLE, DATABASE, "require"))
        try:
            capsys.readouterr()
            await integrations_cli("connection-string", "db")  # that serve refuses it: said so
            assert capsys.readouterr().err == (
                f"neonpoly: the neonpoly at 127.0.0.1:{running.address[1]} (pid {os.getpid()}) serves only its "
                "--upstream and refuses this string; restart it without --upstream to serve it\n"
            )
            out = await integrations_cli("integrations", "remove", "db")
            assert "default" in running.service.routes.by_id
        finally:
            await running.close(grace=0)
    finally:
        lock.release()
    assert out == (
        "Removed integration db: its cache entries and directory are deleted. "
        f"neonpoly (pid {os.getpid()}) at 127.0.0.1:{running.address[1]} serves only its --upstream and never "
        "served db: it is unaffected, its connections stay.\n"
    ), out
    assert not (state_root / "cache" / item.cache_id).exists()
    assert IntegrationStore(state_root).load() == []


async def test_a_client_for_a_cache_not_served_is_told_what_is_and_how(pg: PgServer, state_root: Path) -> None:
    # Before: 'no neonpoly cache with id "…"; run `neonpoly integrations list`', which lists
    # the state dir's integrations, not what this serve serves.
    await integrations_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    [item] = IntegrationStore(state_root).load()
    running = await start_serving(_service(state_root), state_root, follow=False)
    try:
        host, port = running.address
        dsn = {**pg.dsn(ROLE, DATABASE), "host": host, "port": port, "ssl": False}
        unknown = "00000000-0000-4000-8000-000000000000"
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(**dsn, server_settings={"application_name": unknown})
        assert (info.value.sqlstate, info.value.severity) == ("3D000", "FATAL")
        assert info.value.args[0] == f'no neonpoly cache with id "{unknown}"'
        assert info.value.hint == (
            f"this neonpoly serves shop (application_name={item.cache_id}); `neonpoly connection-string NAME` "
            "prints one's string, `neonpoly integrations add` adds another"
        )
        running.service.remove_cache(item.cache_id)
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(**dsn, server_settings={"application_name": item.cache_id})
        assert info.value.sqlstate == "3D000" and info.value.args[0] == f'neonpoly cache "{item.cache_id}" was removed'
        assert info.value.hint == (
            "this neonpoly serves no cache now: add an integration with `neonpoly integrations add`"
        )
    finally:
        await running.close(grace=0)


async def test_admin_text_says_what_has_no_hit_rate_and_which_rules_exist(
    pg: PgServer,
    serving: Serving,  # noqa: F811 (the fixture imported above)
    capsys: Captured,
) -> None:
    # Before: a template never cacheable showed hit_rate 0 (as if the cache failed it), and
    # `rules drop r99` answered with a statement for psql ("SHOW RULES lists them").
    await _traffic(pg, serving, "shop", "SELECT amname FROM pg_catalog.pg_am WHERE amname = 'hash'", 2)
    await _traffic(pg, serving, "shop", "SELECT name FROM cli_items WHERE id = 1", 3)  # miss, miss, hit
    status, out, _ = await admin_cli(capsys, "queries", "--json")
    rows = {("pg_am" in r["template"]): r for r in json.loads(out)}
    assert rows[True]["hit_rate"] == 0.0  # JSON keeps the number
    status, out, err = await admin_cli(capsys, "queries")
    assert status == 0, err
    header, _, *lines = out.splitlines()  # template_id first: one cache, no cache column
    rate = header.split().index("hit_rate")
    shown = {line.split()[0]: line.split()[rate] for line in lines[:-1]}
    assert shown == {rows[True]["template_id"]: "-", rows[False]["template_id"]: "0.333"}, out

    status, out, err = await admin_cli(capsys, "rules", "drop", "r99")
    assert (status, out, err) == (1, "", 'neonpoly: no rule "r99"; there are no rules\n')
    await admin_cli(capsys, "rules", "add", "--table", "cli_items", "--ttl", "5")
    status, out, err = await admin_cli(capsys, "rules", "drop", "r99")
    assert (status, err) == (1, 'neonpoly: no rule "r99"; the rules are r1 (`neonpoly rules list`)\n'), err


async def test_a_taken_port_is_one_line_naming_the_option(state_root: Path) -> None:
    # Before: "cannot listen on H:P: error while attempting to bind on address ('H', P): address
    # already in use", and a taken --metrics-listen port was reported as the --listen address.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        upstream = Origin(host="127.0.0.1", port=1, sslmode="disable")
        settings = ProxySettings(listen=("127.0.0.1", port), cache_dir=state_root / "cache", rules_dir=state_root)
        with pytest.raises(ControlError) as info:
            await start_serving(ProxyService(settings), state_root, upstream=upstream)
        assert str(info.value) == (
            f"cannot listen on 127.0.0.1:{port}: something else listens there; give --listen another HOST:PORT"
        )
        with pytest.raises(ControlError) as info:
            await start_serving(_service(state_root), state_root, upstream=upstream, metrics_listen=("127.0.0.1", port))
        assert str(info.value) == (
            f"cannot listen on 127.0.0.1:{port}: something else listens there; give --metrics-listen another HOST:PORT"
        )

"""The integration lifecycle end to end: add → serve → connect → hits, remove, embedded."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from neonpoly._testing.neon_standin import NeonStandin
from neonpoly.control.local import LocalControl
from neonpoly.control.serving import start_serving
from neonpoly.integrations.store import MASK
from neonpoly.service import ProxyService, ProxySettings
from tests.pgharness import NEON_HOST, PgServer
from tests.system.conftest import (
    DATABASE,
    ROLE,
    ServeProcess,
    connect_to,
    psql,
    psql_failure,
    run_cli,
)

QUERY = "SELECT id, name FROM integ_items ORDER BY id"


async def _seed_table(pg: PgServer) -> None:
    async with pg.superuser_conn() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS integ_items (id int PRIMARY KEY, name text);"
            "INSERT INTO integ_items VALUES (1, 'lamp'), (2, 'desk') ON CONFLICT DO NOTHING;"
            f"GRANT SELECT ON integ_items TO {ROLE}")
    await pg.reset_stats()


def _service(root: Path) -> ProxyService:
    return ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=root / "cache", rules_dir=root))


async def _ddl_caught(service: ProxyService, cache_id: str) -> None:
    """Wait until the feed's catalog poll has seen the DDL just made (through neonpoly): its
    eviction of the database would otherwise land between the reads that should hit."""
    deadline = time.monotonic() + 30
    while sum(f.ddl for f in service.report(cache_id).caches[0].feeds) < 1:
        assert time.monotonic() < deadline, service.report(cache_id).caches[0].feeds
        await asyncio.sleep(0.05)


async def _feed_on(service: ProxyService, cache_id: str) -> None:
    """Wait until the cache's change feed follows the origin (the embedded one allows it)."""
    deadline = time.monotonic() + 30
    while not (state := service.report(cache_id).caches[0].change_feed).startswith("on"):
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.1)


def _assert_no_secret_leaks(root: Path, secrets: list[str]) -> None:
    text = (root / "integrations.toml").read_text()
    for secret in secrets:
        assert secret not in text
    secret_dir = root / "secrets"
    assert stat.S_IMODE(secret_dir.stat().st_mode) == 0o700
    files = list(secret_dir.iterdir())
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_neon_add_then_psql_hits_on_third_run(
    pg: PgServer, neon_for_pg: NeonStandin, state_root: Path
) -> None:
    await _seed_table(pg)
    added = await run_cli("integrations", "add", "--api-host", neon_for_pg.base_url,
                          "--connect-to", connect_to(pg))
    assert "shop-main" in added and MASK in added and "channel_binding" not in added
    assert pg.password_for(ROLE) not in added
    listed = json.loads(await run_cli("integrations", "list", "--json"))
    assert len(listed) == 1
    item = listed[0]
    assert (item["kind"], item["endpoint_host"], item["origin_port"]) == ("neon", NEON_HOST, 5432)
    assert (item["sslmode"], item["database"], item["role"]) == ("require", DATABASE, ROLE)
    assert item["endpoint_type"] == "read_write"
    _assert_no_secret_leaks(state_root, [pg.password_for(ROLE), neon_for_pg.api_key])

    service = _service(state_root)
    running = await start_serving(service, state_root, follow=False)
    served = running.served
    try:
        _, port = running.address
        assert [s.integration.cache_id for s in served] == [item["cache_id"]]
        # The origin is dialled at the pg fixture but named (SNI) by the endpoint host.
        assert served[0].origin.host == NEON_HOST and served[0].origin.dial[1] == pg.port
        url = (await run_cli("connection-string", "--reveal")).strip()
        assert f"application_name={item['cache_id']}" in url and f":{port}/app?" in url

        assert await psql(url, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == "t"
        calls = []
        for _ in range(3):
            assert await psql(url, QUERY) == "1|lamp\n2|desk"
            calls.append(await pg.calls("FROM integ_items ORDER BY id"))
        assert calls == [1, 2, 2], calls  # the third run never reached the origin
        totals = service.stats.snapshot(item["cache_id"]).totals
        assert totals.hits == 1
    finally:
        await running.close(grace=0.5)


async def test_remove_ends_five_connections_within_a_second(
    pg: PgServer, neon_for_pg: NeonStandin, state_root: Path
) -> None:
    await _seed_table(pg)
    control = LocalControl(state_root, ProxySettings(listen=("127.0.0.1", 0),
                                                    cache_dir=state_root / "cache"),
                           api_host=neon_for_pg.base_url, connect_to=connect_to(pg))
    await control.start()
    try:
        signed = await control.sign_in()
        assert signed.mode == "neon" and signed.workspaces == ("default",)
        steps: list[str] = []
        view = await control.add("default", steps.append)
        assert any(s.startswith("Primary branch main") for s in steps), steps
        url = control.connection_string(view.cache_id, reveal=True)
        for _ in range(3):
            await psql(url, QUERY)
        cache_dir = state_root / "cache" / view.cache_id
        assert cache_dir.is_dir()
        route = control.service.routes.by_id[view.cache_id]
        assert route.cache is not None
        route.cache.store.flush()
        assert control.status(view.cache_id).entries >= 1

        clients = [await asyncpg.connect(url) for _ in range(5)]
        lost = [asyncio.Event() for _ in clients]
        for conn, event in zip(clients, lost, strict=True):
            conn.add_termination_listener(lambda _c, e=event: e.set())
        busy = [asyncio.create_task(c.fetchval("SELECT pg_sleep(10)")) for c in clients[:3]]
        await asyncio.sleep(0.2)
        assert control.status(view.cache_id).connections == 5

        started = time.monotonic()
        ended = await control.remove(view.cache_id)
        async with asyncio.timeout(1.0):
            results = await asyncio.gather(*busy, return_exceptions=True)
            await asyncio.gather(*(e.wait() for e in lost))
        elapsed = time.monotonic() - started
        print(f"\n[remove] 5 clients ended in {elapsed * 1000:.0f} ms")
        assert ended == 5
        for result in results:
            # The proxy sends 57P01 then closes; asyncpg reports an in-flight query's end as
            # 08003 because the close arrives before the ReadyForQuery it waits for. The
            # message itself is witnessed with psql in test_cli_remove_reaches_a_running_serve.
            assert isinstance(result, asyncpg.PostgresError), result
            assert result.sqlstate in ("57P01", "08003")
        assert all(c.is_closed() for c in clients)

        assert not cache_dir.exists()
        assert control.integrations() == []
        assert "No integrations" in await run_cli("integrations", "list")
        with pytest.raises(asyncpg.PostgresError, match="was removed"):
            await asyncpg.connect(url)
    finally:
        await control.close()


async def test_cli_remove_confirms_a_running_serve_ended_the_connections(
    pg: PgServer, state_root: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    """`neonpoly integrations remove` while `neonpoly serve` runs on the state dir: when the
    command returns, the serve process has ended the connections and refuses the string."""
    await _seed_table(pg)
    await run_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    [item] = json.loads(await run_cli("integrations", "list", "--json"))
    serve = start_serve(state_root, "--listen", "127.0.0.1:0", "--reveal")
    url = serve.wait_for(r"psql '([^']+)'", 30).group(1)
    assert f":{serve.port}/" in url
    clients = [await asyncpg.connect(url) for _ in range(2)]
    sleeper = asyncio.create_task(psql_failure(url, "SELECT pg_sleep(10) -- remove-confirm"))
    async with asyncio.timeout(10), pg.superuser_conn() as su:  # psql is in once the origin runs its sleep
        # Marked: sleeps of earlier tests may still run on the origin after their clients went.
        sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%remove-confirm' AND pid <> pg_backend_pid()"
        while not await su.fetchval(sql) and not sleeper.done():
            await asyncio.sleep(0.05)
    started = time.monotonic()
    out = await run_cli("integrations", "remove", "shop")
    took = time.monotonic() - started
    assert "Removed integration shop:" in out and "ended 3 connections" in out, out
    assert f"at 127.0.0.1:{serve.port}" in out and f"pid {serve.proc.pid}" in out, out
    # Confirmed means done: the old string is refused at once, without waiting.
    with pytest.raises(asyncpg.PostgresError, match="was removed"):
        await asyncpg.connect(url)
    async with asyncio.timeout(2):
        stderr = await sleeper
        while not all(c.is_closed() for c in clients):
            await asyncio.sleep(0.01)
    assert "terminating connection" in stderr and "was removed" in stderr, stderr
    print(f"\n[cli remove] confirmed in {took * 1000:.0f} ms")
    assert not (state_root / "cache" / item["cache_id"]).exists()  # serve deleted what it held open


async def test_cli_remove_without_a_serve_says_so(pg: PgServer, state_root: Path) -> None:
    await run_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    [item] = json.loads(await run_cli("integrations", "list", "--json"))
    out = await run_cli("integrations", "remove")
    assert "Removed integration shop" in out and "No neonpoly is serving" in out, out
    assert not (state_root / "cache" / item["cache_id"]).exists()
    assert json.loads(await run_cli("integrations", "list", "--json")) == []


async def test_url_integration_keeps_secrets_private(pg: PgServer, state_root: Path) -> None:
    out = await run_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"))
    assert MASK in out
    _assert_no_secret_leaks(state_root, [pg.password_for(ROLE)])
    shown = await run_cli("connection-string")
    assert pg.password_for(ROLE) not in shown and MASK in shown
    revealed = await run_cli("connection-string", "--reveal")
    assert pg.password_for(ROLE) in revealed
    assert "channel_binding" not in revealed


async def test_several_projects_need_a_choice(
    neon_for_pg: NeonStandin, state_root: Path
) -> None:
    from neonpoly._testing.neon_standin import demo_project
    from neonpoly.cli.running import CLIError

    neon_for_pg.projects.append(demo_project())
    neon_for_pg._assign_ids()
    with pytest.raises(CLIError) as info:
        await run_cli("integrations", "add", "--api-host", neon_for_pg.base_url)
    message = str(info.value)
    assert "\n" not in message and "--project" in message and "shop" in message


async def test_embedded_from_empty_state_dir(state_root: Path) -> None:
    timings = []
    cache_ids = []
    for run in range(2):
        service = _service(state_root)
        started = time.monotonic()
        running = await start_serving(service, state_root, follow=False)
        served = running.served
        host, port = running.address
        timings.append(time.monotonic() - started)
        try:
            assert len(served) == 1 and served[0].integration.kind == "embedded"
            cache_ids.append(served[0].integration.cache_id)
            url = served[0].connection_string(host, port)
            # The feed starting evicts what was cached before it (a gap): let it start first.
            await _feed_on(service, cache_ids[-1])
            if run == 0:
                await psql(url, "CREATE TABLE shelf (id int PRIMARY KEY, title text);"
                                "INSERT INTO shelf SELECT g, 'book ' || g"
                                " FROM generate_series(1, 50) g")
                await _ddl_caught(service, cache_ids[-1])
            for _ in range(3):
                assert await psql(url, "SELECT count(*) FROM shelf WHERE id > 10") == "40"
            assert service.stats.snapshot(cache_ids[-1]).totals.hits >= 1
        finally:
            await running.close(grace=0.5)
    print(f"\n[embedded] first start {timings[0]:.2f}s, second start {timings[1]:.2f}s")
    assert cache_ids[0] == cache_ids[1]
    assert timings[0] < 60 and timings[1] < 10
    _assert_no_secret_leaks(state_root, [])


async def test_embedded_origin_follows_writes_made_around_neonpoly(state_root: Path) -> None:
    """The embedded default runs with wal_level=logical, so the change feed (auto) is on and a
    write made directly on the cluster (psql on its own port) evicts what neonpoly cached."""
    service = _service(state_root)
    running = await start_serving(service, state_root, follow=False)
    try:
        host, port = running.address
        served = running.served[0]
        cache_id = served.integration.cache_id
        url = served.connection_string(host, port)
        assert running.embedded.handle is not None
        direct = running.embedded.handle.cluster.url(database="neondb")
        await _feed_on(service, cache_id)
        await psql(url, "CREATE TABLE notes (id int PRIMARY KEY, body text);"
                        "INSERT INTO notes VALUES (1, 'first')")
        await _ddl_caught(service, cache_id)
        for _ in range(3):
            assert await psql(url, "SELECT body FROM notes WHERE id = 1") == "first"
        hits = service.stats.snapshot(cache_id).totals.hits
        assert hits >= 1  # the read is served from the cache now
        await psql(direct, "UPDATE notes SET body = 'edited elsewhere' WHERE id = 1")
        # A wait, not a bound: a psql process per try and the feed's catch-up, on a loaded machine.
        deadline = time.monotonic() + 30
        while (seen := await psql(url, "SELECT body FROM notes WHERE id = 1")) != "edited elsewhere":
            assert time.monotonic() < deadline, f"still {seen!r} through neonpoly"
            await asyncio.sleep(0.05)
    finally:
        await running.close(grace=0.5)


async def test_console_flow_on_embedded_origin(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the TUI does with no Neon key: sign in locally, add, connect, purge, remove."""
    monkeypatch.delenv("NEON_API_KEY", raising=False)
    control = LocalControl(state_root, ProxySettings(listen=("127.0.0.1", 0),
                                                    cache_dir=state_root / "cache"))
    await control.start()
    try:
        assert control.integrations() == []
        assert (await control.sign_in()).mode == "local"
        steps: list[str] = []
        view = await control.add("default", steps.append)
        assert steps[0] == "Initialising embedded PostgreSQL" and steps[-1] == "Cache ready"
        assert (view.kind, view.name) == ("embedded", "local")
        assert view.databases == ("neondb", "postgres") and view.roles == ("neon",)  # the origin's own lists
        header = control.header()
        assert header.project == "local" and header.running
        url = control.connection_string(view.cache_id, reveal=True)
        assert MASK in control.connection_string(view.cache_id)
        for _ in range(3):
            assert await psql(url, "SELECT count(*) FROM pg_database WHERE datname = 'neondb'")
        status = control.status(view.cache_id)
        assert status.calls == 3 and status.origin.startswith("127.0.0.1:")
        # The console says the change feed follows the embedded origin, and counts a direct write.
        assert control.embedded.handle is not None
        direct = control.embedded.handle.cluster.url(database="neondb")
        deadline = time.monotonic() + 30
        while (fresh := control.status(view.cache_id).freshness) is None or not fresh.following:
            assert time.monotonic() < deadline, fresh
            await asyncio.sleep(0.1)
        await psql(direct, "CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1)")
        while (fresh := control.status(view.cache_id).freshness) is None or fresh.changes < 1:
            assert time.monotonic() < deadline, fresh
            await asyncio.sleep(0.05)
        assert fresh.feed.startswith("on") and fresh.last_change is not None
        assert await control.purge(view.cache_id) >= 0
        assert await control.remove(view.cache_id) == 0
        assert control.integrations() == [] and control.embedded.handle is None
    finally:
        await control.close()


async def test_rejected_key_is_one_line(
    neon_for_pg: NeonStandin, state_root: Path
) -> None:
    from neonpoly.control.interface import ControlError
    from neonpoly.integrations.neon_api import RetryPolicy

    control = LocalControl(state_root, api_host=neon_for_pg.base_url,
                           retry=RetryPolicy(attempts=1))
    with pytest.raises(ControlError) as info:
        await control.sign_in("not-a-key")
    assert "NEON_API_KEY" in str(info.value) and "\n" not in str(info.value)
    assert not (state_root / "secrets").exists()

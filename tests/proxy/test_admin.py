"""The `neonpoly` admin console through the real proxy, with psql, asyncpg and psycopg as clients."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neonpoly import pgwire
from neonpoly.admin.console import AdminConsole
from neonpoly.cache.adaptive import AdaptiveTTL
from neonpoly.cli import admin as cli_admin
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy, unique


@dataclass
class Admin:
    proxy: CachingProxy
    console: AdminConsole

    @property
    def port(self) -> int:
        return self.proxy.port

    def url(self, role: str = "postgres") -> str:
        return self.proxy.url(role, "neonpoly")

    async def connect(self, role: str = "postgres", **kw: Any) -> asyncpg.Connection:
        return await asyncpg.connect(**{**self.proxy.dsn(role, "neonpoly"), **kw})

    async def rows(self, sql: str) -> list[dict[str, Any]]:
        conn = await self.connect()
        try:
            return [dict(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()


@pytest.fixture
async def admin(pg: PgServer, tmp_path: Path) -> AsyncIterator[Admin]:
    async with caching_proxy(
        pg, tmp_path / "cache", serving={"metrics_listen": ("127.0.0.1", 0)}, adaptive=AdaptiveTTL(min_ttl=1.0)
    ) as proxy:
        yield Admin(proxy, proxy.serving.admin)


async def make_table(pg: PgServer, rows: int = 5) -> str:
    table = unique("adm")
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {table} SELECT g, 'n' || g FROM generate_series(1, {rows}) g")
    return table


async def psql_csv(url: str, sql: str) -> tuple[int, list[dict[str, str]], str]:
    proc = await asyncio.create_subprocess_exec(
        "psql",
        url,
        "-X",
        "--csv",
        "-c",
        sql,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )
    out, err = await proc.communicate()
    text = out.decode()
    rows = list(csv.DictReader(io.StringIO(text))) if text.strip() else []
    return proc.returncode or 0, rows, text + err.decode()


async def test_show_queries_counts_and_redaction(pg: PgServer, admin: Admin) -> None:
    table = await make_table(pg)
    secret_num, secret_text = "987654321", "zq-literal-7731"
    proxy = admin.proxy
    conn = await asyncpg.connect(**proxy.dsn())
    try:
        for _ in range(5):  # extended protocol, literal in the text
            await conn.fetch(f"SELECT name FROM {table} WHERE id = {secret_num}")
        await conn.execute(f"INSERT INTO {table} VALUES (4242, '{secret_text}')")  # simple
        async with conn.transaction():  # status "transaction" for the read inside
            await conn.fetch(f"SELECT name FROM {table} WHERE id = {secret_num}")
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True) as pconn:
        for _ in range(4):
            await pconn.execute(f"SELECT count(*) FROM {table} WHERE name = '{secret_text}'")

    code, rows, text = await psql_csv(admin.url(), "SHOW QUERIES")
    assert code == 0, text
    # Literals must reach no template; the rest of the output holds times and ids in which
    # these digits could appear by chance, so only the templates are searched.
    templates = [r["template"] for r in rows]
    assert not any(s in t for t in templates for s in (secret_num, secret_text, "4242"))
    mine = {r["template"]: r for r in rows if table in r["template"]}
    by_kind = {
        "select": next(r for t, r in mine.items() if t.startswith("SELECT name")),
        "count": next(r for t, r in mine.items() if t.startswith("SELECT count")),
        "insert": next(r for t, r in mine.items() if t.startswith("INSERT")),
    }
    for row in mine.values():
        calls, hits, misses, other = (int(row[k]) for k in ("calls", "hits", "misses", "other"))
        assert calls == hits + misses + other, row
        statuses = dict(s.split("=") for s in row["statuses"].split(","))
        assert sum(int(v) for v in statuses.values()) == calls, row
    sel = by_kind["select"]
    assert int(sel["calls"]) == 6 and int(sel["hits"]) == 3 and int(sel["misses"]) == 2
    assert "transaction=1" in sel["statuses"]
    assert float(sel["ttl_s"]) > 0 and sel["hit_p50_ms"] != ""
    count = by_kind["count"]
    assert int(count["calls"]) == 4 and int(count["hits"]) == 2 and int(count["misses"]) == 2
    ins = by_kind["insert"]
    assert int(ins["calls"]) == 1 and ins["statuses"] == "uncacheable=1" and ins["ttl_s"] == ""


async def _read(conn: asyncpg.Connection, sql: str, n: int = 1) -> None:
    for _ in range(n):
        await conn.fetch(sql)


async def test_rules_and_purges(pg: PgServer, admin: Admin) -> None:
    a, b = await make_table(pg), await make_table(pg)
    qa1, qa2 = f"SELECT name FROM {a} WHERE id = 1", f"SELECT count(*) FROM {a}"
    qb = f"SELECT name FROM {b} WHERE id = 1"
    conn = await asyncpg.connect(**admin.proxy.dsn())
    adm = await admin.connect()
    try:
        for sql in (qa1, qa2, qb):
            await _read(conn, sql, 3)  # stored on the 2nd run, a hit on the 3rd
        assert await pg.calls(f"FROM {a} WHERE id") == 2 and await pg.calls(f"FROM {b} WHERE") == 2

        # PURGE TABLE evicts only that table's entries.
        assert await adm.fetchval(f"PURGE TABLE {a}") == 2
        await _read(conn, qb)
        assert await pg.calls(f"FROM {b} WHERE") == 2  # b still served from the cache
        await _read(conn, qa1)
        assert await pg.calls(f"FROM {a} WHERE id") == 3

        # A "never" rule on the table stops caching of every template on it, in open sessions.
        await _read(conn, qa1, 2)  # stored again, then a hit
        before = await pg.calls(f"FROM {a} WHERE id")
        rule = await adm.fetchrow(f"create rule on table public.{a.upper()} never;")
        assert rule["action"] == "never" and rule["name"] == a and rule["ttl_s"] is None
        await _read(conn, qa1, 3)
        await _read(conn, qa2, 3)
        assert await pg.calls(f"FROM {a} WHERE id") == before + 3
        rules = await adm.fetch("SHOW RULES")
        assert [r["id"] for r in rules] == [rule["id"]]
        statuses = {t.template: dict(t.by_status) for t in admin.proxy.service.stats.snapshot().templates}
        assert statuses[f"SELECT count(*) FROM {a}"].get("disabled") == 3
        assert admin.proxy.service.rules.path is not None and rule["id"] in admin.proxy.service.rules.path.read_text()

        # PURGE ALL answers with the number removed, and the next read misses.
        removed = await adm.fetchval("PURGE ALL")
        assert removed == 1  # only b's entry remained
        before_b = await pg.calls(f"FROM {b} WHERE")
        await _read(conn, qb)
        assert await pg.calls(f"FROM {b} WHERE") == before_b + 1
        assert await adm.execute(f"DROP RULE {rule['id']}") == "DROP RULE"
        assert await adm.fetch("SHOW RULES") == []
    finally:
        await conn.close()
        await adm.close()

    # psql sees the same PURGE answer as a one-row result.
    code, rows, text = await psql_csv(admin.url(), "PURGE ALL")
    assert code == 0 and rows and int(rows[0]["removed"]) >= 0, text


async def test_writes_through_neonpoly_never_shorten_a_ttl(pg: PgServer, admin: Admin) -> None:
    """They already evicted what they touched: a TTL guards only against writes neonpoly
    did not see, so a table written often through neonpoly keeps the cache's TTL."""
    hot, cold = await make_table(pg), await make_table(pg)
    conn = await asyncpg.connect(**admin.proxy.dsn())
    try:
        for i in range(8):
            await conn.execute(f"UPDATE {hot} SET name = 'v{i}' WHERE id = 1")
            await conn.fetch(f"SELECT name FROM {hot} WHERE id = 2")
            await conn.fetch(f"SELECT name FROM {cold} WHERE id = 2")
    finally:
        await conn.close()
    rows = {r["template"]: r for r in await admin.rows("SHOW QUERIES")}
    hot_row = rows[f"SELECT name FROM {hot} WHERE id = ?"]
    cold_row = rows[f"SELECT name FROM {cold} WHERE id = ?"]
    assert hot_row["ttl_s"] == cold_row["ttl_s"] == admin.proxy.service.settings.cache.ttl
    assert hot_row["ttl_source"] == cold_row["ttl_source"] == "auto"
    # The TUI reads the same TTL from the stats.
    ttl = {t.template: t.ttl for t in admin.proxy.service.stats.snapshot().templates}
    assert ttl[f"SELECT name FROM {hot} WHERE id = ?"] == hot_row["ttl_s"]


async def test_time_to_first_hit_holds_after_ddl_and_writes(pg: PgServer, admin: Admin) -> None:
    """CREATE TABLE and INSERT through neonpoly, then one query three times 2 s apart:
    miss, miss, hit (writes neonpoly relayed must not shorten the TTL below the gap). A TTL
    the adaptive learner shortened is either its floor (`min_ttl`, 1 s here) or at least a
    quarter of the cache's (75 s): a gap of twice the floor tells them apart."""
    table = unique("ttfh")
    sql = f"SELECT name FROM {table} WHERE id = 1"
    conn = await asyncpg.connect(**admin.proxy.dsn())
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {table} VALUES (1, 'first')")
        statuses: list[str] = []
        for run in range(3):
            if run:
                await asyncio.sleep(2 * admin.proxy.service.adaptive.min_ttl)
            before = admin.proxy.totals()
            assert await conn.fetchval(sql) == "first"
            after = admin.proxy.totals()
            statuses.append(next(s for s in ("hit", "miss") if after.get(s, 0) > before.get(s, 0)))
        assert statuses == ["miss", "miss", "hit"]
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_show_queries_says_why_each_query_was_not_cached(pg: PgServer, admin: Admin) -> None:
    table = await make_table(pg)
    conn = await asyncpg.connect(**admin.proxy.dsn())
    try:
        await conn.fetch(f"SELECT name, now() FROM {table}")
        async with conn.transaction():
            await conn.fetch(f"SELECT name FROM {table} WHERE id = 2")
    finally:
        await conn.close()
    rows = {r["template"]: r for r in await admin.rows("SHOW QUERIES")}
    clock = rows[f"SELECT name, now() FROM {table}"]
    assert clock["last_status"] == "volatile" and "now" in clock["last_reason"], clock
    inside = rows[f"SELECT name FROM {table} WHERE id = ?"]
    assert inside["last_status"] == "transaction" and "transaction" in inside["last_reason"], inside


async def test_cli_stats_json_and_metrics(pg: PgServer, admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    table = await make_table(pg)
    conn = await asyncpg.connect(**admin.proxy.dsn())
    try:
        await _read(conn, f"SELECT name FROM {table} WHERE id = 3", 4)
    finally:
        await conn.close()
    admin.proxy.flush()  # disk usage is counted per write-behind batch

    parser = argparse.ArgumentParser()
    cli_admin.register(parser.add_subparsers(dest="command"))
    login = ["--user", "postgres", "--password", pg.password_for("postgres")]
    args = parser.parse_args(["stats", "--json", "--admin", f"127.0.0.1:{admin.port}", *login])
    assert await cli_admin.dispatch(args) == 0
    from_cli = json.loads(capsys.readouterr().out)

    async with await psycopg.AsyncConnection.connect(admin.url(), autocommit=True) as pconn:
        cur = await pconn.execute("SHOW STATS")
        names = [d.name for d in cur.description or ()]
        shown = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
    assert [r["cache"] for r in from_cli] == [r["cache"] for r in shown] == ["default", "(all)"]
    for cli_row, row in zip(from_cli, shown, strict=True):
        for key in ("calls", "hits", "misses", "passthrough", "entries", "statuses"):
            assert cli_row[key] == row[key], key
    assert shown[0]["hits"] == 2 and shown[0]["entries"] >= 1

    assert admin.proxy.serving.metrics is not None
    host, port = admin.proxy.serving.metrics.address
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"http://{host}:{port}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["neonpoly_queries"].type == "counter"
    assert families["neonpoly_cache_entries"].type == "gauge"
    assert families["neonpoly_time_saved_seconds"].type == "counter"
    queries = {
        s.labels["status"]: s.value
        for s in families["neonpoly_queries"].samples
        if s.name == "neonpoly_queries_total" and s.labels["cache"] == "default"
    }
    assert queries["hit"] == shown[0]["hits"] and sum(queries.values()) == shown[0]["calls"]
    assert any(s.labels["result"] == "miss" for s in families["neonpoly_query_duration_seconds"].samples)


async def test_role_not_allowed_gets_28000_and_no_data(admin: Admin) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as err:
        await admin.connect("scram_user")
    assert err.value.sqlstate == "28000"
    # On the wire: exactly one FATAL ErrorResponse, then the connection closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(pgwire.build_startup({"user": "md5_user", "database": "neonpoly"}))
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    frames, used = pgwire.scan_frames(data)
    assert [chr(t) for t, _, _ in frames] == ["E"] and used == len(data)
    fields = pgwire.parse_error_fields(data[5:])
    assert fields["C"] == "28000" and fields["S"] == "FATAL"


async def test_malformed_statements_get_42601_with_hint(admin: Admin) -> None:
    conn = await admin.connect()
    try:
        for bad in ("SELECT * FROM users", "SHOW EVERYTHING", "CREATE RULE ON TABLE t TTL soon", "PURGE TABLE"):
            with pytest.raises(asyncpg.PostgresSyntaxError) as err:
                await conn.fetch(bad)
            assert err.value.sqlstate == "42601" and "SHOW QUERIES" in (err.value.hint or "")
        assert await conn.fetchval("PURGE ALL") >= 0  # still usable
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(admin.url(), autocommit=True) as pconn:
        with pytest.raises(psycopg.errors.SyntaxError) as perr:
            await pconn.execute("DROP TABLE users")
        assert perr.value.diag.message_hint and "PURGE ALL" in perr.value.diag.message_hint
        cur = await pconn.execute("show caches;")
        assert (await cur.fetchone()) is not None
    code, _, text = await psql_csv(admin.url(), "SHOW NONSENSE")
    assert code != 0 and "HINT:" in text and "SET MODE" in text


async def test_modes_connections_and_password(pg: PgServer, tmp_path: Path) -> None:
    serving = {"admin_password": "s3cret", "admin_roles": ["ops"]}
    async with caching_proxy(pg, tmp_path / "cache", serving=serving) as proxy:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(**{**proxy.dsn("postgres", "neonpoly"), "user": "ops", "password": "no"})
        adm = await asyncpg.connect(**{**proxy.dsn("postgres", "neonpoly"), "user": "ops", "password": "s3cret"})
        try:
            table = await make_table(pg)
            assert await adm.execute("SET MODE off") == "SET MODE"
            conn = await asyncpg.connect(**proxy.dsn())
            await _read(conn, f"SELECT name FROM {table} WHERE id = 1", 3)
            assert await pg.calls(f"FROM {table} WHERE id") == 3  # off: nothing cached
            await adm.execute(f"CREATE RULE ON TABLE {table} TTL 30 FOR CACHE default")
            await _read(conn, f"SELECT name FROM {table} WHERE id = 1", 3)
            # A TTL rule caches in off mode: stored on the 2nd run, then served.
            assert await pg.calls(f"FROM {table} WHERE id") == 5
            caches = await adm.fetch("SHOW CACHES")
            assert caches[0]["mode"] == "off" and caches[0]["is_default"] is True
            conns = await adm.fetch("SHOW CONNECTIONS")
            assert {r["database"] for r in conns} >= {"app", "neonpoly"}
            await conn.close()
            with pytest.raises(asyncpg.UndefinedObjectError):
                await adm.fetch("SHOW STATS FOR CACHE nope")
        finally:
            await adm.close()


async def test_show_workers_in_one_process_is_one_row(admin: Admin) -> None:
    """Without `serve --workers` the process is worker 0 of 1 (the 2-worker case: tests/system/test_workers.py)."""
    rows = await admin.rows("SHOW WORKERS")
    assert [(r["worker"], r["pid"], r["state"]) for r in rows] == [(0, os.getpid(), "up")]
    assert rows[0]["connections"] >= 1  # this admin session at least
    assert rows[0]["cpu_s"] > 0 and rows[0]["rss_bytes"] > 10 << 20  # a Python process with the suite loaded

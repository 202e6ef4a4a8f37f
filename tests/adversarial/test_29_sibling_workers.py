"""Hostile review of the sibling board (cache/siblings.py): the workers of one `serve --workers N`
share their table generations in memory, and a write's reply no longer waits for a sibling's
acknowledgement through Redis. The guarantee (freshness/plane.py): once a write through worker
A returned to its client, worker B serves no hit the write made stale.

Every case opens sessions until one lands on each of two workers (the kernel spreads
SO_REUSEPORT connections; /proc says which worker holds the accepted socket), makes B serve a
provable hit, writes through A in a way whose invalidation is not always a plain table bump,
and compares B's next answer with a direct connection's. Only meaningful against
`serve --workers N` (NEONPOLY_TEST_WORKERS=2): skipped otherwise.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.adversarial.conftest import WORKERS
from tests.adversarial.harness import Client, Env, Login, Twin, unique
from tests.proxy.workers import WorkersProxy

pytestmark = pytest.mark.skipif(WORKERS < 2, reason="sibling workers: NEONPOLY_TEST_WORKERS=2 (serve --workers N)")


# --- which worker holds a session ------------------------------------------------------------


def _client_port(client: Client) -> int:
    conn = client.conn
    if isinstance(conn, asyncpg.Connection):
        transport: Any = conn._transport  # noqa: SLF001 - asyncpg keeps its socket there
        return int(transport.get_extra_info("sockname")[1])
    assert isinstance(conn, psycopg.AsyncConnection)
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def _worker_of(proxy: WorkersProxy, client: Client) -> int:
    """The index (in proxy.pids) of the worker whose accepted socket talks to this client."""
    port = _client_port(client)
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == proxy.port and int(remote.split(":")[1], 16) == port:
                inode = fields[9]
    assert inode is not None, f"no server socket for client port {port}"
    wanted = f"socket:[{inode}]"
    for index, pid in enumerate(proxy.pids):
        fds = f"/proc/{pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(f"{fds}/{fd}") == wanted:
                    return index
            except OSError:
                continue
    raise AssertionError(f"no worker holds the socket of client port {port}")


async def _on(env: Env, worker: int, login: Login | None = None, driver: Any = "psycopg") -> Client:
    """A session through neonpoly held by worker `worker` (connections are spread at random)."""
    assert isinstance(env.proxy, WorkersProxy)
    for _ in range(40):
        client = await env.client(login, driver=driver)
        if _worker_of(env.proxy, client) == worker:
            return client
        await client.close()
    raise AssertionError(f"40 sessions, none on worker {worker}")


async def _pair(
    env: Env, *, a_login: Login | None = None, b_login: Login | None = None, b_driver: Any = "psycopg"
) -> tuple[Client, Twin]:
    """A writer on worker 0, and a twin (through neonpoly on worker 1, and direct) for reads."""
    a = await _on(env, 0, a_login)
    login = b_login or env.login()
    via = await _on(env, 1, login, b_driver)
    direct = await env.client(login, via=False, driver=b_driver)
    return a, Twin(env, via, direct, login)


async def _served_then_written(b: Twin, read: str, a: Client, *writes: str, why: str) -> None:
    """B serves `read` from its cache (provably), A writes, and B's next answer is the origin's."""
    await b.probe(read)
    await b.probe(read)  # repeats: the hit memo's fast path (proxy/hits.py) answers now
    for sql in writes:
        await a.run(sql)
    await b.check(read, why=why)


async def _learned(a: Client, table: str) -> None:
    """A reads and writes the table once, so that it knows its relations: its next writes are
    table bumps (through the board), not a database-wide bump (through Redis, acknowledged)."""
    await a.rows(f"SELECT count(*) FROM {table}")
    await a.run(f"UPDATE {table} SET v = v WHERE false")
    await a.rows(f"SELECT count(*) FROM {table}")


# --- plain table bumps: the board's own path -------------------------------------------------


async def test_update_on_a_then_hit_on_b(env: Env) -> None:
    table = await env.table("adv_sib", "id int PRIMARY KEY, v int", "(1, 0)", "(2, 0)")
    a, b = await _pair(env)
    await _learned(a, table)
    for i in range(1, 4):
        await _served_then_written(b, f"SELECT v FROM {table} ORDER BY id", a,
                                   f"UPDATE {table} SET v = {i}", why=f"write {i} through the sibling")  # fmt: skip
        await _served_then_written(b, f"SELECT v FROM {table} WHERE id = 1", a,
                                   f"UPDATE {table} SET v = v + 10 WHERE id = 1", why="a keyed write")  # fmt: skip


async def test_quoted_mixed_case_and_schema_qualified_names(env: Env) -> None:
    schema = unique("adv_Sch")
    name = f'"{schema}"."Mi x""Ed"'
    await env.admin(f'CREATE SCHEMA "{schema}"', f"CREATE TABLE {name} (id int PRIMARY KEY, v int)",
                    f"INSERT INTO {name} VALUES (1, 0)", f'GRANT USAGE ON SCHEMA "{schema}" TO PUBLIC',
                    f"GRANT ALL ON {name} TO PUBLIC")  # fmt: skip
    env.on_cleanup(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    a, b = await _pair(env)
    await b.both(f'SET search_path = "{schema}", public')
    await a.run(f'SET search_path = "{schema}", public')
    await _learned(a, name)
    await _served_then_written(b, 'SELECT v FROM "Mi x""Ed"', a, f"UPDATE {name} SET v = 1",
                               why="a qualified write, an unqualified read")  # fmt: skip
    await _served_then_written(b, f"SELECT v FROM {name}", a, 'UPDATE "Mi x""Ed" SET v = 2',
                               why="an unqualified write, a qualified read")  # fmt: skip


async def test_same_table_name_in_two_schemas_search_path(env: Env) -> None:
    s1, s2 = unique("adv_s1"), unique("adv_s2")
    await env.admin(f"CREATE SCHEMA {s1}", f"CREATE SCHEMA {s2}",
                    f"CREATE TABLE {s1}.t (v int)", f"INSERT INTO {s1}.t VALUES (1)",
                    f"CREATE TABLE {s2}.t (v int)", f"INSERT INTO {s2}.t VALUES (2)",
                    f"GRANT USAGE ON SCHEMA {s1}, {s2} TO PUBLIC", f"GRANT ALL ON {s1}.t, {s2}.t TO PUBLIC")  # fmt: skip
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {s1} CASCADE", f"DROP SCHEMA IF EXISTS {s2} CASCADE")
    a, b = await _pair(env)
    await b.both(f"SET search_path = {s2}")
    await a.run(f"SET search_path = {s1}")
    await _learned(a, "t")
    await a.run(f"SET search_path = {s2}")
    await _learned(a, "t")
    await _served_then_written(b, "SELECT v FROM t", a, "UPDATE t SET v = v + 100",
                               why="A's search_path names the same schema as B's")  # fmt: skip


async def test_same_table_name_in_another_database(env: Env) -> None:
    name = unique("adv_db")
    for db in ("app", "postgres"):
        await env.admin(f"CREATE TABLE public.{name} (v int)", f"INSERT INTO public.{name} VALUES (1)",
                        f"GRANT ALL ON public.{name} TO PUBLIC", database=db)  # fmt: skip
    try:
        a, b = await _pair(env, a_login=env.login(database="postgres"), b_login=env.login(database="postgres"))
        await _learned(a, name)
        await _served_then_written(b, f"SELECT v FROM {name}", a, f"UPDATE {name} SET v = 7",
                                   why="a write in the second database")  # fmt: skip
    finally:
        await env.admin(f"DROP TABLE IF EXISTS public.{name}", database="postgres")
        await env.admin(f"DROP TABLE IF EXISTS public.{name}", database="app")


# --- writes whose invalidation is not a table bump ------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        "TRUNCATE {t}",
        "ALTER TABLE {t} ADD COLUMN w int DEFAULT 5",
        "DROP TABLE {t} CASCADE | CREATE TABLE {t} (id int, v int) | INSERT INTO {t} VALUES (1, 99) | GRANT ALL ON {t} TO PUBLIC",
        "DO $$BEGIN UPDATE {t} SET v = 42; END$$",
        "SELECT {t}_bump()",
        "CALL {t}_proc()",
        "WITH x AS (UPDATE {t} SET v = 43 RETURNING v) SELECT count(*) FROM x",
        "INSERT INTO {t}_log VALUES (44)",
        "UPDATE {t}_view SET v = 45",
        "UPDATE {t}_ruled SET v = 46",
        "SELECT count(*) FROM {t}_log WHERE {t}_bump() IS NOT NULL",
        "CREATE TEMP TABLE {t} AS SELECT 1 AS id, 7 AS v | UPDATE public.{t} SET v = 47",
        "BEGIN | UPDATE {t} SET v = 48 | SAVEPOINT s | UPDATE {t} SET v = 0 | ROLLBACK TO s | COMMIT",
    ],
    ids=["truncate", "alter", "drop-create", "do", "function", "procedure", "cte", "trigger", "view", "rule",
         "function-in-select", "temp-shadow", "savepoint"],  # fmt: skip
)
async def test_code_and_ddl_through_a(env: Env, write: str) -> None:
    t = await env.table("adv_code", "id int, v int", "(1, 0)")
    await env.admin(
        f"CREATE FUNCTION {t}_bump() RETURNS int LANGUAGE sql AS 'UPDATE {t} SET v = v + 1 RETURNING v'",
        f"CREATE PROCEDURE {t}_proc() LANGUAGE sql AS 'UPDATE {t} SET v = v + 1'",
        f"CREATE TABLE {t}_log (v int)",
        f"CREATE FUNCTION {t}_trig() RETURNS trigger LANGUAGE plpgsql AS "
        f"'BEGIN UPDATE {t} SET v = NEW.v; RETURN NEW; END'",
        f"CREATE TRIGGER {t}_t AFTER INSERT ON {t}_log FOR EACH ROW EXECUTE FUNCTION {t}_trig()",
        f"CREATE VIEW {t}_view AS SELECT * FROM {t}",
        f"CREATE TABLE {t}_ruled (v int)",
        f"CREATE RULE {t}_r AS ON UPDATE TO {t}_ruled DO INSTEAD UPDATE {t} SET v = NEW.v",
        f"GRANT ALL ON {t}_log, {t}_view, {t}_ruled TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {t}_log, {t}_ruled CASCADE", f"DROP FUNCTION IF EXISTS {t}_bump()",
                   f"DROP PROCEDURE IF EXISTS {t}_proc()", f"DROP FUNCTION IF EXISTS {t}_trig() CASCADE")  # fmt: skip
    a, b = await _pair(env)
    for name in (t, f"{t}_log", f"{t}_view", f"{t}_ruled"):
        await a.rows(f"SELECT count(*) FROM {name}")
    await _learned(a, t)
    await _served_then_written(b, f"SELECT * FROM {t}", a, *write.format(t=t).split(" | "), why=write)


async def test_copy_from_stdin_through_a(env: Env) -> None:
    t = await env.table("adv_copy", "id int, v int", "(1, 0)")
    a, b = await _pair(env)
    await _learned(a, t)
    await b.probe(f"SELECT count(*) FROM {t}")
    await b.probe(f"SELECT count(*) FROM {t}")
    assert isinstance(a.conn, psycopg.AsyncConnection)
    async with a.conn.cursor() as cur, cur.copy(f"COPY {t} FROM STDIN") as copy:
        await copy.write_row((2, 2))
    await b.check(f"SELECT count(*) FROM {t}", why="COPY FROM STDIN through the sibling")


async def test_b_reads_inside_as_transaction_commits_later(env: Env) -> None:
    """A's UPDATE inside BEGIN; B caches (and serves) the old row meanwhile, which is right
    until A commits; A's COMMIT returns: B must not serve the old row any more."""
    t = await env.table("adv_tx", "id int PRIMARY KEY, v int", "(1, 0)")
    a, b = await _pair(env)
    await _learned(a, t)
    read = f"SELECT v FROM {t} WHERE id = 1"
    await a.run("BEGIN")
    await a.run(f"UPDATE {t} SET v = 5 WHERE id = 1")
    await b.probe(read)  # stored and served while A's transaction is open: the old row is right
    await b.probe(read)
    await a.run("COMMIT")
    await b.check(read, why="A's COMMIT returned")
    await a.run("BEGIN")
    await a.run(f"UPDATE {t} SET v = 6 WHERE id = 1")
    await a.run("ROLLBACK")
    await b.check(read, why="A's ROLLBACK")


async def test_revoke_through_a_reaches_a_role_served_on_b(env: Env) -> None:
    t = await env.table("adv_grant", "v int", "(1)", grant="PUBLIC")
    role = await env.role("adv_sib_r")
    a, b = await _pair(env, b_login=env.login(role))
    read = f"SELECT v FROM {t}"
    await b.probe(read)
    await b.probe(read)
    await a.run(f"REVOKE ALL ON {t} FROM PUBLIC")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await b.via.rows(read)


async def test_prepared_statements_on_both_sides(env: Env) -> None:
    t = await env.table("adv_prep", "id int PRIMARY KEY, v int", "(1, 0)")
    a = await _on(env, 0, driver="asyncpg")
    b_via = await _on(env, 1, env.login(), "asyncpg")
    b = Twin(env, b_via, await env.client(via=False, driver="asyncpg"), env.login())
    await a.rows(f"SELECT count(*) FROM {t}")
    for i in range(1, 4):
        await b.probe(f"SELECT v FROM {t} WHERE id = $1", (1,))
        await b.probe(f"SELECT v FROM {t} WHERE id = $1", (1,))
        await a.rows(f"UPDATE {t} SET v = $1 WHERE id = $2 RETURNING v", (i, 1))
        await b.check(f"SELECT v FROM {t} WHERE id = $1", (1,), why="prepared write, prepared read")

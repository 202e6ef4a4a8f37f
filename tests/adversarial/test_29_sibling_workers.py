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

import asyncio
import os
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from neonpoly.cache.invalidation import TableGenerations
from neonpoly.cache.siblings import SiblingBoard
from tests.adversarial.conftest import WORKERS
from tests.adversarial.harness import Client, Env, Login, Twin, unique
from tests.adversarial.placement import session_on
from tests.freshness.conftest import plane_node, until
from tests.freshness.redisharness import RedisServer, redis_server_binary
from tests.pgharness import PgServer
from tests.proxy.workers import WorkersProxy

workers_only = pytest.mark.skipif(WORKERS < 2, reason="sibling workers: NEONPOLY_TEST_WORKERS=2 (serve --workers N)")


async def _pair(
    env: Env, *, a_login: Login | None = None, b_login: Login | None = None, b_driver: Any = "psycopg"
) -> tuple[Client, Twin]:
    """A writer on worker 0, and a twin (through neonpoly on worker 1, and direct) for reads."""
    a = await session_on(env, 0, a_login)
    login = b_login or env.login()
    via = await session_on(env, 1, login, b_driver)
    direct = await env.client(login, via=False, driver=b_driver)
    return a, Twin(env, via, direct, login)


async def _served_then_written(b: Twin, read: str, a: Client, *writes: str, why: str) -> None:
    """B serves `read` from its cache (provably), A writes, and B's next answer is the origin's."""
    await b.probe(read)  # its hit is remembered: the next read takes the memo's path (proxy/hits.py)
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


@workers_only
async def test_update_on_a_then_hit_on_b(env: Env) -> None:
    table = await env.table("adv_sib", "id int PRIMARY KEY, v int", "(1, 0)", "(2, 0)")
    a, b = await _pair(env)
    await _learned(a, table)
    whole, keyed = f"SELECT v FROM {table} ORDER BY id", f"SELECT v FROM {table} WHERE id = 2"
    for i, (read, write) in enumerate(
        [
            (whole, "UPDATE {t} SET v = {i}"),
            (keyed, "UPDATE {t} SET v = v + {i} WHERE id = 2"),  # a keyed write (cache/keys.py)
            (whole, "UPDATE {t} SET v = v + {i} WHERE id = 2"),  # the keyed write, the whole table read
            (keyed, "UPDATE {t} SET v = v + {i}"),  # the whole table written, a key's rows read
            (keyed, "DELETE FROM {t} WHERE id = 2 | UPDATE {t} SET id = 2, v = {i} WHERE id = 1"),  # onto the key
        ],
        start=1,
    ):
        writes = write.format(t=table, i=i).split(" | ")
        await _served_then_written(b, read, a, *writes, why=f"{write} through the sibling")


@workers_only
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


@workers_only
async def test_same_table_name_in_two_schemas_search_path(env: Env) -> None:
    s1, s2 = unique("adv_s1"), unique("adv_s2")
    await env.admin(f"CREATE SCHEMA {s1}", f"CREATE SCHEMA {s2}",
                    f"CREATE TABLE {s1}.t (v int)", f"INSERT INTO {s1}.t VALUES (1)",
                    f"CREATE TABLE {s2}.t (v int)", f"INSERT INTO {s2}.t VALUES (2)",
                    f"GRANT USAGE ON SCHEMA {s1}, {s2} TO PUBLIC",
                    f"GRANT ALL ON {s1}.t, {s2}.t TO PUBLIC")  # fmt: skip
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {s1} CASCADE", f"DROP SCHEMA IF EXISTS {s2} CASCADE")
    a, b = await _pair(env)
    await b.both(f"SET search_path = {s2}")
    await a.run(f"SET search_path = {s1}")
    await _learned(a, "t")
    await a.run(f"SET search_path = {s2}")
    await _learned(a, "t")
    await _served_then_written(b, "SELECT v FROM t", a, "UPDATE t SET v = v + 100",
                               why="A's search_path names the same schema as B's")  # fmt: skip


@workers_only
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


# In this order, on one table: each changes what `SELECT * FROM t` answers.
CODE_AND_DDL = (
    "DO $$BEGIN UPDATE {t} SET v = 42; END$$",
    "SELECT {t}_bump()",
    "CALL {t}_proc()",
    "WITH x AS (UPDATE {t} SET v = 43 RETURNING v) SELECT count(*) FROM x",
    "INSERT INTO {t}_log VALUES (44)",
    "UPDATE {t}_view SET v = 45",
    "UPDATE {t}_ruled SET v = 46",
    "SELECT count(*) FROM {t}_log WHERE {t}_bump() IS NOT NULL",
    "BEGIN | UPDATE {t} SET v = 48 | SAVEPOINT s | UPDATE {t} SET v = 0 | ROLLBACK TO s | COMMIT",
    "BEGIN | UPDATE {t} SET v = 49 | PREPARE w AS UPDATE {t} SET v = 50 | EXECUTE w | COMMIT",
    "ALTER TABLE {t} ADD COLUMN w int DEFAULT 5",
    "TRUNCATE {t}",
    "DROP TABLE {t} CASCADE | CREATE TABLE {t} (id int, v int) | INSERT INTO {t} VALUES (1, 99)",
    "CREATE TEMP TABLE {t} AS SELECT 1 AS id, 7 AS v | UPDATE public.{t} SET v = 47",
)


@workers_only
async def test_code_and_ddl_through_a(env: Env) -> None:
    """Writes whose eviction is the database's or everything (code neonpoly cannot follow,
    DDL) or tables reached through triggers, rules and views: through Redis, acknowledged."""
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
        f"INSERT INTO {t}_ruled VALUES (0)",
        f"GRANT ALL ON {t}_log, {t}_view, {t}_ruled TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS {t}_log, {t}_ruled CASCADE", f"DROP FUNCTION IF EXISTS {t}_bump()",
                   f"DROP PROCEDURE IF EXISTS {t}_proc()", f"DROP FUNCTION IF EXISTS {t}_trig() CASCADE")  # fmt: skip
    a, b = await _pair(env)
    for name in (t, f"{t}_log", f"{t}_view", f"{t}_ruled"):
        await a.rows(f"SELECT count(*) FROM {name}")
    await _learned(a, t)
    for write in CODE_AND_DDL:
        await _learned(a, t)  # after DDL A forgot what it knew: plain writes are table bumps again
        await _served_then_written(b, f"SELECT * FROM {t} ORDER BY 1", a, *write.format(t=t).split(" | "), why=write)


@workers_only
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


@workers_only
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


@workers_only
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


@workers_only
async def test_prepared_statements_on_both_sides(env: Env) -> None:
    t = await env.table("adv_prep", "id int PRIMARY KEY, v int", "(1, 0)")
    a = await session_on(env, 0, driver="asyncpg")
    b_via = await session_on(env, 1, env.login(), "asyncpg")
    b = Twin(env, b_via, await env.client(via=False, driver="asyncpg"), env.login())
    await a.rows(f"SELECT count(*) FROM {t}")
    for i in range(1, 4):
        await b.probe(f"SELECT v FROM {t} WHERE id = $1", (1,))
        await b.probe(f"SELECT v FROM {t} WHERE id = $1", (1,))
        await a.rows(f"UPDATE {t} SET v = $1 WHERE id = $2 RETURNING v", (i, 1))
        await b.check(f"SELECT v FROM {t} WHERE id = $1", (1,), why="prepared write, prepared read")


@workers_only
async def test_a_table_a_never_looked_up(env: Env) -> None:
    """A's first write to a table it knows nothing of evicts the database (through Redis)."""
    t = await env.table("adv_new", "id int, v int", "(1, 0)")
    a, b = await _pair(env)
    await _served_then_written(b, f"SELECT v FROM {t}", a, f"UPDATE {t} SET v = 1", why="a table A never saw")


@workers_only
async def test_b_reads_a_view_a_writes_its_table(env: Env) -> None:
    t = await env.table("adv_vw", "id int PRIMARY KEY, v int", "(1, 0)")
    await env.admin(f"CREATE VIEW {t}_v AS SELECT id, v * 2 AS w FROM {t}", f"GRANT ALL ON {t}_v TO PUBLIC")
    a, b = await _pair(env)
    await _learned(a, t)
    for i in (1,):
        await _served_then_written(b, f"SELECT w FROM {t}_v", a, f"UPDATE {t} SET v = {i} WHERE id = 1",
                                   why="B's view over A's table")  # fmt: skip


@workers_only
async def test_row_level_security_turned_on_through_a(env: Env) -> None:
    """Never one role's rows to another: a policy made through A reaches B's next answer."""
    t = await env.table("adv_rls", "owner text, v int", grant="PUBLIC")
    role = await env.role("adv_sib_rls")
    await env.admin(f"INSERT INTO {t} VALUES ('{role}', 1), ('someone_else', 2)")
    a, b = await _pair(env, b_login=env.login(role))
    read = f"SELECT v FROM {t} ORDER BY v"
    await b.probe(read)
    await b.probe(read)
    await a.run(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")
    await a.run(f"CREATE POLICY p ON {t} USING (owner = current_user)")
    await b.check(read, why="a policy made through the sibling")


@workers_only
async def test_admin_purge_after_a_write_neonpoly_did_not_see(env: Env) -> None:
    """A write straight to the origin may leave stale hits until the TTL, unless the admin
    purges: once the console's PURGE returned, no worker serves what it removed."""
    assert isinstance(env.proxy, WorkersProxy)
    t = await env.table("adv_purge", "id int, v int", "(1, 0)")
    read = f"SELECT v FROM {t}"
    twins = [Twin(env, await session_on(env, w), await env.client(via=False), env.login()) for w in (0, 1)]
    for i, purge in enumerate(("PURGE QUERY {q}", "PURGE TABLE {t}", "PURGE ALL"), start=1):
        for twin in twins:
            await twin.probe(read)
        queries = env.proxy.admin("SHOW QUERIES")
        template = next(str(q[1]) for q in queries if t in str(q[2]))
        await env.admin(f"UPDATE {t} SET v = {i}")
        env.proxy.admin(purge.format(t=t, q=template))
        for twin in twins:
            await twin.check(read, why=purge)


# --- the board alone, without serve ---------------------------------------------------------


def test_names_sharing_a_slot_and_a_board_made_again() -> None:
    """Every name on one slot (extra evictions only), three rows: no bump anywhere leaves a
    stamp taken before it current; and a stamp of a run whose board had counted siblings never
    matches in the next run's fresh board, however far this worker's own counts go."""
    parent = SiblingBoard.create(3, slots=1)
    rows = [SiblingBoard.attach(os.dup(parent.fileno()), i) for i in range(3)]
    try:
        gens = [TableGenerations() for _ in rows]
        for g, row in zip(gens, rows, strict=True):
            g.share(row.view("origin"))
        stamps = [(g.stamp("db", {"x"}), g.stamp("db", {"y"})) for g in gens]
        for writer in range(3):
            for name in ("x", "y"):
                before = [(g, g.stamp("db", {name})) for g in gens]
                others = [(g, g.stamp("db", {"x", "y"} - {name})) for i, g in enumerate(gens) if i != writer]
                gens[writer].bump_tables("db", {name})
                rows[writer].view("origin").bump("db", [name])
                assert not any(g.is_current(s) for g, s in before)
                assert not any(g.is_current(s) for g, s in others)  # its slot moved: evicted too
        assert not any(g.is_current(s) for g, pair in zip(gens, stamps, strict=True) for s in pair)
        # The next run: the state saved at close, a fresh board of zeros.
        fresh = SiblingBoard.create(3, slots=1)
        again = SiblingBoard.attach(os.dup(fresh.fileno()), 1)
        try:
            old = gens[1].stamp("db", {"x"})  # counts the siblings' 6 bumps
            reloaded = TableGenerations.from_state(gens[1].to_state())
            reloaded.share(again.view("origin"))
            for _ in range(12):
                assert not reloaded.is_current(old)
                reloaded.bump_tables("db", {"x"})
        finally:
            again.close()
            fresh.close()
    finally:
        for board in (*rows, parent):
            board.close()


# --- boards named after nodes: another set's names ------------------------------------------


async def test_a_name_on_the_board_that_belongs_to_another_hosts_node(pg: PgServer, tmp_path: Path) -> None:
    """Two hosts both called `box`, one Redis, `serve --workers 2 --listen :6432` on the first
    and `--workers 3` on the second (or the same --node-id): the second set's w0 and w1 are
    refused as twins of the first's box:6432/w0 and /w1, but they wrote those names on their
    board first; its w2 is up. The board names a node only once Redis registered it under its
    name (freshness/siblings.py `holds_name`): w2 must not take the first set's w0 for a
    sibling and drop its table bumps (nor stop waiting for its acknowledgements)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(binary)
    redis.start()
    t = unique("adv_twin")
    first, second = SiblingBoard.create(2, slots=1024), SiblingBoard.create(3, slots=1024)
    rows = [SiblingBoard.attach(os.dup(first.fileno()), 0),
            *(SiblingBoard.attach(os.dup(second.fileno()), i) for i in range(3))]  # fmt: skip
    try:
        async with pg.superuser_conn() as conn:
            await conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)")
            await conn.execute(f"INSERT INTO {t} VALUES (1, 0)")
        # A long heartbeat: the first w0 keeps its name through a stall of a loaded machine (with
        # the default 3 s a stalled w0 lost it to its twin, and was then refused itself).
        plane = {"grace": 0.0, "heartbeat": 30.0}
        async with plane_node(
            pg, tmp_path / "a", redis.url, plane={**plane, "node": "box:6432/w0"}, siblings=rows[0]
        ) as a:
            await until(lambda: _plane_up(a), "the first set's w0 on the plane")
            async with (
                # The second set's w0: refused as the twin of the first's (it passes through).
                plane_node(
                    pg, tmp_path / "t", redis.url, plane={**plane, "node": "box:6432/w0"}, siblings=rows[1]
                ) as twin,
                plane_node(
                    pg, tmp_path / "c", redis.url, plane={**plane, "node": "box:6432/w2"}, siblings=rows[3]
                ) as c,
            ):
                await until(lambda: "another process holds the name" in _plane_reason(twin), "the twin refused")
                await _twin_case(pg, t, a, c)
    finally:
        for board in (*rows, first, second):
            board.close()
        redis.destroy()  # its temp dir too
        async with pg.superuser_conn() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {t}")


@workers_only
async def test_a_read_in_flight_on_b_across_a_write_is_not_kept(env: Env) -> None:
    """B's miss is sent (and its snapshot taken) before A's write, and answered after A's write
    returned: its rows are old, so they must not become B's next hits. Twice: once as a plain
    capture, once as the memo's own miss (the entry its memo held was made stale first)."""
    t = await env.table("adv_race", "id int PRIMARY KEY, v int", "(1, 0)")
    a, b = await _pair(env)
    await _learned(a, t)
    # Slow after its snapshot: a builtin's work (cacheable), no lock, no sleep function.
    read = f"SELECT v, (SELECT count(*) FROM generate_series(1, 200000)) AS n FROM {t} WHERE id = 1"
    await b.probe(read)
    await b.probe(read)
    for i in (1, 2):
        slow = asyncio.ensure_future(b.via.rows(read))
        await asyncio.sleep(0.05)  # only orders: sent later, the read sees the write (and the case proves less)
        await a.run(f"UPDATE {t} SET v = {i} WHERE id = 1")
        await slow  # its old rows (seen when this case was written): right when it was sent
        await b.check(read, why=f"a read in flight across write {i}")


def _plane_up(node: Any) -> bool:
    status = node.service.report().plane
    return status is not None and bool(status.origins) and status.origins[0].caught_up


def _plane_reason(node: Any) -> str:
    plane = node.service.plane
    return str(plane.reason) if plane is not None else ""


async def _twin_case(pg: PgServer, t: str, a: Any, c: Any) -> None:
    await until(lambda: _plane_up(a) and _plane_up(c), "the first set's w0 and the second's w2 on the plane")
    writer = await asyncpg.connect(**a.dsn())
    reader = await asyncpg.connect(**c.dsn())
    try:
        read = f"SELECT v FROM {t} WHERE id = 1"
        for _ in range(3):  # A learns the table: its writes are table bumps
            await writer.fetchval(read)
            await writer.execute(f"UPDATE {t} SET v = v WHERE id = 1")
        await reader.fetchval(read)
        hits = c.hits()
        assert await reader.fetchval(read) == 0 and c.hits() == hits + 1, "C must serve it from its cache"
        await writer.execute(f"UPDATE {t} SET v = 1 WHERE id = 1")
        assert await reader.fetchval(read) == 1, "C served the row A's returned write changed"
    finally:
        await writer.close()
        await reader.close()

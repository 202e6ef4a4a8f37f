"""The second hostile review, through neonpoly (no change feed): text neonpoly cannot read,
and writes that land in tables (or databases) other than the ones they name.

A session whose client_encoding is not UTF-8: neonpoly reads every SQL text as UTF-8. A
LATIN1 client's `"café"` arrives as the bytes `caf\\xe9`, which neonpoly read as `caf\\ufffd`:
the relation lookup did not find it (a "plain name, not in the catalog yet"), the read was
cached tagged with that name, and a write to `café` from any UTF-8 session (or the change
feed) bumped `café`, not the tag. The session's answer stayed stale (and first, the lookup's
answer in LATIN1 ended the session). Now such a session is treated like one with
standard_conforming_strings off: nothing it sends is cached, and its statements evict.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.adversarial.harness import Env, Login, unique
from tests.pgharness import PgServer
from tests.proxy.caching import caching_proxy


async def _latin1_twin(env: Env) -> tuple[str, Login]:
    table = f'"café_{unique("t")[-8:]}"'
    await env.admin(f"CREATE TABLE public.{table} (id int PRIMARY KEY, v int)",
                    f"INSERT INTO public.{table} VALUES (1, 1)",
                    f"GRANT ALL ON public.{table} TO PUBLIC")
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{table}")
    base = env.login()
    return table, Login(base.user, base.password, base.database, (("client_encoding", "LATIN1"),))


async def test_latin1_session_read_then_a_write_through_a_utf8_session(env: Env) -> None:
    table, login = await _latin1_twin(env)
    latin = await env.twin(login)
    read = f"SELECT v FROM {table} WHERE id = 1"
    # Before the fix: a hit by the third run (the lookup's answer in LATIN1 first ended the
    # session: a UnicodeDecodeError in neonpoly); now never cached.
    _, hit = await latin.probe(read, require_hit=False)
    assert not hit
    writer = await env.client()
    await writer.rows(f"SELECT count(*) FROM {table}")  # known: its writes evict by name
    await writer.run(f"UPDATE {table} SET v = 2 WHERE id = 1")
    await latin.check(read, why="a LATIN1 session's read after a write through a UTF-8 session")


async def test_latin1_session_writes_evict(env: Env) -> None:
    """A UTF-8 session's cached read, then the LATIN1 session writes the same table."""
    table, login = await _latin1_twin(env)
    reader = await env.twin()
    read = f"SELECT v FROM {table} WHERE id = 1"
    await reader.probe(read)
    latin = await env.client(login)
    await latin.run(f"UPDATE {table} SET v = 3 WHERE id = 1")
    await reader.check(read, why="a UTF-8 session's read after a write through a LATIN1 session")


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "UTF8"])
async def test_encodings_read_as_utf8_stay_cached(env: Env, encoding: str) -> None:
    table = await env.table("adv_enc", "id int PRIMARY KEY, v int", "(1, 1)")
    base = env.login()
    twin = await env.twin(Login(base.user, base.password, base.database, (("client_encoding", encoding),)))
    read = f"SELECT v FROM {table} WHERE id = 1"
    await twin.probe(read)
    writer = await env.client()
    await writer.run(f"UPDATE {table} SET v = 2 WHERE id = 1")
    await twin.check(read, why=f"a {encoding} session's read after a write")



# --- writes that land elsewhere -------------------------------------------------------------


async def _loopback_server(env: Env, database: str) -> str:
    server = unique("adv_srv")
    await env.admin(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw",
        f"CREATE SERVER {server} FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host '127.0.0.1', port '{env.pg.port}', dbname '{database}', sslmode 'disable')",
        f"CREATE USER MAPPING FOR postgres SERVER {server} "
        f"OPTIONS (user 'postgres', password '{env.pg.password_for('postgres')}')",
    )
    env.on_cleanup(f"DROP SERVER IF EXISTS {server} CASCADE")
    return server


async def test_write_through_a_foreign_table_to_a_local_table(env: Env) -> None:
    """UPDATE of a postgres_fdw foreign table sent through neonpoly: the rows it changes are
    the base table's, which neonpoly had cached; the write named only the foreign table.
    A write to a foreign table now evicts like one running triggers (every database)."""
    base = await env.table("adv_base", "id int, v text", "(1, 'old')")
    server, ft = await _loopback_server(env, "app"), unique("adv_ft")
    await env.admin(f"CREATE FOREIGN TABLE {ft} (id int, v text) SERVER {server} OPTIONS (table_name '{base}')")
    reader = await env.twin()
    read = f"SELECT v FROM {base}"
    await reader.probe(read)
    writer = await env.client()
    await writer.rows(f"SELECT count(*) FROM {ft}")  # looked up: its writes are judged by the catalog
    await writer.run(f"UPDATE {ft} SET v = 'new'")
    assert await reader.origin(read) == [("new",)]
    await reader.check(read, why="after UPDATE of a foreign table over it, through neonpoly")
    await reader.probe(read, require_hit=False)  # every answer equal to the origin's, hits or not


async def test_write_through_a_foreign_table_into_another_database(env: Env) -> None:
    """The same, the foreign table pointing into another database neonpoly also serves."""
    other = unique("adv_db")
    await env.admin(f"CREATE DATABASE {other}")
    env.on_cleanup(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
    await env.admin("CREATE TABLE public.t (id int, v text)", "INSERT INTO public.t VALUES (1, 'old')",
                    database=other)
    server, ft = await _loopback_server(env, other), unique("adv_ft")
    await env.admin(f"CREATE FOREIGN TABLE {ft} (id int, v text) SERVER {server} OPTIONS (table_name 't')")
    reader = await env.twin(env.login(database=other))
    read = "SELECT v FROM t"
    await reader.probe(read)
    writer = await env.client()
    await writer.rows(f"SELECT count(*) FROM {ft}")
    await writer.run(f"UPDATE {ft} SET v = 'new'")
    assert await reader.origin(read) == [("new",)]
    await reader.check(read, why="after UPDATE of a foreign table pointing into this database, through neonpoly")
    await reader.probe(read, require_hit=False)  # every answer equal to the origin's, hits or not


async def test_dblink_exec_into_another_database(env: Env) -> None:
    """SELECT dblink_exec('dbname=other', 'UPDATE t …') through neonpoly, connected to app:
    unknown code evicted app's entries only (other's session learned its identity again, so
    its first read went to the origin; the next ones were stale hits). Now a write through
    neonpoly that evicts its database evicts every database's entries."""
    other = unique("adv_db")
    await env.admin(f"CREATE DATABASE {other}")
    env.on_cleanup(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
    await env.admin("CREATE TABLE public.t (id int, v text)", "INSERT INTO public.t VALUES (1, 'old')",
                    "GRANT ALL ON public.t TO PUBLIC", database=other)
    await env.admin("CREATE EXTENSION IF NOT EXISTS dblink SCHEMA public")
    env.on_cleanup("DROP EXTENSION IF EXISTS dblink")
    reader = await env.twin(env.login(database=other))
    read = "SELECT v FROM t"
    await reader.probe(read)
    writer = await env.client()
    conninfo = f"host=127.0.0.1 port={env.pg.port} dbname={other} user=trust_user"
    await writer.rows(f"SELECT dblink_exec('{conninfo}', 'UPDATE public.t SET v = ''new''')")
    assert await reader.origin(read) == [("new",)]
    await reader.check(read, why="after dblink_exec into this database, sent through neonpoly in another")
    await reader.probe(read, require_hit=False)  # every answer equal to the origin's, hits or not


# --- a hit that leaves the origin inside a transaction ---------------------------------------


async def test_hit_after_parse_describe_flush_leaves_no_transaction_open(pg: PgServer, tmp_path: Path) -> None:
    """asyncpg without a statement cache (the setting PgBouncer users run) sends each query as
    Parse/Describe/Flush, then Bind/Execute/Sync. With `--admit-after 1` the first part went
    to the origin, which opened an implicit transaction for it, and the second was answered
    from the cache with its Sync: the origin never saw the Sync, and the transaction stayed
    open while the client was idle (its locks held: DDL on the table waits for it; its
    catalog caches unread). A GRANT through another session then evicted pg_has_role()'s
    entry, and the next read, run by the origin inside that old transaction, still said
    false. Now nothing is answered locally while the origin holds a batch ended by Flush."""
    async with caching_proxy(pg, tmp_path / "cache", admit_after=1) as proxy:
        admin = await asyncpg.connect(**pg.dsn("postgres", "app"))
        reader = await asyncpg.connect(**proxy.dsn(), statement_cache_size=0)
        writer = await asyncpg.connect(**proxy.dsn())
        member, group = unique("adv_mem"), unique("adv_grp")
        try:
            await admin.execute(f"CREATE ROLE {member}")
            await admin.execute(f"CREATE ROLE {group}")
            read = f"SELECT pg_has_role('{member}', '{group}', 'MEMBER')"
            hit = False
            for _ in range(5):
                before = proxy.totals().get("hit", 0)
                assert await reader.fetchval(read) is False
                hit = proxy.totals().get("hit", 0) > before
                if hit:
                    break
            assert hit, proxy.totals()
            pid = reader.get_server_pid()
            state = await admin.fetchval(f"SELECT state FROM pg_stat_activity WHERE pid = {pid}")
            await writer.execute(f"GRANT {group} TO {member}")
            for n in range(3):
                assert await reader.fetchval(read) is True, f"read {n + 1} after GRANT through neonpoly"
            assert state == "idle", f"the origin's backend was {state!r} while its client was idle"
        finally:
            for conn in (reader, writer):
                await conn.close()
            await admin.execute(f"DROP ROLE IF EXISTS {member}")
            await admin.execute(f"DROP ROLE IF EXISTS {group}")
            await admin.close()

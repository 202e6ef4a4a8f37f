"""The second hostile review: a session whose client_encoding is not UTF-8.

neonpoly reads every SQL text as UTF-8. A LATIN1 client's `"café"` arrives as the bytes
`caf\\xe9`, which neonpoly read as `caf\\ufffd`: the relation lookup did not find it (a "plain
name, not in the catalog yet"), the read was cached tagged with that name, and a write to
`café` from any UTF-8 session (or the change feed) bumped `café`, not the tag. The session's
answer stayed stale. Now such a session is treated like one with standard_conforming_strings
off: nothing it sends is cached, and its statements evict its database.
"""

from __future__ import annotations

import pytest

from tests.adversarial.harness import Env, Login, unique


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


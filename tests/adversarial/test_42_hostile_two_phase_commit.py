"""Hostile review of two-phase commit through neonpoly: PREPARE TRANSACTION ends the session's
transaction (it is idle again) but makes nothing visible; the writes appear at COMMIT
PREPARED, which any session may run later, through neonpoly or straight to the origin.

The suite's origin runs with max_prepared_transactions = 0 (PREPARE TRANSACTION fails there),
so this file has an origin of its own with prepared transactions allowed.

A reader's answer cached while the transaction is prepared (the old rows, right then) must
not outlive the COMMIT PREPARED: through neonpoly it evicts the database; made directly, the
write was still one neonpoly saw (its UPDATE went through it), so what it wrote must not be
cached while its outcome is unknown to neonpoly.

The direct COMMIT PREPARED FAILED BEFORE (the read cached while prepared stayed a stale hit):
PREPARE TRANSACTION left the session idle, so neonpoly evicted its writes then, as at a
COMMIT, and stored the reads that followed. Now PREPARE TRANSACTION (by any protocol) holds
what the transaction wrote (QueryCache.hold_prepared: no answer reading it is stored) until
a COMMIT or ROLLBACK PREPARED of its gid passes through neonpoly; committed elsewhere, those
tables stay uncached (never stale) until neonpoly restarts.

Against `serve --workers N` (NEONPOLY_TEST_WORKERS=2) the transaction is prepared through one
worker and read through another (two_phase.py): the direct COMMIT PREPARED cases FAILED BEFORE
there (the hold was the preparing worker's alone, so the other stored the old rows); the hold
is now in the memory the workers share (cache/siblings.py `BoardHolds`), and a COMMIT PREPARED
through either worker releases it in both.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.adversarial.harness import Env, eventually, unique
from tests.adversarial.two_phase import prepared_transactions_origin, reading_twin, session
from tests.pgharness import PgServer


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    yield from prepared_transactions_origin()


async def _prepared_write(env: Env, how: str = "simple queries") -> tuple[str, str, str]:
    """A table, a read of it, and a prepared transaction (through neonpoly) that updated it:
    by simple queries, all in one query string, or PREPARE TRANSACTION by the extended protocol."""
    gid = unique("adv_gid")
    env.on_cleanup(f"ROLLBACK PREPARED '{gid}'")  # first: it holds a lock on the table
    t = await env.table("adv_2pc", "id int PRIMARY KEY, v text", "(1, 'old')", "(2, 'other')")
    read = f"SELECT v FROM {t} WHERE id = 1"
    writer = await session(env, t)  # on the writing worker, the reads on another
    statements = ("BEGIN", f"UPDATE {t} SET v = 'new' WHERE id = 1", f"PREPARE TRANSACTION '{gid}'")
    if how == "one query string":
        await writer.run("; ".join(statements))
    else:
        for sql in statements:
            await writer.run(sql)  # simple Query
        if how == "extended protocol":
            assert isinstance(writer.conn, psycopg.AsyncConnection)
            await writer.run(f"ROLLBACK PREPARED '{gid}'")
            for sql in statements:
                await writer.conn.cursor(binary=True).execute(sql)  # binary: Parse/Bind/Execute
    return t, read, gid


@pytest.mark.parametrize(
    "commit_by",
    [
        "another session through neonpoly",
        "the same session",
        "a direct connection",
    ],
)
async def test_commit_prepared_after_a_read_cached_while_prepared(env: Env, commit_by: str) -> None:
    _, read, gid = await _prepared_write(env)
    reader = await reading_twin(env)
    # (First: a catalog neonpoly has not looked up evicts the database when read.)
    listed = await reader.check(f"SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{gid}'", why="listed")
    assert listed == [(1,)]
    # While prepared the old row is right: through neonpoly it may be cached (a hit is not
    # required: with the fix, what a prepared transaction wrote is not stored meanwhile).
    rows, _ = await reader.probe(read, require_hit=False)
    assert rows == [("old",)]
    if commit_by == "a direct connection":
        await env.admin(f"COMMIT PREPARED '{gid}'")
    elif commit_by == "the same session":
        await reader.via.run(f"COMMIT PREPARED '{gid}'")
    else:
        committer = await session(env)  # on the writing worker: the reading one must be released too
        await committer.run(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why=f"after COMMIT PREPARED by {commit_by}")
    assert rows == [("new",)]
    # Cached again once neonpoly knows the outcome; never, when the commit bypassed it.
    _, hit = await reader.probe(read, require_hit=commit_by != "a direct connection")
    assert hit is (commit_by != "a direct connection")


@pytest.mark.parametrize("how", ["one query string", "extended protocol"])
async def test_prepared_by_other_protocols_then_committed_directly(env: Env, how: str) -> None:
    _, read, gid = await _prepared_write(env, how)
    reader = await reading_twin(env)
    await reader.check(f"SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{gid}'", why="listed")
    await reader.probe(read, require_hit=False)
    await env.admin(f"COMMIT PREPARED '{gid}'")
    rows = await reader.check(read, why=f"after COMMIT PREPARED (made directly) of a transaction prepared by {how}")
    assert rows == [("new",)]


async def test_rollback_prepared_leaves_the_old_rows(env: Env) -> None:
    _, read, gid = await _prepared_write(env)
    reader = await reading_twin(env)
    await reader.probe(read, require_hit=False)
    other = await session(env)
    await other.run(f"ROLLBACK PREPARED '{gid}'")
    rows = await reader.check(read, why="after ROLLBACK PREPARED")
    assert rows == [("old",)]
    await reader.probe(read)


async def test_tables_of_other_prepared_transactions_stay_cached(env: Env) -> None:
    """The control: a prepared transaction holds back only what it wrote."""
    await _prepared_write(env)
    t = await env.table("adv_2pc_other", "id int PRIMARY KEY, v text", "(1, 'kept')")
    reader = await reading_twin(env)
    await reader.probe(f"SELECT v FROM {t} WHERE id = 1")


async def _reasons(env: Env, table: str) -> list[tuple[str, str]]:
    """SHOW QUERIES (the admin database, merged over every worker): (last_status,
    last_reason) of the templates reading `table`."""
    conn = await psycopg.AsyncConnection.connect(env.proxy.url(database="neonpoly"), autocommit=True)
    try:
        cur = await conn.execute("SHOW QUERIES")
        names = [c.name for c in cur.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
    finally:
        await conn.close()
    mine = [r for r in rows if f"FROM {table} WHERE" in str(r["template"])]
    return [(str(r["last_status"]), str(r["last_reason"] or "")) for r in mine]


async def test_a_held_read_says_which_prepared_transaction_holds_it(env: Env) -> None:
    """A read not stored because a prepared transaction wrote what it reads is still a miss,
    with a reason naming the gid and what ends the hold (SHOW QUERIES, the console's details).
    Before, it was a plain miss: nothing told the user why the read never became a hit."""
    t, read, gid = await _prepared_write(env)
    reader = await reading_twin(env)
    await reader.probe(read, require_hit=False, tries=3)
    reasons = await eventually(lambda: _reasons(env, t), lambda found: any(gid in why for _, why in found))
    status, why = next((s, w) for s, w in reasons if gid in w)
    assert status == "miss" and "COMMIT or ROLLBACK PREPARED" in why, (status, why)

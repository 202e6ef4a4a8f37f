"""Hostile review of stop 25's new code: the rules that say a read or a write runs code of the
user's, clock words in values, and two-phase commit holds shared between workers. Each case
is a wrong answer that FAILED BEFORE (a cached answer stale after a hit, or a clock served
old), fixed in this file's commits.

* Reads planned with expressions of the catalog's (relation_lookup.py 'j' rows): planning
  folds calls of constants (eval_const_expressions) not only in index expressions and
  predicates (adversarial 46) but in an expression's extended statistics (plancat.c, at every
  plan of a read of the table) and a partitioned table's key expressions (partcache.c, when a
  session first loads the table). A lying IMMUTABLE f(0) there bumped the counter in a plain read.
* Writes routed by a partition key (its expressions, of the table or a partitioned table above
  it: 'd' rows): an INSERT into a table partitioned by f(id), or into its partition (the
  partition constraint is checked), computes f per row.
* A partition key's operator class whose comparison is plpgsql: pruning a read and routing a
  written row run it ('i' rows and the 'w' flag, as for an index's class).
* A superuser's UPDATE through an updatable view over pg_description: pg_depend records no
  dependency on a catalog, so the write reached the view alone; obj_description() stayed
  stale. A view whose definition reads a relation named pg_… is now opaque to writes.
* Clock words spelt with the escapes array and range input undo (`{"n\\ow"}`, `[n"o"w,)`),
  in a literal or a Bind value: `reads_clock` and the literal check searched the raw text.
  Both now search it again without quotes and backslashes.
* COMMIT PREPARED 'g' runs at the origin at once but its batch ends later (its next statement
  waits on a lock); a transaction prepared as 'g' meanwhile through neonpoly had its hold
  released by that batch's end, and its direct COMMIT PREPARED left a read stale. A release
  now ends only what was held when it was sent (PreparedHolds.taken).

Not kept (proved nothing here): a UNION ALL of a table whose CHECK calls f(0) did not run it
on PostgreSQL 15 (constraint exclusion of an append member).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from tests.adversarial import rawpg
from tests.adversarial.conftest import WORKERS
from tests.adversarial.harness import Client, Env, eventually, unique
from tests.adversarial.harness2 import (
    commented_by_hand_then_check,
    counter,
    make_known,
    ran_code_then_check,
    warm_counter,
)
from tests.adversarial.placement import session_on
from tests.adversarial.two_phase import WRITING_WORKER, prepared_transactions_origin, reading_twin
from tests.pgharness import PgServer


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    yield from prepared_transactions_origin()


async def _lying(env: Env, bump: str) -> str:
    """An IMMUTABLE plpgsql function of the user's (a lie: it bumps the counter)."""
    fn = unique("adv_lying")
    await env.admin(
        f"CREATE FUNCTION public.{fn}(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN $1; END $$",
        f"GRANT EXECUTE ON FUNCTION public.{fn}(int) TO PUBLIC",
    )
    env.on_cleanup(f"DROP FUNCTION IF EXISTS public.{fn}(int) CASCADE")
    return fn


async def test_read_plans_with_statistics_that_fold_code_of_the_users(env: Env) -> None:
    """get_relation_statistics folds an expression statistics' calls of constants at every
    plan of a read of the table (not only a new session's)."""
    count, bump = await counter(env)
    fn = await _lying(env, bump)
    t = await env.table("adv_stx", "id int, v text", "(1, 'x')")
    await env.admin(f"CREATE STATISTICS public.{t}_st ON ((id + public.{fn}(0))) FROM public.{t}")
    await make_known(env, t)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    await ran_code_then_check(env, reader, read, f"SELECT v FROM {t} WHERE id = 1", "the statistics' f(0)")


async def test_read_plans_with_a_partition_key_that_folds_code_of_the_users(env: Env) -> None:
    """A new session's first plan of a partitioned table loads its key, folding its calls of
    constants."""
    count, bump = await counter(env)
    fn = await _lying(env, bump)
    p = unique("adv_pkr")
    await env.admin(
        f"CREATE TABLE public.{p} (id int, v text) PARTITION BY RANGE ((id + public.{fn}(0)))",
        f"CREATE TABLE public.{p}_1 PARTITION OF public.{p} FOR VALUES FROM (MINVALUE) TO (MAXVALUE)",
        f"INSERT INTO public.{p} VALUES (1, 'x')",
        f"GRANT ALL ON public.{p}, public.{p}_1 TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{p} CASCADE")
    await make_known(env, p)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    await ran_code_then_check(env, reader, read, f"SELECT v FROM {p} WHERE id = 1", "the partition key's f(0)")


@pytest.mark.parametrize("target", ["parent", "partition"])
async def test_write_routed_by_a_partition_key_of_the_users(env: Env, target: str) -> None:
    """An INSERT into a table partitioned by f(id) computes f for each row (routing it, or
    checking a partition's constraint when it names the partition)."""
    count, bump = await counter(env)
    fn = await _lying(env, bump)
    p = unique("adv_pkw")
    await env.admin(
        f"CREATE TABLE public.{p} (id int, v text) PARTITION BY RANGE ((public.{fn}(id)))",
        f"CREATE TABLE public.{p}_1 PARTITION OF public.{p} FOR VALUES FROM (MINVALUE) TO (MAXVALUE)",
        f"GRANT ALL ON public.{p}, public.{p}_1 TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{p} CASCADE")
    name = p if target == "parent" else f"{p}_1"
    await make_known(env, name)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    writer = await env.client()
    await writer.run(f"INSERT INTO {name} VALUES (5, 'x')")
    assert await reader.origin(read) != [(0,)], "the key never ran f: proves nothing"
    await reader.check(read, why=f"after an INSERT into the {target} of a table partitioned by f(id)")


@pytest.mark.parametrize("how", ["read", "write"])
async def test_partition_key_compared_by_an_operator_class_of_the_users(env: Env, how: str) -> None:
    """A partition key with a non-default operator class whose comparison is plpgsql (a lying
    one that bumps the counter): pruning a read's partitions and routing a written row compare
    with it (its support function), no index or expression anywhere."""
    count, bump = await counter(env)
    ops, p = unique("adv_pops"), unique("adv_pko")
    await env.admin(
        f"CREATE FUNCTION public.{ops}_cmp(int, int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM public.{bump}(); RETURN pg_catalog.btint4cmp($1, $2); END $$",
        f"CREATE OPERATOR CLASS public.{ops} FOR TYPE int USING btree AS OPERATOR 1 pg_catalog.<, "
        f"OPERATOR 2 pg_catalog.<=, OPERATOR 3 pg_catalog.=, OPERATOR 4 pg_catalog.>=, OPERATOR 5 pg_catalog.>, "
        f"FUNCTION 1 public.{ops}_cmp(int, int)",
        f"CREATE TABLE public.{p} (id int, v text) PARTITION BY RANGE (id public.{ops})",
        f"CREATE TABLE public.{p}_1 PARTITION OF public.{p} FOR VALUES FROM (0) TO (100)",
        f"CREATE TABLE public.{p}_2 PARTITION OF public.{p} FOR VALUES FROM (100) TO (200)",
        f"INSERT INTO public.{p} VALUES (5, 'x'), (150, 'y')",
        f"GRANT ALL ON public.{p}, public.{p}_1, public.{p}_2 TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{p} CASCADE",
                   f"DROP OPERATOR FAMILY IF EXISTS public.{ops} USING btree CASCADE",
                   f"DROP FUNCTION IF EXISTS public.{ops}_cmp(int, int)")  # fmt: skip
    await make_known(env, p)
    await env.admin(f"UPDATE public.{count} SET n = 0")
    reader, read = await warm_counter(env, count)
    if how == "read":
        await ran_code_then_check(env, reader, read, f"SELECT v FROM {p} WHERE id = 5", "the key's comparison")
        return
    writer = await env.client()
    await writer.run(f"INSERT INTO {p} VALUES (7, 'z')")
    assert await reader.origin(read) != [(0,)], "routing never ran the comparison: proves nothing"
    await reader.check(read, why="after an INSERT routed by a partition key's comparison of the user's")


async def test_superuser_write_to_a_system_catalog_through_a_view(env: Env) -> None:
    """A view over pg_description is automatically updatable: a superuser's UPDATE of it
    writes the catalog (a COMMENT by hand), which obj_description() reads."""
    t = await env.table("adv_cmv", "id int")
    view = unique("adv_descr")
    await env.admin(
        f"COMMENT ON TABLE public.{t} IS 'old'",
        f"CREATE VIEW public.{view} AS SELECT * FROM pg_catalog.pg_description",
    )
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    oid = await env.admin_val(f"SELECT 'public.{t}'::regclass::oid")
    why = "after a superuser's UPDATE of a view over pg_description through neonpoly"
    await commented_by_hand_then_check(env, view, oid, why)


# --- clock words spelt with the escapes array, range and record input undo ------------------

# An array element or a range bound may backslash-escape any character, and a range bound may
# quote part of itself: `{"n\ow"}`, `[n\ow,)` and `[n"o"w,)` hold the word now.
_ESCAPED = {
    "array, backslash": ('{{"n\\ow"}}', "timestamptz[]"),
    "range, quotes": ('[n"o"w,)', "tstzrange"),
    "range, backslash": ("[n\\ow,)", "tstzrange"),
}


@pytest.mark.parametrize("how", ["literal", "parameter"])
@pytest.mark.parametrize("spelling", sorted(_ESCAPED))
async def test_clock_word_spelt_with_an_escape(env: Env, spelling: str, how: str) -> None:
    """The value is the clock's time at each run: a cached answer would be an older time."""
    text, typ = _ESCAPED[spelling]
    value = text.format()
    sql = f"SELECT '{value}'::{typ}" if how == "literal" else f"SELECT %s::{typ}"
    params = (value,) if how == "parameter" else ()
    client = await env.client()
    for run in range(4):
        before = dt.datetime.now(dt.UTC)
        got = (await client.rows(sql, params))[0][0]
        first = got[0] if isinstance(got, list) else got.lower
        assert isinstance(first, dt.datetime) and first >= before, (
            f"run {run + 1} of {sql!r} {params!r}: answered {first!r}, older than the call: a cached clock"
        )


# --- two-phase commit: a release racing a new hold of the same gid -------------------------


async def _on_writer(env: Env, login_user: str, table: str) -> Client:
    login = env.login(login_user)
    client = await session_on(env, WRITING_WORKER, login) if WORKERS > 1 else await env.client(login)
    await client.rows(f"SELECT count(*) FROM {table}")
    return client


async def test_commit_prepared_released_after_the_gid_was_prepared_again(env: Env) -> None:
    """COMMIT PREPARED 'g' (transaction one) runs at the origin at once, but its batch ends
    later (its next statement waits on a lock); meanwhile transaction two is prepared as 'g'
    through neonpoly. The end of the first batch must not release the second's hold: that
    one is then committed straight on the origin, and a read cached meanwhile would be stale."""
    gid, lock = unique("adv_gid"), 470047
    t = await env.table("adv_2pr", "id int PRIMARY KEY, v text", "(1, 'old')")
    env.on_cleanup(f"ROLLBACK PREPARED '{gid}'")
    read = f"SELECT v FROM {t} WHERE id = 1"
    first = await _on_writer(env, "trust_user", t)
    for sql in ("BEGIN", f"UPDATE {t} SET v = 'one' WHERE id = 1", f"PREPARE TRANSACTION '{gid}'"):
        await first.run(sql)
    holder = await env.client(via=False)
    await holder.rows(f"SELECT pg_advisory_lock({lock})")
    committer = await rawpg.Raw.connect(env.proxy.port)
    try:
        committer.send(
            rawpg.parse("", f"COMMIT PREPARED '{gid}'"), rawpg.bind("", ""), rawpg.execute(),
            rawpg.parse("", f"SELECT pg_advisory_lock({lock})"), rawpg.bind("", ""), rawpg.execute(),
            rawpg.SYNC,
        )  # fmt: skip
        await eventually(lambda: env.admin_val(f"SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{gid}'"),
                         lambda n: n == 0)  # fmt: skip
        second = await _on_writer(env, "trust_user", t)
        for sql in ("BEGIN", f"UPDATE {t} SET v = 'two' WHERE id = 1", f"PREPARE TRANSACTION '{gid}'"):
            await second.run(sql)
        await holder.rows(f"SELECT pg_advisory_unlock({lock})")
        msgs = await committer.until_ready()
        assert not [m for m in msgs if m[0] == b"E"], msgs
    finally:
        await committer.close()
    reader = await reading_twin(env)
    rows, _ = await reader.probe(read, require_hit=False, tries=3)
    assert rows == [("one",)]
    await env.admin(f"COMMIT PREPARED '{gid}'")
    await reader.check(read, why="after a direct COMMIT PREPARED of the gid's second transaction")

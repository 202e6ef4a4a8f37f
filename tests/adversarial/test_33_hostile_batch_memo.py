"""Hostile review of the prepared-batch memo (`BatchHandling._lone_batch`, batches.py): a
read that is one Bind/(Describe)/Execute/Sync of a remembered shape is decided from its
`BatchMemo`, not planned again.

Every case first makes the shortcut provably taken (a hit counted while the session's
`_lone_batch` answered, with the byte-for-byte hit memos of hits.py forgotten so that only
the shortcut can answer) and then sends the same bytes, through neonpoly and straight to
the origin, after something that must change the answer: both answers must be equal.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from tests.adversarial import rawpg
from tests.adversarial.batch_memo import (
    FLUSH,
    Pair,
    bind,
    bm_table,
    hit_by_shortcut,
    lone,
    memos,
    normal,
    parse,
    prepared,
    watch,
)  # fmt: skip
from tests.adversarial.harness import Driver, Env, hits, unique
from tests.proxy.caching import CachingProxy

pytestmark = pytest.mark.skipif(
    __import__("os").environ.get("NEONPOLY_TEST_WORKERS", "1") not in ("", "1"),
    reason="looks into the in-process session's memos",
)


# --- statements closed, deallocated, discarded, parsed again ---------------------------------


async def test_statement_replaced_under_the_same_name(env: Env) -> None:
    t = await bm_table(env)
    pair = await Pair.open(env)
    s1 = f"SELECT v FROM {t} WHERE id = $1"
    s2 = f"SELECT upper(v) FROM {t} WHERE id = $1"
    await prepared(pair, parse("s", s1))
    await pair.warm(lone("s", b"2"), lone("s", b"3"))
    await pair.shortcut_hit(lone("s", b"1"), why="s(1)")
    # Close + Parse in one read, the same Bind bytes after it.
    await pair.both(rawpg.close_statement("s"), parse("s", s2), rawpg.SYNC)
    await pair.both(lone("s", b"2"), why="after Close + Parse under the same name")
    await pair.warm(lone("s", b"3"))
    await pair.shortcut_hit(lone("s", b"1"), why="s2(1)")
    # DEALLOCATE (simple Query) then Parse again, the original text.
    await pair.both(rawpg.query("DEALLOCATE s"))
    await pair.both(parse("s", s1), rawpg.SYNC)
    await pair.both(lone("s", b"3"), why="after DEALLOCATE + Parse")
    await pair.warm(lone("s", b"2"))
    await pair.shortcut_hit(lone("s", b"1"), why="s(1) again")
    # DISCARD ALL drops it: the Bind must fail as at the origin, then the other text.
    await pair.both(rawpg.query("DISCARD ALL"))
    await pair.both(lone("s", b"2"), why="after DISCARD ALL")
    await pair.both(parse("s", s2), rawpg.SYNC)
    await pair.both(lone("s", b"2"), why="after DISCARD ALL + Parse of other text")
    # Close, Parse and the lone batch's messages in one read (the full path), then alone.
    await pair.both(rawpg.close_statement("s"), parse("s", s1), lone("s", b"2"), why="Close/Parse/Bind in one read")
    await pair.both(lone("s", b"2"), why="after Close/Parse/Bind in one read")
    await pair.both(rawpg.close_statement("s"), parse("s", s2), lone("s", b"2"), why="Close/Parse/Bind, other text")
    await pair.both(lone("s", b"2"), why="after Close/Parse/Bind of other text in one read")
    # A Parse of a name that exists fails at the origin: the old statement stays.
    await pair.both(parse("s", s1), rawpg.SYNC)
    await pair.both(lone("s", b"3"), why="after a refused Parse")


async def test_unnamed_statement_and_parameter_types_parsed_again(env: Env) -> None:
    pair = await Pair.open(env)
    await prepared(pair, parse("", "SELECT pg_typeof($1)::text || ':' || $1::text", (23,)))
    await pair.warm(lone("", b"2"), lone("", b"3"))
    await pair.shortcut_hit(lone("", b"1"), why="unnamed int4")
    # Same text, other declared type: the same Bind bytes mean something else.
    await pair.both(parse("", "SELECT pg_typeof($1)::text || ':' || $1::text", (25,)), rawpg.SYNC)
    await pair.both(lone("", b"2"), why="unnamed re-parsed as text")
    await pair.warm(lone("", b"3"))
    await pair.shortcut_hit(lone("", b"1"), why="unnamed text")
    await pair.both(parse("", "SELECT 'other:' || $1::text", (25,)), rawpg.SYNC)
    await pair.both(lone("", b"1"), why="unnamed re-parsed with other text")
    # A simple Query drops the unnamed statement at the origin.
    await pair.both(rawpg.query("SELECT 1"))
    await pair.both(lone("", b"3"), why="unnamed after a simple Query")
    # Named, types given explicitly, Close + Parse with another OID.
    await prepared(pair, parse("n", "SELECT pg_typeof($1)::text", (20,)))
    await pair.warm(lone("n", b"2"))
    await pair.shortcut_hit(lone("n", b"1"), why="n int8")
    await pair.both(rawpg.close_statement("n"), parse("n", "SELECT pg_typeof($1)::text", (1700,)), rawpg.SYNC)
    await pair.both(lone("n", b"1"), why="n re-parsed numeric")


# --- formats, portals, row limits, Describe, Flush -------------------------------------------


async def test_formats_portals_row_limits_describe_and_flush(env: Env) -> None:
    t = await bm_table(env)
    pair = await Pair.open(env)
    await prepared(pair, parse("s", f"SELECT id, v FROM {t} WHERE id >= $1 ORDER BY id", (23,)))
    binary_one = struct.pack("!i", 1)
    await pair.warm(lone("s", b"2"), lone("s", b"3"))
    await pair.shortcut_hit(lone("s", b"1"), why="text")
    variants = [
        ("binary results", lone("s", b"1", results=(1,))),
        ("mixed results", lone("s", b"1", results=(1, 0))),
        ("binary parameter", lone("s", binary_one, formats=(1,))),
        ("binary parameter, binary results", lone("s", binary_one, formats=(1,), results=(1,))),
        ("named portal", lone("s", b"1", portal="p")),
        ("row limit", lone("s", b"1", rows=1)),
        ("row limit 2", lone("s", b"1", rows=2)),
        ("describe statement", bind("s", (b"1",)) + rawpg.describe_statement("s") + rawpg.execute() + rawpg.SYNC),
        ("no describe", bind("s", (b"1",)) + rawpg.execute() + rawpg.SYNC),
    ]
    for name, frames in variants:
        await pair.both(frames, why=name)
    for name, frames in variants:  # each stored now, then answered by its own shortcut
        await pair.both(frames, why=name)
        await pair.shortcut_hit(frames, why=name)
    for _ in range(3):  # a Describe of a portal alone is never cached: the origin's, always
        await pair.both(bind("s", (b"1",)) + rawpg.describe_portal() + rawpg.SYNC, why="describe only")
    # The memo's messages ended by a Flush, their Sync in a read of its own.
    flushed = lone("s", b"1")[:-5] + FLUSH
    for _ in range(2):
        pair.forget_hit_memos()
        for raw in (pair.via, pair.direct):
            raw.send(flushed)
            await raw.writer.drain()
        await asyncio.sleep(0.01)
        pair.via.send(rawpg.SYNC)
        pair.direct.send(rawpg.SYNC)
        got, want = await pair.via.until_ready(), await pair.direct.until_ready()
        assert normal(got) == normal(want), f"Flush instead of Sync: proxy {got!r} != direct {want!r}"
    # A row limit then a second Execute of the suspended portal in the same batch, and after
    # a Flush: the portal must exist at the origin.
    await pair.both(bind("s", (b"1",)) + rawpg.execute("", 1) + rawpg.execute("", 0) + rawpg.SYNC, why="resumed")
    pair.via.send(bind("s", (b"1",)), rawpg.describe_portal(), rawpg.execute("", 1), FLUSH)
    pair.direct.send(bind("s", (b"1",)), rawpg.describe_portal(), rawpg.execute("", 1), FLUSH)
    got, want = [], []
    for _ in range(4):  # BindComplete, RowDescription, DataRow, PortalSuspended
        got.append(await pair.via.message())
        want.append(await pair.direct.message())
    assert got == want and got[-1][0] == b"s", (got, want)
    await pair.both(rawpg.execute("", 0), rawpg.SYNC, why="the suspended portal after a Flush")


# --- reads: split, pipelined, errors, failed transactions ------------------------------------


async def test_split_at_every_byte_pipelined_and_errors(env: Env) -> None:
    t = await bm_table(env)
    pair = await Pair.open(env)
    await prepared(pair, parse("s", f"SELECT v FROM {t} WHERE id = $1", (23,)))
    await pair.warm(lone("s", b"2"), lone("s", b"3"))
    one = lone("s", b"1")
    await pair.shortcut_hit(one, why="s(1)")
    writer = await env.client()
    for cut in range(1, len(one)):
        if cut % 4 == 0:  # a write the proxy sees between some of them
            await writer.run(f"UPDATE {t} SET v = v || '.' WHERE id = 1")
        await pair.both(one, split=cut, why=f"torn at byte {cut}")
    await pair.shortcut_hit(one, why="s(1) after the writes")
    two = lone("s", b"2")
    await pair.both(one + two, readies=2, why="two lone batches in one read")
    await pair.both(two + one, readies=2, why="two lone batches in one read, swapped")
    for cut in range(1, len(one + two), 3):  # the pair torn anywhere: a lone batch, then the rest
        await pair.both(one + two, readies=2, split=cut, why=f"two lone batches torn at byte {cut}")
    bad = lone("s", b"x")  # invalid input for int4: an error, the rest skipped to Sync
    await pair.both(bad, why="a value the origin refuses")
    await pair.both(bad + one, readies=2, why="an error, then a memo's batch")
    await pair.both(bind("s", (b"x",)) + rawpg.execute() + one, why="an error in the middle: skipped to the Sync")
    await pair.both(one[:-5] + bind("s", (b"x",)) + rawpg.execute() + rawpg.SYNC, why="an error after a good Execute")
    # A division by zero for one value only.
    await prepared(pair, parse("d", f"SELECT 10 / (id - $1) FROM {t} WHERE id = 2", (23,)))
    await pair.warm(lone("d", b"0"))
    await pair.shortcut_hit(lone("d", b"0"), why="d(0)")
    await pair.both(lone("d", b"2"), why="division by zero")
    await pair.both(lone("d", b"2"), why="division by zero again")
    # Inside an explicit transaction and a failed one.
    # (The direct twin cannot share the open transaction: its own write is the answer.)
    pair.via.send(rawpg.query("BEGIN"), rawpg.query(f"UPDATE {t} SET v = 'mine' WHERE id = 1"))
    await pair.via.until_ready()
    await pair.via.until_ready()
    for _ in range(2):
        pair.forget_hit_memos()
        pair.via.send(one)
        assert rawpg.rows(await pair.via.until_ready()) == [[b"mine"]], "inside a transaction after its own write"
    pair.via.send(rawpg.query("ROLLBACK"))
    await pair.via.until_ready()
    await pair.both(rawpg.query("BEGIN"))
    await pair.both(rawpg.query("SELECT 1/0"))
    await pair.both(one, why="inside a failed transaction")
    await pair.both(rawpg.query("ROLLBACK"))
    await pair.both(one, why="after ROLLBACK")


# --- the clock in parameter values -----------------------------------------------------------


async def test_clock_words_in_parameters_are_never_answered_from_the_cache(env: Env) -> None:
    pair = await Pair.open(env)
    await prepared(
        pair,
        parse("c", "SELECT $1::timestamptz::text", (25,)),
        parse("d", "SELECT ($1::date - date '2000-01-01')::text", (25,)),
    )
    await pair.warm(lone("c", b"2001-02-03 04:05:06+00"))
    await pair.shortcut_hit(lone("c", b"2001-02-03 04:05:06+00"), why="a constant timestamp")
    await pair.warm(lone("d", b"2001-02-03"))
    await pair.shortcut_hit(lone("d", b"2001-02-03"), why="a constant date")
    words = [b"now", b"NOW", b"Now", b"  now  ", b"today", b"TODAY", b"ToDaY", b"tomorrow", b"TOMORROW",
             b"yesterday", b"YESTERDAY", b"YesterDay", b"today 10:00", b"{now}"]  # fmt: skip
    for word in words:
        for statement, fmt in (("c", 0), ("c", 1), ("d", 0), ("d", 1)):
            if word == b"{now}":
                continue
            frames = lone(statement, word, formats=(fmt,))  # a text parameter sent binary is its bytes
            for _ in range(3):
                before = hits(pair.proxy)
                pair.forget_hit_memos()
                pair.via.send(frames)
                got = await pair.via.until_ready()
                assert hits(pair.proxy) == before, f"{word!r} ({statement}, format {fmt}) answered from the cache"
                assert b"E" not in rawpg.kinds(got), got
    # Constants that hold no clock: cached or not, the origin's answer.
    for word in (b"epoch", b"infinity", b"-infinity", b"EPOCH", b"Infinity"):
        for _ in range(3):
            await pair.both(lone("c", word), why=f"{word!r}")
    await prepared(pair, parse("a", "SELECT $1::time::text", (25,)))
    for word in (b"allballs", b"ALLBALLS", b"04:05"):
        for _ in range(3):
            await pair.both(lone("a", word), why=f"{word!r}")
    # Text computed from a value into a date/time: the value spells no clock word itself.
    computed = [
        ("SELECT reverse($1)::timestamptz::text", b"won"),
        ("SELECT convert_from($1::bytea, 'UTF8')::timestamptz::text", b"\\x6e6f77"),
        ("SELECT convert_from(decode($1, 'base64'), 'UTF8')::timestamptz::text", b"bm93"),
    ]
    for i, (sql, value) in enumerate(computed):
        await prepared(pair, parse(f"k{i}", sql, (25,)))
        for _ in range(3):
            before = hits(pair.proxy)
            pair.forget_hit_memos()
            pair.via.send(lone(f"k{i}", value))
            got = await pair.via.until_ready()
            assert hits(pair.proxy) == before and rawpg.rows(got), f"{sql} with {value!r} answered from the cache"
    # The clock in the statement: never cached, whatever the values.
    await prepared(pair, parse("n", "SELECT (now() - $1::timestamptz) > interval '0'", (25,)))
    for _ in range(4):
        before = hits(pair.proxy)
        await pair.both(lone("n", b"2001-01-01"), why="now() in the statement")
        assert hits(pair.proxy) == before


# --- sessions: search_path, roles, settings, writes -----------------------------------------


async def test_search_path_role_and_timezone_between_executions(env: Env) -> None:
    a, b = await env.role("adv_bma"), await env.role("adv_bmb")
    t = await env.table("adv_bmr", "owner text, v int", grant="PUBLIC")
    await env.admin(
        f"INSERT INTO {t} VALUES ('{a}', 1), ('{b}', 2), ('{a}', 3)",
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON {t} USING (owner = current_user)",
        f"GRANT {a} TO trust_user",
        f"GRANT {b} TO trust_user",
    )
    pair = await Pair.open(env)
    await pair.both(rawpg.query(f"SET ROLE {a}"))
    await prepared(pair, parse("r", f"SELECT v FROM {t} WHERE v >= $1 ORDER BY v", (23,)))
    await pair.warm(lone("r", b"2"))
    await pair.shortcut_hit(lone("r", b"0"), why="role a")
    # Another session as the other role sends the very bytes, its own memo made on the way.
    other = await rawpg.Raw.connect(env.proxy.port)
    env.stack.push_async_callback(other.close)
    other.send(rawpg.query(f"SET ROLE {b}"), parse("r", f"SELECT v FROM {t} WHERE v >= $1 ORDER BY v", (23,)))
    other.send(rawpg.SYNC)
    await other.until_ready()
    await other.until_ready()
    for _ in range(4):
        other.send(lone("r", b"0"))
        assert rawpg.rows(await other.until_ready()) == [[b"2"]], "another role's session, the same bytes"
        await pair.both(lone("r", b"0"), why="the first role's session again")
    await pair.both(rawpg.query(f"SET ROLE {b}"))
    await pair.both(lone("r", b"0"), why="after SET ROLE to another role")
    await pair.both(lone("r", b"2"), why="after SET ROLE to another role, stored value")
    await pair.both(rawpg.query("SELECT set_config('role', '" + a + "', false)"))
    await pair.both(lone("r", b"0"), why="after set_config('role')")
    # The role set by prepared statements run as lone batches themselves.
    await prepared(pair, parse("sr", f"SET ROLE {b}"), parse("rr", "RESET ROLE"))
    await pair.both(rawpg.query(f"SET ROLE {a}"))
    await pair.both(lone("r", b"0"), why="role a again")
    await pair.both(bind("sr", ()) + rawpg.execute() + rawpg.SYNC)
    await pair.both(lone("r", b"0"), why="after a prepared SET ROLE")
    await pair.both(bind("rr", ()) + rawpg.execute() + rawpg.SYNC)
    await pair.both(lone("r", b"0"), why="after a prepared RESET ROLE")
    # search_path: the same text names another table.
    schemas = [unique(f"adv_bm_sp{i}") for i in (1, 2)]
    for i, schema in enumerate(schemas):
        await env.admin(
            f"CREATE SCHEMA {schema}", f"CREATE TABLE {schema}.t (v int)", f"INSERT INTO {schema}.t VALUES ({i + 1})",
            f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC", f"GRANT SELECT ON {schema}.t TO PUBLIC",
        )  # fmt: skip
        env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    await pair.both(rawpg.query(f"SET search_path = {schemas[0]}"))
    await prepared(pair, parse("p", "SELECT v + $1 FROM t", (23,)))
    await pair.warm(lone("p", b"2"))
    await pair.shortcut_hit(lone("p", b"0"), why="search_path 1")
    await pair.both(rawpg.query(f"SET search_path = {schemas[1]}"))
    await pair.both(lone("p", b"0"), why="after search_path moved")
    await pair.both(lone("p", b"2"), why="after search_path moved, stored value")
    await pair.both(rawpg.query(f"SELECT set_config('search_path', '{schemas[0]}', false)"))
    await pair.both(lone("p", b"2"), why="after set_config('search_path')")
    # set_config with the path a parameter of a prepared statement, run as a lone batch.
    await prepared(pair, parse("sp", "SELECT set_config('search_path', $1, false)", (25,)))
    for schema in (schemas[1], schemas[0], schemas[1]):
        await pair.both(lone("sp", schema.encode()), why="a prepared set_config")
        await pair.both(lone("p", b"2"), why=f"after a prepared set_config to {schema}")
    # TimeZone: the same timestamptz prints otherwise.
    await pair.both(rawpg.query("SET TimeZone = 'UTC'"))
    await prepared(pair, parse("z", "SELECT $1::timestamptz::text", (25,)))
    await pair.warm(lone("z", b"2001-02-03 04:05:06+00"))
    await pair.shortcut_hit(lone("z", b"2001-02-03 04:05:06+03"), why="UTC")
    await pair.both(rawpg.query("SET TimeZone = 'Asia/Tokyo'"))
    await pair.both(lone("z", b"2001-02-03 04:05:06+00"), why="after SET TimeZone")
    await pair.both(lone("z", b"2001-02-03 04:05:06+03"), why="after SET TimeZone")


async def test_writes_through_prepared_statements_then_prepared_reads(env: Env) -> None:
    t = await bm_table(env)
    pair = await Pair.open(env)
    await prepared(
        pair,
        parse("r", f"SELECT v FROM {t} WHERE id = $1", (23,)),
        parse("w", f"UPDATE {t} SET v = $2 WHERE id = $1", (23, 25)),
    )
    await pair.warm(lone("r", b"2"), lone("r", b"3"))
    await pair.shortcut_hit(lone("r", b"1"), why="r(1)")
    for i, target in enumerate((b"1", b"2", b"3", b"1")):
        write = bind("w", (target, b"w%d" % i)) + rawpg.execute() + rawpg.SYNC
        pair.forget_hit_memos()
        pair.via.send(write)
        await pair.via.until_ready()
        for read in (b"1", b"2", b"3"):
            await pair.both(lone("r", read), why=f"after UPDATE by $1 = {target!r}")
        await pair.shortcut_hit(lone("r", target), why=f"r({target!r}) after the write")
    # Pipelined: a write and the read in one read, and the read in the next read.
    write = bind("w", (b"1", b"piped")) + rawpg.execute() + rawpg.SYNC
    pair.forget_hit_memos()
    pair.via.send(write + lone("r", b"1"))
    await pair.via.until_ready()
    got = await pair.via.until_ready()
    assert rawpg.rows(got) == [[b"piped"]], got
    await pair.both(lone("r", b"1"), why="after a pipelined write")
    # A write in another session through neonpoly.
    other = await env.client()
    await other.run(f"UPDATE {t} SET v = 'other' WHERE id = 2")
    await pair.both(lone("r", b"2"), why="after another session's write")


# --- real drivers --------------------------------------------------------------------------


async def test_psycopg_and_asyncpg_prepared_reads_after_writes(env: Env) -> None:
    t = await bm_table(env)
    proxy = env.proxy
    assert isinstance(proxy, CachingProxy)
    drivers: tuple[Driver, ...] = ("psycopg_prepared", "psycopg_extended", "asyncpg")
    for driver in drivers:
        twin = await env.twin(driver=driver)
        taken = [0]
        watch(proxy, taken)
        mark = "$1" if driver == "asyncpg" else "%s"
        read = f"SELECT v, id FROM {t} WHERE id = {mark}"
        for key in (2, 3):
            await twin.probe(read, (key,), require_hit=False)
        before = taken[0]
        await twin.probe(read, (1,))
        if driver != "psycopg_extended":  # (that one sends a Parse with every Bind: the full path)
            assert taken[0] > before and memos(proxy) >= 1, f"{driver}: the shortcut never answered"
        write = f"UPDATE {t} SET v = {mark} WHERE id = {mark.replace('1', '2')}"
        for i, key in enumerate((1, 2, 1)):
            await twin.via.rows(write, (f"{driver}{i}", key))
            for k in (1, 2, 3):
                await twin.check(read, (k,), why=f"{driver} after its own write to {key}")
        await twin.probe(read, (1,))
        await twin.both("SET search_path = pg_catalog, public")
        await twin.check(read, (1,), why=f"{driver} after SET search_path")


# --- transactions: a snapshot older than the cache, a failure still in flight ----------------


async def test_a_repeatable_read_snapshot_is_not_answered_from_newer_entries(env: Env) -> None:
    """Inside REPEATABLE READ the session's snapshot predates a write another session made
    (and stored the answer of) since: the shortcut must not serve the newer entry."""
    t, pair, one = await hit_by_shortcut(env)
    await pair.both(rawpg.query("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    await pair.both(rawpg.query("SELECT 1"))  # the snapshot is taken
    other = await rawpg.Raw.connect(env.proxy.port)
    env.stack.push_async_callback(other.close)
    other.send(parse("s", f"SELECT v FROM {t} WHERE id = $1", (23,)), rawpg.SYNC)
    await other.until_ready()
    other.send(rawpg.query(f"UPDATE {t} SET v = 'newer' WHERE id = 1"))
    await other.until_ready()
    for _ in range(3):  # the newer answer stored, then served to the other session
        other.send(one)
        assert rawpg.rows(await other.until_ready()) == [[b"newer"]]
    for _ in range(2):
        await pair.both(one, why="inside a REPEATABLE READ snapshot older than the entry")
    await pair.both(rawpg.query("COMMIT"))
    await pair.both(one, why="after COMMIT")


async def test_a_batch_behind_a_request_still_failing_the_transaction(env: Env) -> None:
    """The shortcut's batch arrives while the request before it is still at the origin and
    will leave the transaction failed: the origin's answer is an error, not cached rows."""
    _, pair, one = await hit_by_shortcut(env)
    failing = rawpg.query("BEGIN; SELECT pg_sleep(0.2); SELECT 1/0")
    for raw in (pair.via, pair.direct):
        raw.send(failing)
        await raw.writer.drain()
    await asyncio.sleep(0.05)  # a read of its own at the proxy, the Query still running
    pair.forget_hit_memos()
    pair.via.send(one)
    pair.direct.send(one)
    for _ in range(2):
        got, want = await pair.via.until_ready(), await pair.direct.until_ready()
        assert normal(got) == normal(want), f"behind a failing request: proxy {got!r} != direct {want!r}"
    await pair.both(rawpg.query("ROLLBACK"))
    await pair.both(one, why="after ROLLBACK")


# --- the catalog moves under a remembered shape ----------------------------------------------


async def test_catalog_moves_under_a_remembered_shape(env: Env) -> None:
    """A view replaced, a function redefined and a table dropped and made again, each through
    another session of neonpoly, then written: the shape's plan rests on what they were."""
    t1, t2 = await bm_table(env), await bm_table(env)
    view, func = unique("adv_bmv"), unique("adv_bmf")
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}", f"DROP FUNCTION IF EXISTS public.{func}(int)")
    writer = await env.client()
    await writer.run(f"CREATE VIEW public.{view} AS SELECT id, v FROM public.{t1}")
    await writer.run(
        f"CREATE FUNCTION public.{func}(int) RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT 'a' || $1 $$"
    )
    await env.admin(f"GRANT SELECT ON public.{view} TO PUBLIC")
    pair = await Pair.open(env)
    await prepared(
        pair,
        parse("v", f"SELECT v FROM {view} WHERE id = $1", (23,)),
        parse("f", f"SELECT {func}($1)", (23,)),
        parse("t", f"SELECT v FROM {t2} WHERE id = $1", (23,)),
    )
    await pair.warm(lone("f", b"2"), lone("f", b"1"))  # (a function of the user's: never cached)
    for name in ("v", "t"):
        await pair.warm(lone(name, b"2"))
        await pair.shortcut_hit(lone(name, b"1"), why=name)
    await writer.run(f"CREATE OR REPLACE VIEW public.{view} AS SELECT id, v FROM public.{t2}")
    for value in (b"1", b"1", b"1", b"2"):  # stored again, on what the view reads now
        await pair.both(lone("v", value), why="after CREATE OR REPLACE VIEW")
    await writer.run(f"UPDATE public.{t2} SET v = 'moved' WHERE id IN (1, 2)")
    for value in (b"1", b"2", b"3"):
        await pair.both(lone("v", value), why="after CREATE OR REPLACE VIEW and a write to its new base")
    await writer.run(
        f"CREATE OR REPLACE FUNCTION public.{func}(int) RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT 'b' || $1 $$"
    )
    for value in (b"1", b"2"):
        await pair.both(lone("f", value), why="after the function was redefined")
    await writer.run(f"DROP TABLE public.{t2} CASCADE")
    await writer.run(f"CREATE TABLE public.{t2} (id int PRIMARY KEY, v text)")
    await writer.run(f"INSERT INTO public.{t2} VALUES (1, 'again'), (2, 'again')")
    await env.admin(f"GRANT ALL ON public.{t2} TO PUBLIC")
    for value in (b"1", b"1", b"1", b"2", b"3"):
        await pair.both(lone("t", value), why="after the table was dropped and made again")
    await writer.run(f"UPDATE public.{t2} SET v = 'new table, written' WHERE id = 1")
    for value in (b"1", b"2"):
        await pair.both(lone("t", value), why="after the table made again was written")


async def test_settings_that_change_how_values_read_or_print(env: Env) -> None:
    """The same values, read or printed under other settings between executions."""
    pair = await Pair.open(env)
    cases = [
        ("SELECT $1::date::text", b"01/02/2001", ("SET DateStyle = 'ISO, MDY'", "SET DateStyle = 'ISO, DMY'")),
        ("SELECT $1::date::text", b"01/02/2001", ("SET DateStyle = 'ISO, DMY'", "SET datestyle TO german")),
        (
            "SELECT $1::interval::text",
            b"1 day 2 hours",
            ("SET IntervalStyle = postgres", "SET IntervalStyle = iso_8601"),
        ),
        ("SELECT decode($1, 'hex')::text", b"00ff41", ("SET bytea_output = 'hex'", "SET bytea_output = 'escape'")),
        ("SELECT ($1::float8 / 3)::text", b"1", ("SET extra_float_digits = 1", "SET extra_float_digits = -3")),
        (
            "SELECT $1::timestamptz::text",
            b"2001-02-03 04:05:06",
            ("SET TimeZone = 'UTC'", "SET TimeZone = 'America/Lima'"),
        ),
        ("SELECT ($1::text < 'b')::text", b"B", ("SET lc_messages = 'C'", "SET enable_seqscan = off")),
    ]
    for i, (sql, value, (first, then)) in enumerate(cases):
        await pair.both(rawpg.query(first))
        await prepared(pair, parse(f"g{i}", sql, (25,)))
        await pair.warm(lone(f"g{i}", b"x" if "decode" not in sql and "float" not in sql else b"2"))
        await pair.shortcut_hit(lone(f"g{i}", value), why=f"{sql} under {first}")
        await pair.both(rawpg.query(then))
        for _ in range(3):
            await pair.both(lone(f"g{i}", value), why=f"{sql} after {then}")

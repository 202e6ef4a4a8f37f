"""Hostile review of a simple Query sent inside an extended batch before its Sync (proxy/
batches.py `_query_in_batch`, relay.py's `in_batch`/`streaming` counting, `unsynced`).

PostgreSQL runs such a Query in the batch's implicit transaction, commits it and answers it
with a ReadyForQuery of its own (the Sync gets another), unless a message before it failed:
then it skips everything, the Query included, to the Sync. Each case sends one pipeline (raw
frames) both to the origin directly and through neonpoly, in rounds on the same connections
(so its reads are stored and then served), and compares every answer (message kinds and
rows, ParameterStatus and notices aside). Every round ends with a SET application_name (the
identity lookup goes out as soon as neonpoly thinks nothing is outstanding), a quick read and
(last round) a slow one, whose answers prove the session is still in step. A FunctionCall
inside a batch is answered like such a Query (its own ReadyForQuery, skipped after an error):
its two cases failed before the relay took it as one (answers swapped, or matched one request
early)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest

from neonpoly import pgwire
from tests.adversarial.rawpg import (
    SYNC,
    Message,
    Raw,
    bind,
    close_statement,
    describe_portal,
    describe_statement,
    execute,
    parse,
    query,
    rows,
)
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table

FLUSH = pgwire.frame(b"H")
Shape = list[tuple[bytes, list[list[bytes | None]]]]
# A chunk of the pipeline, then how many messages to read from each side before the next
# chunk goes (None: none, only a short pause so that it arrives in a packet of its own).
Step = tuple[bytes, int | None]


def pbe(sql: str, limit: int = 0) -> bytes:
    return parse("", sql) + bind("", "") + execute("", limit)


def _shape(answers: Sequence[list[Message]]) -> Shape:
    return [(b"".join(t for t, _ in a if t not in (b"S", b"N")), rows(a)) for a in answers]


async def _run(raw: Raw, steps: Sequence[Step], end: bytes, readies: int | None) -> Shape:
    """Sends the steps, reads answers until the ReadyForQuery whose answer holds the row
    `end` (direct) or the same number of ReadyForQuery (proxied)."""
    early: list[Message] = []
    for chunk, read in steps:
        raw.send(chunk)
        if read is None:
            await raw.writer.drain()
            await asyncio.sleep(0.02)
        else:
            early.extend([await raw.message(5.0) for _ in range(read)])
    answers: list[list[Message]] = []
    first = True
    while True:
        answer = await raw.until_ready(5.0)
        if first:
            answer, first = early + answer, False
        answers.append(answer)
        if (readies is None and [end] in rows(answer)) or (readies is not None and len(answers) == readies):
            return _shape(answers)


def _tail(table: str, round_: int, last: bool) -> tuple[bytes, bytes]:
    end = b"slow" if last else b"end %d" % round_
    sleep = " FROM pg_sleep(0.1)" if last else ""
    frames = (
        query("SET application_name = 'tail'")
        + query(f"SELECT name FROM {table} WHERE id = 1")
        + query(f"SELECT '{end.decode()}'{sleep}")
    )
    return frames, end


@pytest.fixture
async def world(pg: PgServer, tmp_path: Path) -> AsyncIterator[tuple[CachingProxy, str]]:
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        yield proxy, await make_table(pg, rows=3)


async def compare(
    pg: PgServer, proxy: CachingProxy, table: str, steps: Sequence[Step], rounds: int = 2, together: bool = True
) -> list[Shape]:
    """The pipeline in `rounds` rounds through both; the proxied answers must be the direct
    ones, round by round. `together=False` runs the direct side first (writes take locks)."""
    direct = await Raw.connect(pg.port)
    proxied = await Raw.connect(proxy.port)
    seen = []
    try:
        for r in range(rounds):
            tail, end = _tail(table, r, r == rounds - 1)
            full = [*steps, (tail, None)]
            if together:
                want, got = await asyncio.gather(_run(direct, full, end, None), _run(proxied, full, end, None))
            else:
                want = await _run(direct, full, end, None)
                got = await _run(proxied, full, end, len(want))
            assert got == want, f"round {r}: direct {want} proxied {got}"
            seen.append(got)
    finally:
        await direct.close()
        await proxied.close()
    return seen


def one(*frames: bytes) -> list[Step]:
    return [(b"".join(frames), None)]


async def test_several_queries_inside_one_batch(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    answers = await compare(
        pg,
        proxy,
        table,
        one(
            pbe("SELECT 1"), FLUSH, query("SET application_name = 'a'"), query(read), pbe(read), query("SELECT 2"), SYNC
        ),
    )
    assert answers[-1][-1] == (b"TDCZ", [[b"slow"]])


async def test_describe_close_and_many_rows_before_the_query(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    await compare(
        pg,
        proxy,
        table,
        one(
            parse("s1", f"SELECT name FROM {table} WHERE id = $1"),
            describe_statement("s1"),
            bind("p1", "s1", ("2",)),
            describe_portal("p1"),
            execute("p1"),
            close_statement("s1"),
            pbe("SELECT g, repeat('x', 50) FROM generate_series(1, 500) g"),
            query(f"SELECT name FROM {table} WHERE id = 3"),
            SYNC,
        ),
    )


async def test_row_limit_empty_query_and_copy_before_the_query(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    await compare(
        pg,
        proxy,
        table,
        one(
            pbe("SELECT g FROM generate_series(1, 5) g", limit=2),
            pbe(""),
            pbe("COPY (SELECT g FROM generate_series(1, 500) g) TO STDOUT"),
            FLUSH,
            query("SELECT 'q'"),
            SYNC,
        ),
    )


async def test_an_error_after_the_query_in_the_rest_of_the_batch(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(
        pg, proxy, table, one(pbe(read), query("SET application_name = 'x'"), pbe("SELECT 1/0"), pbe(read), SYNC)
    )


async def test_an_error_before_several_queries(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(
        pg, proxy, table, one(pbe("SELECT 1/0"), query(read), pbe(read), query("SELECT 'skipped'"), pbe(read), SYNC)
    )


async def test_an_error_in_the_query_itself(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(pg, proxy, table, one(pbe(read), FLUSH, query("SELECT 1/0"), pbe(read), query(read), SYNC))


async def test_flush_answers_read_before_the_query(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    # ParseComplete, BindComplete, DataRow, CommandComplete: read before the Query goes.
    await compare(pg, proxy, table, [(pbe(read) + FLUSH, 4), (query(read), None), (pbe(read) + SYNC, None)])


async def test_flush_answers_not_yet_read_separate_packets(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(
        pg,
        proxy,
        table,
        [
            (pbe(read) + FLUSH, None),
            (query(read), None),
            (pbe("SELECT 1/0") + FLUSH, None),
            (query(read), None),
            (SYNC, None),
        ],
    )


async def test_prepare_by_flush_without_execute_then_a_query(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    """asyncpg's prepare (Parse/Describe/Flush), answers read, then a Query, then the
    statement run, then the Sync."""
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = $1"
    steps: list[Step] = [
        (parse("", read) + describe_statement("") + FLUSH, 3),
        (query(f"SELECT name FROM {table} WHERE id = 3"), None),
        (parse("", read) + bind("", "", ("1",)) + execute("") + SYNC, None),
    ]
    await compare(pg, proxy, table, steps)


async def test_begin_and_commit_inside_the_batch(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(
        pg,
        proxy,
        table,
        one(pbe(read), FLUSH, query("BEGIN"), pbe(read), query(read), query("COMMIT"), pbe(read), SYNC),
    )
    await compare(pg, proxy, table, one(pbe(read), query("BEGIN"), pbe(read), SYNC, query(read), query("COMMIT")))


async def test_a_hitable_extended_read_right_after_the_sync(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    # 1 2 D C, then the Query's T D C Z and the Sync's Z: all in before the read goes.
    steps: list[Step] = [(pbe(read) + FLUSH + query(read) + SYNC, 9), (pbe(read) + SYNC, None)]
    await compare(pg, proxy, table, steps, rounds=4)
    assert proxy.totals().get("hit", 0) > 0


@pytest.mark.parametrize("fails", ["query", "before", "after", "none"])
async def test_a_write_in_the_stream_and_another_sessions_read(
    pg: PgServer, world: tuple[CachingProxy, str], fails: str
) -> None:
    """The UPDATE runs at its Execute; the Query commits it (or an error rolls it back).
    Another session's cached read must give what the origin gives afterwards."""
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    other = await asyncpg.connect(**proxy.dsn("trust_user"))
    writer = await Raw.connect(proxy.port)
    try:
        for _ in range(3):
            assert await other.fetchval(read) == "name 2"
        update = pbe(f"UPDATE {table} SET name = 'new {fails}' WHERE id = 2")
        frames = {
            "query": one(update, FLUSH, query("SELECT 1/0"), SYNC),
            "before": one(update, pbe("SELECT 1/0"), query("SELECT 1"), SYNC),
            "after": one(update, query("SELECT 1"), pbe("SELECT 1/0"), SYNC),
            "none": [(update + FLUSH, 3), (query("SELECT 1"), None), (SYNC, None)],
        }[fails]
        tail, end = _tail(table, 0, False)
        await _run(writer, [*frames, (tail, None)], end, None)
        async with pg.superuser_conn() as conn:
            truth = await conn.fetchval(read)
        assert truth == ("name 2" if fails in ("query", "before") else f"new {fails}")
        for _ in range(3):
            assert await other.fetchval(read) == truth
    finally:
        await writer.close()
        await other.close()


async def test_a_failed_prepare_by_flush_then_queries(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    """Parse fails (its Describe is skipped): the Queries after it are skipped to the Sync,
    the SET among them included (SHOW says so), in one packet and with the error read first."""
    proxy, table = world
    bad = parse("", "SELEC nothing") + describe_statement("") + FLUSH
    rest = query("SET application_name = 'skipped'") + query(f"SELECT name FROM {table} WHERE id = 2") + SYNC
    await compare(pg, proxy, table, one(bad, rest, query("SHOW application_name")))
    await compare(pg, proxy, table, [(bad, 1), (rest + query("SHOW application_name"), None)])


async def test_a_good_prepare_by_flush_then_a_query_in_one_packet(
    pg: PgServer, world: tuple[CachingProxy, str]
) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = $1"
    await compare(
        pg,
        proxy,
        table,
        one(
            parse("", read),
            describe_statement(""),
            FLUSH,
            query("SELECT 'q'"),
            parse("", read),
            bind("", "", ("3",)),
            execute(""),
            SYNC,
        ),
    )


async def test_an_error_between_two_queries_skips_only_the_second(
    pg: PgServer, world: tuple[CachingProxy, str]
) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(
        pg,
        proxy,
        table,
        one(
            pbe(read),
            query("SET application_name = 'first'"),
            pbe("SELECT 1/0"),
            query("SET application_name = 'second'"),
            pbe(read),
            SYNC,
            query("SHOW application_name"),
        ),
    )


async def test_multi_statement_empty_and_copy_queries_inside(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(
        pg,
        proxy,
        table,
        one(
            pbe(read),
            query(f"{read}; SELECT 2"),
            pbe(read),
            query(""),
            pbe(read),
            query("COPY (SELECT g FROM generate_series(1, 50) g) TO STDOUT"),
            pbe(read),
            query("SELECT 1; SELECT 1/0; SELECT 3"),
            pbe(read),
            SYNC,
        ),
    )


async def test_a_query_while_many_rows_are_in_flight(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    """The Query is cut into the stream while the Execute's rows still come (not counted)."""
    proxy, table = world
    many = pbe("SELECT g, repeat('y', 100) FROM generate_series(1, 2000) g") + FLUSH
    await compare(
        pg, proxy, table, [(many, None), (query("SELECT 'q'") + pbe("SELECT 2"), None), (SYNC, None)], rounds=1
    )


async def test_a_begin_inside_the_batch_keeps_the_streams_write_until_commit(
    pg: PgServer, world: tuple[CachingProxy, str]
) -> None:
    """UPDATE (Flush), then BEGIN as a Query: the batch's transaction becomes an explicit one
    holding the UPDATE; another session caches the old row meanwhile; COMMIT must evict it."""
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    other = await asyncpg.connect(**proxy.dsn("trust_user"))
    writer = await Raw.connect(proxy.port)
    try:
        writer.send(pbe(f"UPDATE {table} SET name = 'in tx' WHERE id = 2") + FLUSH)
        assert [(await writer.message())[0] for _ in range(3)] == [b"1", b"2", b"C"]
        writer.send(query("BEGIN"))
        assert (await writer.until_ready())[-1] == (b"Z", b"T")
        writer.send(SYNC)
        assert (await writer.until_ready())[-1] == (b"Z", b"T")
        for _ in range(4):
            assert await other.fetchval(read) == "name 2"
        writer.send(query("COMMIT"))
        assert (await writer.until_ready())[-1] == (b"Z", b"I")
        assert await other.fetchval(read) == "in tx"
    finally:
        await writer.close()
        await other.close()


async def test_a_statement_answered_from_the_cache_then_used_in_a_batch_with_a_query(
    pg: PgServer, world: tuple[CachingProxy, str]
) -> None:
    """A named statement whose Parse the cache answered (never sent: neonpoly sends it ahead
    of the next batch using it and swallows its ParseComplete), then Bind/Execute, a Query
    and the Sync: the swallowed answer must not count as one of the stream's."""
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    steps: list[Step] = [
        (parse("s", read) + bind("", "s") + execute("") + SYNC, 5),
        (bind("", "s") + execute("") + query("SELECT 'q'") + SYNC, 8),
        (close_statement("s") + SYNC, None),
    ]
    await compare(pg, proxy, table, steps, rounds=4)
    assert proxy.totals().get("hit", 0) > 0


async def test_a_limited_portal_executed_again_after_the_query(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    """The Query commits the batch's transaction, which closes its portals: the Execute after
    it fails, and the rest is skipped to the Sync."""
    proxy, table = world
    await compare(
        pg,
        proxy,
        table,
        one(
            parse("", "SELECT g FROM generate_series(1, 5) g"),
            bind("p1", ""),
            execute("p1", 2),
            query("SELECT 'between'"),
            execute("p1", 2),
            describe_portal("p1"),
            query("SELECT 'skipped'"),
            SYNC,
        ),
    )


async def test_copy_from_stdin_then_a_query_inside(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    """COPY FROM STDIN at an Execute, its data, then a Query; and with CopyFail (an error:
    the Query, a SET, is skipped to the Sync)."""
    proxy, table = world
    create = query("CREATE TEMP TABLE IF NOT EXISTS c37 (x int)")
    copy = pbe("COPY c37 FROM STDIN")
    done = pgwire.frame(b"d", b"1\n2\n") + pgwire.frame(b"c")
    await compare(pg, proxy, table, one(create, copy, done, query("SELECT count(*) FROM c37"), SYNC))
    failed = pgwire.frame(b"d", b"1\n") + pgwire.frame(b"f", b"nope\x00")
    steps = one(create, copy, failed, query("SET application_name = 'no'"), SYNC, query("SHOW application_name"))
    await compare(pg, proxy, table, steps)


def function_call(oid: int, *args: bytes) -> bytes:
    """A FunctionCall ('F'), text arguments and result."""
    body = struct.pack("!ihh", oid, 0, len(args)) + b"".join(struct.pack("!i", len(a)) + a for a in args)
    return pgwire.frame(b"F", body + struct.pack("!h", 0))


INT4PL = 177  # int4pl(int4, int4): 1 + 2


async def test_a_function_call_inside_a_collected_batch(pg: PgServer, world: tuple[CachingProxy, str]) -> None:
    """Parse/Bind/Execute, FunctionCall, Sync in one packet: the batch's messages go first."""
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    await compare(pg, proxy, table, one(pbe(read), function_call(INT4PL, b"1", b"2"), SYNC), rounds=1, together=False)


async def test_a_function_call_then_a_query_inside_a_streamed_batch(
    pg: PgServer, world: tuple[CachingProxy, str]
) -> None:
    """Its ReadyForQuery is counted: the identity lookup never takes a client's answer."""
    proxy, table = world
    read = f"SELECT name FROM {table} WHERE id = 2"
    steps = one(pbe(read), FLUSH, function_call(INT4PL, b"1", b"2"), query("SELECT 1"), SYNC)
    await compare(pg, proxy, table, steps, rounds=1, together=False)

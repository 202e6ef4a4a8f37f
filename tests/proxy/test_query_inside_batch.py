"""A simple Query sent inside an extended batch, before its Sync.

PostgreSQL runs such a Query in the batch's implicit transaction, commits it and answers
with a ReadyForQuery of its own, and the Sync gets another; unless a message of the batch
failed before it, when it skips the Query unanswered up to the Sync. The proxy must count
those answers exactly: one ReadyForQuery too many or too few puts every later answer against
the wrong request (here: its own identity lookup, sent as soon as nothing seems outstanding,
would take a client's answer and hand the client its own rows).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from neonpoly import pgwire
from tests.adversarial.rawpg import SYNC, Message, Raw, bind, execute, kinds, parse, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import caching_proxy
from tests.proxy.test_cache_hits import make_table

FLUSH = pgwire.frame(b"H")


def _pipeline(table: str, first: str, inside: str) -> bytes:
    """A streamed batch ended by Flush, a Query inside it, its Sync, then a quick read and a
    slow one (the slow one's answer comes in a read of its own, after the quick one's)."""
    return b"".join(
        (
            parse("", first) + bind("", "") + execute("") + FLUSH,
            query(inside),
            SYNC,
            query(f"SELECT name FROM {table} WHERE id = 1"),
            query("SELECT 'slow answer' FROM pg_sleep(0.3)"),
        )
    )


async def _answers(raw: Raw, readies: int) -> list[list[Message]]:
    return [await raw.until_ready() for _ in range(readies)]


Shape = list[tuple[bytes, list[list[bytes | None]]]]


def _shape(answers: list[list[Message]]) -> Shape:
    # ParameterStatus and notices aside (the proxy and the server send the same ones, but a
    # direct connection has other parameters to report than a proxied one).
    return [(bytes(k for k in kinds(a) if k not in b"SN"), rows(a)) for a in answers]


async def _through_both(pg: PgServer, port: int, pipeline: bytes, readies: int) -> tuple[Shape, Shape]:
    direct = await Raw.connect(pg.port)
    proxied = await Raw.connect(port)
    try:
        direct.send(pipeline)
        proxied.send(pipeline)
        return _shape(await _answers(direct, readies)), _shape(await _answers(proxied, readies))
    finally:
        await direct.close()
        await proxied.close()


async def test_a_query_inside_a_streamed_batch_has_its_own_ready_for_query(pg: PgServer, tmp_path: Path) -> None:
    """No error: the Query's ReadyForQuery and the Sync's are both counted, so the identity
    lookup the SET calls for waits until the slow read is answered, and every answer is the
    client's (before the fix the Sync's ReadyForQuery ended the quick read's request, the
    lookup went out behind the slow read and took its answer)."""
    table = await make_table(pg)
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        pipeline = _pipeline(table, "SELECT 1", "SET application_name = 'inside a batch'")
        # Four ReadyForQuery: the Query's, the Sync's, the quick read's, the slow read's.
        direct, proxied = await _through_both(pg, proxy.port, pipeline, 4)
        assert proxied == direct
        assert proxied[-1] == (b"TDCZ", [[b"slow answer"]])


async def test_a_query_after_a_failed_message_of_its_batch_is_skipped_to_the_sync(pg: PgServer, tmp_path: Path) -> None:
    """An error before it: the server skips the Query (no answer at all) up to the Sync, whose
    ReadyForQuery then ends the batch; the requests after it are answered as their own."""
    table = await make_table(pg)
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        pipeline = _pipeline(table, "SELECT 1/0", "SET application_name = 'never run'")
        direct, proxied = await _through_both(pg, proxy.port, pipeline, 3)
        assert proxied == direct
        assert [k for k, _ in proxied] == [b"1EZ", b"TDCZ", b"TDCZ"]  # 1/0 fails at its Bind


async def test_a_write_in_a_streamed_batch_is_evicted_again_when_the_query_inside_commits_it(
    pg: PgServer, tmp_path: Path
) -> None:
    """The UPDATE runs (uncommitted) at its Execute; the Query after it commits it when it
    ends, held here on an advisory lock another connection keeps. A read another session
    caches while that Query waits sees the old row and must not outlive that commit."""
    table = await make_table(pg)
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        writer = await Raw.connect(proxy.port)
        other = await asyncpg.connect(**proxy.dsn("trust_user"))
        locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
        await locker.execute("SELECT pg_advisory_lock(424242)")
        read = f"SELECT name FROM {table} WHERE id = 2"
        try:
            writer.send(parse("", f"UPDATE {table} SET name = 'committed' WHERE id = 2") + bind("", "") + execute(""))
            writer.send(FLUSH)
            assert [(await writer.message())[0] for _ in range(3)] == [b"1", b"2", b"C"]
            writer.send(query("SELECT pg_advisory_xact_lock(424242)"), SYNC)
            hits = proxy.totals().get("hit", 0)
            for _ in range(4):  # while it waits: stored, then served (the UPDATE is not committed)
                assert await other.fetchval(read) == "name 2"
            assert proxy.totals().get("hit", 0) > hits  # the old row was served from the cache
            await locker.execute("SELECT pg_advisory_unlock(424242)")  # the Query ends: the commit
            assert kinds(await writer.until_ready()) == b"TDCZ"
            assert kinds(await writer.until_ready()) == b"Z"
            assert await other.fetchval(read) == "committed"
        finally:
            await locker.close()
            await other.close()
            await writer.close()

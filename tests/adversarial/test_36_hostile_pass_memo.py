"""Hostile review of the pass memo (proxy/passes.py): a bypassed simple read of the session's
last slot (the text around its one trailing number) is passed to the origin without being
decided again. Each case first proves the decision (the template bypassed, the read passed
from the memo: the full path did not see its text) and compares every answer with a direct
connection's: texts whose other digits could change what they are, requests pipelined behind
and ahead of a memo-passed read still outstanding (writes, errors, transactions), a write
left open by a Flush that the next simple Query commits, a notification and a cancel during
a memo-passed read, and clients leaving with a memo-passed read or a write outstanding
(their origin connections end with the backend)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from neonpoly import pgwire
from neonpoly.cache import policy
from neonpoly.proxy.passes import ReadPasses
from neonpoly.proxy.session import Session, _OriginDrain
from tests.adversarial.batch_memo import FLUSH
from tests.adversarial.rawpg import SYNC, Raw, bind, execute, parse, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table
from tests.proxy.test_lookup_bypass import Spied
from tests.proxy.test_pass_memo import _decided

pytestmark = pytest.mark.skipif(
    __import__("os").environ.get("NEONPOLY_TEST_WORKERS", "1") not in ("", "1"),
    reason="sets the in-process cache's bypass window",
)

drained: list[bool] = []  # what each ended session's `_drain_origin` said (True: drained)
drain_ends: list[None] = []  # one per drained origin connection the proxy saw close (its last eviction)
Answer = list[tuple[bytes, list[list[bytes | None]]]]


def _answer(msgs: list[tuple[bytes, bytes]]) -> tuple[bytes, list[list[bytes | None]]]:
    """Message kinds (without the ones a proxy may legitimately add or drop) and rows."""
    return b"".join(t for t, _ in msgs if t not in b"NS"), rows(msgs)


@contextlib.asynccontextmanager
async def memo_world(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[CachingProxy, Spied, list[str], str, Raw]]:
    """A proxy whose cache bypasses after 4 misses (no probes), a table of 40 rows, and a raw
    client whose slot `SELECT name FROM t WHERE id = N` is passed from its memo from now on."""
    async with caching_proxy(pg, tmp_path / "cache") as proxy:
        spied = Spied(proxy, monkeypatch, window=4, probe_every=1000)
        table = await make_table(pg, rows=40)
        decided = _decided(monkeypatch)
        full = ReadPasses._pass_by_memo

        def spied_pass(self: ReadPasses, data: bytes) -> bool:
            done = full(self, data)
            if done:
                self.last_memo_pass = data  # type: ignore[attr-defined]
            return done

        monkeypatch.setattr(ReadPasses, "_pass_by_memo", spied_pass)
        drain = Session._drain_origin

        def spied_drain(self: Session, origin: asyncio.Transport) -> bool:
            kept = drain(self, origin)
            drained.append(kept)
            return kept

        monkeypatch.setattr(Session, "_drain_origin", spied_drain)
        drain_lost = _OriginDrain.connection_lost

        def spied_drain_lost(self: _OriginDrain, exc: Exception | None) -> None:
            drain_lost(self, exc)
            drain_ends.append(None)

        monkeypatch.setattr(_OriginDrain, "connection_lost", spied_drain_lost)
        raw = await Raw.connect(proxy.port)
        try:
            for key in range(1, 6):  # 4 misses bypass it; the 5th is passed and makes the memo
                raw.send(query(f"SELECT name FROM {table} WHERE id = {key}"))
                assert rows(await raw.until_ready()) == [[f"name {key}".encode()]]
            assert raw_session(proxy).pass_memo is not None
            yield proxy, spied, decided, table, raw
        finally:
            await raw.close()


def memo_passed(session: Session, digits: bytes) -> bool:
    """Whether the session's last memo-passed Query ended with these bytes."""
    return bool(getattr(session, "last_memo_pass", b"").endswith(digits + b"\x00"))


def raw_session(proxy: CachingProxy) -> Session:
    (session,) = [s for s in proxy.service.server.sessions if s.pass_memo is not None]
    return session


async def _twin(pg: PgServer, table: str) -> str:
    twin = table + "_direct"
    async with pg.superuser_conn() as conn:
        await conn.execute(f"CREATE TABLE {twin} (LIKE {table} INCLUDING ALL)")
        await conn.execute(f"INSERT INTO {twin} SELECT * FROM {table}")
        await conn.execute(f"GRANT ALL ON {twin} TO trust_user")
    return twin


async def _wait_passed(spied: Spied, before: int) -> None:
    for _ in range(200):
        if spied.cache.bypass.passed > before:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the read was not passed")


def test_other_digits_in_a_slot_never_change_what_the_text_is() -> None:
    """Every text of a slot classifies as the slot's text does (template, tables, effects,
    cacheability); texts where digits are not one plain trailing number have no slot."""
    slotted = [
        "SELECT name FROM t1 WHERE id = 5",
        "SELECT name FROM users_2024 WHERE id = 5 ;; ",
        "SELECT name FROM t WHERE id = - 5",
        "SELECT name FROM t ORDER BY id LIMIT 5",
        "SELECT name FROM t ORDER BY id OFFSET 5;",
        "SELECT name FROM t -- note\n WHERE id >= 5",
        "SELECT name FROM t /* c */ WHERE id=5\n",
        "SELECT a.name FROM t a, t b WHERE a.id = b.id AND a.id < 5",
    ]
    maybe = [  # a slot or not: when one, the same check
        "SELECT name FROM t; SELECT name FROM t WHERE id = 5",
        "SELECT name FROM t WHERE id = 5;;",
        "SELECT name FROM t LIMIT ALL OFFSET 5",
        "SELECT name FROM t WHERE id = +5",
        "SELECT name FROM t WHERE id = ~5",
        "SELECT name FROM t WHERE id =-5",
        "SELECT name FROM t WHERE id = #5",
        "SELECT name FROM t WHERE id = @5",
        "SELECT name FROM t WHERE id = !5",
        "SELECT name FROM t WHERE id = (5",
        "SELECT name FROM t -- 5",
        "SELECT name FROM t WHERE id = /* */ 5",
        "SELECT name FROM t WHERE id = 5\x0b",
        "SELECT count(*) FROM t GROUP BY 5",
        "SELECT name, id FROM t ORDER BY 5",
        "TABLE t LIMIT 5",
        "VALUES (1) LIMIT 5",
        "EXECUTE p5",
        "FETCH 5",
        "MOVE 5",
        "SELECT name FROM t WHERE id = 5 ; SELECT pg_sleep(0) WHERE false OR 5",
    ]
    for sql in slotted + maybe:
        slot = policy.number_slot(sql)
        if slot is None:
            assert sql not in slotted, sql
            continue
        base = policy.classify(sql)
        for digits in ("0", "00", "7", "65536", "2147483648", "999999999999999999"):
            other = policy.classify(slot[0] + digits + slot[1])
            assert (other.template_id, other.tables_read, other.has_effects, other.cacheable) == (
                base.template_id, base.tables_read, base.has_effects, base.cacheable
            ), (sql, digits)  # fmt: skip
    unslotted = [
        "SELECT name FROM t WHERE id = 1e5",
        "SELECT name FROM t WHERE id = 1.5",
        "SELECT name FROM t WHERE id = 5::int4",
        "SELECT name FROM t WHERE id = '5'",
        "SELECT name FROM t WHERE id = $1",
        "SELECT name FROM t WHERE id = 5 /* 5 */",
        "SELECT name FROM t WHERE id = \uff15",  # a full-width digit: a letter to PostgreSQL
        "SELECT name FROM t WHERE id = 1 OR id = 5",
        "SELECT name FROM t WHERE id = 0x5",
        'SELECT name FROM "t 1" WHERE id = 5',
        "SELECT name FROM t WHERE id = 5 FOR UPDATE",
    ]
    for sql in unslotted:
        slot = policy.number_slot(sql)
        assert slot is None or not slot[0].rstrip().endswith(("1", "e", ".", ":", "x")), sql


async def test_requests_pipelined_behind_a_memo_passed_read_are_answered_in_order_and_fresh(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memo-passed read held by a lock; behind it, each in its own packet: a write of the
    row it reads, the slot again, an error, a transaction writing and reading, its commit.
    The same requests on a direct connection (a twin table) give the same answers."""
    async with memo_world(pg, tmp_path, monkeypatch) as (_proxy, spied, decided, table, raw):
        twin = await _twin(pg, table)
        script = [
            "SELECT id, name FROM {t} WHERE id = 39",  # a hit: answerable at once, yet after
            "UPDATE {t} SET name = 'w20' WHERE id = 20",
            "SELECT id, name FROM {t} WHERE id = 39",
            "SELECT name FROM {t} WHERE id = 20",
            "SELECT 1/0",
            "SELECT name FROM {t} WHERE id = 21",
            "BEGIN",
            "UPDATE {t} SET name = 'w21' WHERE id = 21",
            "SELECT name FROM {t} WHERE id = 21",
            "COMMIT",
            "SELECT name FROM {t} WHERE id = 21",
            "SELECT name FROM {t} WHERE id = 22",
        ]
        direct = await Raw.connect(pg.port)
        locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            expected: Answer = []
            for sql in ["SELECT name FROM {t} WHERE id = 20", *script]:
                direct.send(query(sql.format(t=twin)))
                expected.append(_answer(await direct.until_ready()))
            for _ in range(3):  # stored, then a hit
                raw.send(query(f"SELECT id, name FROM {table} WHERE id = 39"))
                assert rows(await raw.until_ready()) == [[b"39", b"name 39"]]
            raw.send(query(f"SELECT name FROM {table} WHERE id = 19"))  # the memo again
            await raw.until_ready()
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            seen, passed = len(decided), spied.cache.bypass.passed
            raw.send(query(f"SELECT name FROM {table} WHERE id = 20"))
            await _wait_passed(spied, passed)
            assert len(decided) == seen  # passed from the memo, its answer outstanding
            for sql in script:
                raw.send(query(sql.format(t=table)))
                await raw.writer.drain()
                await asyncio.sleep(0.005)  # each in its own read of the proxy
            await tx.rollback()
            got = [_answer(await raw.until_ready()) for _ in range(len(script) + 1)]
            assert got == expected
            # Fresh afterwards too, and from the memo again once the session is idle.
            raw.send(query(f"SELECT name FROM {table} WHERE id = 21"))
            assert rows(await raw.until_ready()) == [[b"w21"]]
            counted = spied.statuses(f"SELECT name FROM {table} WHERE id =")
            # Each read counted once: 5 to make the memo, 19, the memo's, 5 behind it, the last.
            assert sum(counted.values()) == 13 and counted["miss"] >= 8
        finally:
            await locker.close()
            await direct.close()


async def test_a_write_left_open_by_a_flush_and_committed_by_a_slot_read_is_evicted(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parse/Bind/Execute of an UPDATE then Flush (no Sync) leaves the write uncommitted in
    the origin's implicit transaction; the next simple Query (the memo's slot) commits it.
    Another session's read cached in between must not outlive that commit."""
    async with memo_world(pg, tmp_path, monkeypatch) as (proxy, _spied, _decided_texts, table, raw):
        raw.send(query(f"SELECT name FROM {table} WHERE id = 29"))
        assert rows(await raw.until_ready()) == [[b"name 29"]]
        assert memo_passed(raw_session(proxy), b"= 29")
        other = await Raw.connect(proxy.port)
        direct = await asyncpg.connect(**pg.dsn("postgres", "app"))
        cached = f"SELECT id, name FROM {table} WHERE id = 30"
        try:
            for _ in range(3):  # stored at its 2nd sighting, a hit at its 3rd
                other.send(query(cached))
                assert rows(await other.until_ready()) == [[b"30", b"name 30"]]
            raw.send(
                parse("", f"UPDATE {table} SET name = 'flushed' WHERE id = 30"),
                bind("", ""),
                execute(""),
                FLUSH,
            )
            for kind in (b"1", b"2", b"C"):
                assert (await raw.message())[0] == kind
            for _ in range(3):  # uncommitted: the old row, from the origin, maybe stored again
                other.send(query(cached))
                assert rows(await other.until_ready()) == [[b"30", b"name 30"]]
            raw.send(query(f"SELECT name FROM {table} WHERE id = 31"))  # commits the UPDATE
            assert rows(await raw.until_ready()) == [[b"name 31"]]
            assert not memo_passed(raw_session(proxy), b"= 31")  # the batch is open: not from the memo
            assert await direct.fetchval(f"SELECT name FROM {table} WHERE id = 30") == "flushed"
            other.send(query(cached))
            assert rows(await other.until_ready()) == [[b"30", b"flushed"]]
        finally:
            await direct.close()
            await other.close()


async def test_a_notification_and_a_cancel_during_a_memo_passed_read(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOTIFY delivered with a memo-passed read's answer reaches the client with it; a
    CancelRequest for a memo-passed read stops it (57014) and the next read is right."""
    async with memo_world(pg, tmp_path, monkeypatch) as (proxy, spied, decided, table, raw):
        raw.send(query("LISTEN hostile36"))
        await raw.until_ready()
        for key in (6, 7):  # the LISTEN took the full path: the slot's memo again
            raw.send(query(f"SELECT name FROM {table} WHERE id = {key}"))
            await raw.until_ready()
        notifier = await asyncpg.connect(**pg.dsn("postgres", "app"))
        locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            seen, passed = len(decided), spied.cache.bypass.passed
            raw.send(query(f"SELECT name FROM {table} WHERE id = 8"))
            await _wait_passed(spied, passed)
            assert len(decided) == seen
            await notifier.execute("NOTIFY hostile36, 'during'")
            await tx.rollback()
            msgs = await raw.until_ready()
            assert rows(msgs) == [[b"name 8"]]
            # Sent to a listener between statements: with this answer or the next.
            raw.send(query(f"SELECT name FROM {table} WHERE id = 9"))
            msgs += await raw.until_ready()
            notes = [body for t, body in msgs if t == b"A"]
            assert len(notes) == 1 and b"during" in notes[0]
            assert rows(msgs)[-1] == [b"name 9"]
            # The cancel: a memo-passed read held by a lock, cancelled by its key.
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            seen, passed = len(decided), spied.cache.bypass.passed
            raw.send(query(f"SELECT name FROM {table} WHERE id = 10"))
            await _wait_passed(spied, passed)
            assert len(decided) == seen
            session = raw_session(proxy)
            pid, secret = session.proxy_key
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(pgwire.cancel_request(pid, secret))
            await writer.drain()
            msgs = await raw.until_ready()
            errors = [pgwire.parse_error_fields(body).get("C") for t, body in msgs if t == b"E"]
            assert errors == ["57014"] and not rows(msgs)
            await tx.rollback()
            writer.close()
            raw.send(query(f"SELECT name FROM {table} WHERE id = 11"))
            assert rows(await raw.until_ready()) == [[b"name 11"]]
        finally:
            await notifier.close()
            await locker.close()


async def _backends(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'trust_user'"))


async def test_clients_leaving_with_memo_passed_reads_or_writes_outstanding_leave_nothing(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients gone at once, some with a memo-passed read outstanding (no drain: closed at
    once), some with a write outstanding that commits after they left (drained until the
    backend ends): a read stored again meanwhile does not outlive the commits, and every
    origin connection ends with its backend."""
    async with memo_world(pg, tmp_path, monkeypatch) as (proxy, spied, decided, table, raw):
        written = await make_table(pg, rows=40)
        watcher = await asyncpg.connect(**pg.dsn("postgres", "app"))
        locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
        cached = f"SELECT id, name FROM {written} WHERE id = 35"
        try:
            baseline = await _backends(watcher)
            for _ in range(3):
                raw.send(query(cached))
                assert rows(await raw.until_ready()) == [[b"35", b"name 35"]]
            leavers = [await Raw.connect(proxy.port) for _ in range(6)]
            for client in leavers[::2]:  # the slot's memo of its own
                client.send(query(f"SELECT name FROM {table} WHERE id = 12"))
                assert rows(await client.until_ready()) == [[b"name 12"]]
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # holds the reads
            await locker.execute(f"SELECT 1 FROM {written} WHERE id = 35 FOR UPDATE")  # holds the writes
            seen, passed = len(decided), spied.cache.bypass.passed
            for n, client in enumerate(leavers):
                if n % 2:
                    client.send(query(f"UPDATE {written} SET name = 'gone {n}' WHERE id = 35"))
                else:
                    client.send(query(f"SELECT name FROM {table} WHERE id = 13"))
            for _ in range(500):  # the proxy has read all six (not a fixed sleep: a loaded machine)
                if spied.cache.bypass.passed >= passed + 3 and len(decided) >= seen + 3:
                    break
                await asyncio.sleep(0.01)
            assert spied.cache.bypass.passed == passed + 3
            assert len(decided) == seen + 3  # the writes: the reads were passed from their memos
            del drained[:], drain_ends[:]
            for client in leavers:
                client.writer.close()  # gone without a Terminate, all at once
            for _ in range(500):  # the proxy has seen all six leave (the writers' drains begun)
                if len(proxy.service.server.sessions) == 1:
                    break
                await asyncio.sleep(0.01)
            assert sorted(drained) == [False, False, False, True, True, True]
            for _ in range(3):  # the old row (the writes wait), stored again
                raw.send(query(cached))
                assert rows(await raw.until_ready()) == [[b"35", b"name 35"]]
            await tx.rollback()  # the writes commit now, their clients gone
            for _ in range(200):
                if await _backends(watcher) == baseline:
                    break
                await asyncio.sleep(0.02)
            assert await _backends(watcher) == baseline
            # A backend leaves pg_stat_activity before it closes its socket, and the proxy's
            # last eviction comes with that close: wait for the proxy's side of all three.
            for _ in range(500):
                if len(drain_ends) == 3:
                    break
                await asyncio.sleep(0.01)
            assert len(drain_ends) == 3
            final = await watcher.fetchval(f"SELECT name FROM {written} WHERE id = 35")
            assert final.startswith("gone ")
            raw.send(query(cached))
            assert rows(await raw.until_ready()) == [[b"35", final.encode()]]
            assert len(proxy.service.server.sessions) == 1
        finally:
            await locker.close()
            await watcher.close()


async def test_a_client_gone_in_the_middle_of_copy_from_stdin_leaves_no_backend(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone while its COPY FROM STDIN (a write) waits for data: the origin
    connection is drained (the write is outstanding), and its backend must end at once, as it
    does when the connection closes, not wait for data that never comes."""
    async with memo_world(pg, tmp_path, monkeypatch) as (proxy, _spied, _texts, table, _raw):
        watcher = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            baseline = await _backends(watcher)
            client = await Raw.connect(proxy.port)
            client.send(query(f"COPY {table} FROM STDIN"))
            assert (await client.message())[0] == b"G"
            client.send(pgwire.frame(b"d", b"100\tcopied\n"))
            await client.writer.drain()
            await asyncio.sleep(0.05)
            del drained[:]
            client.writer.close()  # gone without a Terminate
            for _ in range(100):
                if await _backends(watcher) == baseline:
                    break
                await asyncio.sleep(0.02)
            assert await _backends(watcher) == baseline
            assert await watcher.fetchval(f"SELECT count(*) FROM {table} WHERE id = 100") == 0
            assert drained == [True]  # its origin connection was left to the backend
        finally:
            await watcher.close()


async def test_a_client_gone_after_a_failed_write_in_a_flushed_batch_leaves_no_backend(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write sent with Flush (no Sync) fails; the backend now skips every message up to a
    Sync, a Terminate too. The client gone then, its backend must still end at once."""
    async with memo_world(pg, tmp_path, monkeypatch) as (proxy, _spied, _texts, table, _raw):
        watcher = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            baseline = await _backends(watcher)
            client = await Raw.connect(proxy.port)
            client.send(parse("", f"UPDATE {table} SET name = 'x' WHERE id = 1/0"), bind("", ""), execute(""), FLUSH)
            kinds = b""
            while not kinds.endswith(b"E"):
                kinds += (await client.message())[0]
            del drained[:]
            client.writer.close()  # gone without a Terminate
            for _ in range(100):
                if await _backends(watcher) == baseline:
                    break
                await asyncio.sleep(0.02)
            assert await _backends(watcher) == baseline
            assert drained == [True]  # its origin connection was left to the backend
        finally:
            await watcher.close()


async def _through(raw: Raw, readies: int) -> list[tuple[bytes, list[list[bytes | None]]]]:
    return [_answer(await raw.until_ready()) for _ in range(readies)]


async def test_extended_batches_and_settings_pipelined_behind_a_memo_passed_read(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a memo-passed read held by a lock, each in its own packet: a write with Flush
    (no Sync), a simple read of the slot (which commits the write), its Sync, a SET, a failing
    extended read and the slot again: the same answers as a direct connection's."""
    async with memo_world(pg, tmp_path, monkeypatch) as (_proxy, spied, decided, table, raw):
        twin = await _twin(pg, table)

        def script(t: str) -> list[bytes]:
            return [
                parse("", f"UPDATE {t} SET name = 'ext' WHERE id = 24") + bind("", "") + execute("") + FLUSH,
                query(f"SELECT name FROM {t} WHERE id = 24"),
                SYNC,
                query("SET application_name = 'hostile36'"),
                parse("", "SELECT 1/0") + bind("", "") + execute("") + SYNC,
                query(f"SELECT name FROM {t} WHERE id = 24"),
                parse("", f"SELECT name FROM {t} WHERE id = 25") + bind("", "") + execute("") + SYNC,
            ]

        readies = 7  # the held read, then each frame group but the Flushed one
        direct = await Raw.connect(pg.port)
        locker = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            direct.send(query(f"SELECT name FROM {twin} WHERE id = 23"))
            for frames in script(twin):
                direct.send(frames)
            expected = await _through(direct, readies)
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            seen, passed = len(decided), spied.cache.bypass.passed
            raw.send(query(f"SELECT name FROM {table} WHERE id = 23"))
            await _wait_passed(spied, passed)
            assert len(decided) == seen  # passed from the memo, its answer outstanding
            for frames in script(table):
                raw.send(frames)
                await raw.writer.drain()
                await asyncio.sleep(0.005)
            await tx.rollback()
            assert await _through(raw, readies) == expected
            raw.send(query(f"SELECT name FROM {table} WHERE id = 24"))
            assert rows(await raw.until_ready()) == [[b"ext"]]
        finally:
            await locker.close()
            await direct.close()

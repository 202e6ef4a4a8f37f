"""Hostile review of the lone-batch fast paths (proxy/batches.py): a bypassed lone batch
relayed with no `Pending` (`_pass_lone`: one request in `inflight`, queued by
`_queue_passed` when the client sends more), and a lone batch's first hit from its shape's
memo remembered with the entry it was served (`_lone_hit`: its first repeat asks `serves`).

Each case proves the fast path was taken (the passed batch counted by a spy on `_pass_lone`,
or the hit counter) and compares every answer with a direct connection's: requests
pipelined behind a passed batch still outstanding (hits, writes, errors, a transaction
opened and written by batches, probes that end the bypass), a notification, a cancel and a
client gone during a passed batch; and between a remembered first hit and its repeat: a
write through another session, PURGE, a NEVER rule, DISCARD ALL, a SET, a statement closed
and parsed again with another text, Describe-only and row-limited batches, TTL expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from neonpoly import pgwire
from neonpoly.proxy.session import Session
from tests.adversarial import rawpg
from tests.adversarial.batch_memo import lone, parse
from tests.adversarial.harness import Env, unique
from tests.adversarial.lone_batches import (
    INT4,
    admin_console,
    answers_of,
    bypass_world,
    first_hit,
    held_pass,
    in_process,
    norm,
    raw_pair,
    same,
    tx,
)
from tests.adversarial.rawpg import SYNC, Raw, describe_portal, query, rows
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy


def _script(t: str) -> list[bytes]:
    """Requests pipelined behind a passed batch: hits, the bypassed statement, a write of the
    row they read, an error, a transaction begun, written and read by batches, its commit."""
    return [
        lone("h", b"39"),
        query(f"UPDATE {t} SET name = 'w20' WHERE id = 20"),
        lone("s", b"20"),
        lone("h", b"20"),
        lone("s", b"x"),  # 22P02: the Bind fails, the origin skips to the Sync
        lone("h", b"39"),
        lone("s", b"21"),
        tx("BEGIN"),
        lone("h", b"21"),
        tx(f"UPDATE {t} SET name = 'w21' WHERE id = 21"),
        lone("s", b"21"),
        lone("h", b"21"),
        lone("h", b"39"),
        query("COMMIT"),
        lone("h", b"21"),
        lone("s", b"21"),
        lone("h", b"39"),
    ]


@in_process
@pytest.mark.parametrize("one_write", [False, True], ids=["write-per-request", "one-write"])
async def test_requests_pipelined_behind_a_passed_lone_batch(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_write: bool
) -> None:
    """A passed lone batch held by a lock; behind it (each request in its own write, or all
    in one) hits, writes, an error and a transaction: the direct connection's answers."""
    async with bypass_world(pg, tmp_path, monkeypatch) as (_proxy, _spied, passed, table, twin, via, direct):
        for key in (b"20", b"21"):  # h(20), h(21) stored and hit before anything is written
            for _ in range(3):
                via.send(lone("h", key))
                await via.until_ready()
        direct.send(lone("s", b"19"), *_script(twin))
        expected = await answers_of(direct, len(_script(twin)) + 1)
        locker = await held_pass(pg, table, via, passed, b"19")
        try:
            if one_write:
                via.send(*_script(table))
            else:
                for frames in _script(table):
                    via.send(frames)
                    await via.writer.drain()
                    await asyncio.sleep(0.003)  # each in its own read of the proxy
            await asyncio.sleep(0.02)
        finally:
            await locker.execute("ROLLBACK")
            await locker.close()
        assert await answers_of(via, len(expected)) == expected
        # Idle again: the fast paths answer what the origin says.
        for frames in (lone("h", b"21"), lone("s", b"20"), lone("h", b"39")):
            via.send(frames)
            direct.send(frames)
            assert norm(await via.until_ready()) == norm(await direct.until_ready())


@in_process
async def test_probes_and_hits_ending_the_bypass_mid_pipeline(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe every 3rd read of s: behind passed batches, probes store keys, hits end the
    bypass, writes evict, all pipelined (no answer awaited): the origin's answers, in order."""
    async with bypass_world(pg, tmp_path, monkeypatch, probe_every=3) as world:
        _proxy, _spied, passed, table, twin, via, direct = world

        def script(t: str) -> list[bytes]:
            out: list[bytes] = []
            for n in range(24):
                key = str(7 + n % 3).encode()  # three keys over and over: stored by probes, then hit
                out.append(lone("s", key))
                if n % 7 == 6:
                    out.append(query(f"UPDATE {t} SET name = name || '+' WHERE id = {key.decode()}"))
                if n % 5 == 4:
                    out.append(lone("h", key))
            return out

        direct.send(*script(twin))
        expected = await answers_of(direct, len(script(twin)))
        before = len(passed)
        for frames in script(table):
            via.send(frames)
            await via.writer.drain()
            await asyncio.sleep(0.001)
        assert await answers_of(via, len(expected)) == expected
        for key in (b"7", b"8", b"9"):
            for name in ("s", "h"):
                via.send(lone(name, key))
                direct.send(lone(name, key))
                assert norm(await via.until_ready()) == norm(await direct.until_ready())
        assert len(passed) > before  # some of them were passed with no Pending


@in_process
async def test_a_notification_a_cancel_and_a_client_gone_during_a_passed_lone_batch(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOTIFY arriving while a passed batch waits reaches the client (with it or the next
    answer), no lookup of neonpoly's own is sent ahead of the batch's answer; a cancel stops
    a passed batch (57014); a client gone with one outstanding leaves the proxy with no
    session and the next session's answers right."""
    async with bypass_world(pg, tmp_path, monkeypatch) as (proxy, _spied, passed, table, twin, via, direct):
        via.send(query("LISTEN hostile39"))
        await via.until_ready()
        (session,) = [s for s in proxy.service.server.sessions if s.batch_memos]
        session.relations_wanted.add(f"public.{twin}")  # something to learn when idle
        session._forget_identity()  # and who it is: asked at the next idle moment
        via.send(lone("s", b"2"))  # asks (the identity lookup after its answer)
        assert rows(await via.until_ready()) == [[b"name 2"]]
        for _ in range(100):
            if session.state.identity is not None:
                break
            await asyncio.sleep(0.01)
        for key in (b"3", b"4"):
            via.send(lone("s", key))
            assert rows(await via.until_ready()) == [[b"name " + key]]
        notifier = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            locker = await held_pass(pg, table, via, passed, b"10")
            session.relations_wanted.add(f"public.{unique('adv_unknown')}")  # asked only after the answer
            await notifier.execute("NOTIFY hostile39, 'during'")
            await asyncio.sleep(0.05)
            await locker.execute("ROLLBACK")
            await locker.close()
            msgs = await via.until_ready()
            assert rows(msgs) == [[b"name 10"]] and b"".join(t for t, _ in msgs if t not in b"NSA") == b"2TDCZ"
            via.send(lone("h", b"39"))
            msgs += await via.until_ready()
            assert rows(msgs)[-1] == [b"39", b"name 39"]
            notes = [body for t, body in msgs if t == b"A"]
            assert len(notes) == 1 and b"during" in notes[0]
            # A passed answer too large for one read: nothing of neonpoly's own is sent
            # between its reads (the session is not idle until its ReadyForQuery).
            via.send(parse("b", f"SELECT repeat(name, 30000) FROM {table} WHERE id = $1", (INT4,)), SYNC)
            await via.until_ready()
            for n in range(1, 7):
                via.send(lone("b", str(n).encode()))
                await via.until_ready()
            locker = await held_pass(pg, table, via, passed, b"7", "b")
            session.relations_wanted.add(f"public.{unique('adv_unknown')}")  # not known: asked
            await locker.execute("ROLLBACK")
            await locker.close()
            msgs = await via.until_ready()
            assert rows(msgs) == [[b"name 7" * 30000]] and b"".join(t for t, _ in msgs if t not in b"NS") == b"2TDCZ"
            # The cancel.
            for key in (b"5", b"6"):  # the relations asked above: passed again
                via.send(lone("s", key))
                await via.until_ready()
            locker = await held_pass(pg, table, via, passed, b"11")
            pid, secret = session.proxy_key
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(pgwire.cancel_request(pid, secret))
            await writer.drain()
            msgs = await via.until_ready()
            await locker.execute("ROLLBACK")
            await locker.close()
            writer.close()
            errors = [pgwire.parse_error_fields(body).get("C") for t, body in msgs if t == b"E"]
            assert errors == ["57014"] and not rows(msgs)
            for frames in (lone("s", b"12"), lone("h", b"39"), lone("s", b"x"), lone("h", b"39")):
                via.send(frames)
                direct.send(frames)
                assert norm(await via.until_ready()) == norm(await direct.until_ready())
            # A client gone with a passed batch outstanding.
            locker = await held_pass(pg, table, via, passed, b"13")
            via.writer.close()
            await asyncio.sleep(0.05)
            await locker.execute("ROLLBACK")
            await locker.close()
            for _ in range(100):
                if session.closed:
                    break
                await asyncio.sleep(0.01)
            assert session.closed
            other = await Raw.connect(proxy.port)
            other.send(parse("h", f"SELECT id, name FROM {table} WHERE id = $1", (INT4,)), SYNC)
            await other.until_ready()
            for _ in range(3):
                other.send(lone("h", b"39"))
                assert rows(await other.until_ready()) == [[b"39", b"name 39"]]
            await other.close()
        finally:
            await notifier.close()


@in_process
async def test_copy_and_describe_only_batches_behind_a_passed_lone_batch(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a passed batch: COPY TO STDOUT by a batch, a Describe-only batch of h, a
    row-limited Execute (PortalSuspended), Close and Parse of h with another text, then h."""
    async with bypass_world(pg, tmp_path, monkeypatch) as (_proxy, _spied, passed, table, twin, via, direct):

        def script(t: str) -> list[bytes]:
            many = f"SELECT id FROM {t} WHERE id <= $1 ORDER BY id"
            return [
                tx(f"COPY (SELECT id, name FROM {t} WHERE id <= 3 ORDER BY id) TO STDOUT"),
                rawpg.bind("", "h", ("39",)) + describe_portal("") + SYNC,
                lone("h", b"39"),
                parse("m", many, (INT4,)) + SYNC,
                lone("m", b"5", rows=2),
                lone("m", b"5", rows=2),
                rawpg.close_statement("h") + parse("h", f"SELECT name, id FROM {t} WHERE id = $1", (INT4,)) + SYNC,
                lone("h", b"39"),
                lone("h", b"39"),
            ]

        direct.send(lone("s", b"30"), *script(twin))
        expected = await answers_of(direct, len(script(twin)) + 1)
        await _sent_behind_a_held_pass(pg, table, via, passed, b"30", "s", script(table))
        assert await answers_of(via, len(expected)) == expected
        for _ in range(3):  # the new h and the limited m, hit once idle: still the origin's
            for frames in (
                lone("h", b"38"),
                lone("m", b"5", rows=2),
                rawpg.bind("", "m", ("4",)) + describe_portal() + SYNC,
            ):
                via.send(frames)
                direct.send(frames)
                assert norm(await via.until_ready()) == norm(await direct.until_ready())


# --- a lone batch's first hit from its shape's memo, and its repeat ---------------------
async def test_a_remembered_first_hit_is_never_served_after_what_moved_under_it(env: Env) -> None:
    """Each disruption comes between a lone batch's first hit from its shape's memo (the
    entry remembered with it) and its first repeat: a write through another session, PURGE
    ALL with a write neonpoly did not see, a NEVER rule, a SET that changes what it reads,
    DEALLOCATE/Close and Parse again with another text, DISCARD ALL. The repeat, and the
    repeat of that, answer as the origin does."""
    t = await env.table("adv_lone", "id int PRIMARY KEY, v text", *(f"({i}, 'v{i}')" for i in range(1, 21)))
    stmt = parse("q", f"SELECT v FROM {t} WHERE id = $1", (INT4,))
    counting = parse("d", f"SELECT count(*) FROM {t} WHERE id <= $1", (INT4,))
    via, direct = await raw_pair(env, stmt, counting)
    writer = await env.twin()
    for key in (b"19", b"20"):  # the shape's memo made, by other keys
        await first_hit(env, via, direct, lone("q", key))

    async def round_(key: int, disrupt: Callable[[], Any], why: str) -> None:
        frames = lone("q", str(key).encode())
        await first_hit(env, via, direct, frames)
        await disrupt()
        for n in range(3):
            await same(env, via, direct, frames, f"{why} (repeat {n})")

    async def write_through() -> None:
        await writer.via.run(f"UPDATE {t} SET v = 'written' WHERE id = 1")

    await round_(1, write_through, "a write through another session")

    async def purge_and_unseen_write() -> None:
        await asyncio.to_thread(admin_console, env, "PURGE ALL")
        await env.admin(f"UPDATE {t} SET v = 'unseen' WHERE id = 2")

    await round_(2, purge_and_unseen_write, "PURGE ALL, then a write neonpoly did not see")

    async def never_rule() -> None:
        await asyncio.to_thread(admin_console, env, f"CREATE RULE ON TABLE {t} NEVER")
        await env.admin(f"UPDATE {t} SET v = 'never' WHERE id = 3")

    await round_(3, never_rule, "a NEVER rule on its table, then a write neonpoly did not see")
    for rule in await asyncio.to_thread(admin_console, env, "SHOW RULES"):
        await asyncio.to_thread(admin_console, env, f"DROP RULE {rule[0]}")

    # Close and Parse again under the same name with another text (the same Bind bytes).
    async def reparse() -> None:
        for raw in (via, direct):
            raw.send(rawpg.close_statement("q"), parse("q", f"SELECT v || '!' FROM {t} WHERE id = $1", (INT4,)), SYNC)
            await raw.until_ready()

    await round_(4, reparse, "q closed and parsed again with another text")

    async def deallocate_and_prepare() -> None:
        for raw in (via, direct):
            raw.send(query(f"DEALLOCATE q; PREPARE q(int) AS SELECT upper(v) FROM {t} WHERE id = $1"))
            await raw.until_ready()

    await round_(5, deallocate_and_prepare, "DEALLOCATE q and PREPARE q with another text in SQL")

    async def reparse_first() -> None:
        for raw in (via, direct):
            raw.send(rawpg.close_statement("q"), parse("q", f"SELECT v FROM {t} WHERE id = $1", (INT4,)), SYNC)
            await raw.until_ready()

    await reparse_first()  # (a statement PREPAREd in SQL is never cached: q as the book knows it)

    async def discard_all() -> None:
        for raw in (via, direct):
            raw.send(query("DISCARD ALL"))
            await raw.until_ready()

    await round_(6, discard_all, "DISCARD ALL (q is gone: the Bind fails)")
    for raw in (via, direct):
        raw.send(stmt, counting, SYNC)
        await raw.until_ready()
    # Describe-only and row-limited batches: their first hit, a write, their repeats.
    describe_only = rawpg.bind("", "d", ("3",)) + describe_portal() + SYNC
    limited = lone("d", b"8", rows=1)
    for frames in (describe_only, limited, lone("d", b"9")):
        for _ in range(3):  # stored, then served (when the cache takes it)
            await same(env, via, direct, frames, "warming")
    await writer.via.run(f"DELETE FROM {t} WHERE id = 8")
    for frames in (describe_only, limited, lone("d", b"9"), limited):
        await same(env, via, direct, frames, "after a delete")


async def test_a_remembered_first_hit_and_role_or_search_path_changes(env: Env) -> None:
    """A role change and a search_path change between a first hit and its repeat: never
    another role's rows (row-level security), never the other schema's table."""
    other = await env.role("adv_lone_r")
    t = await env.table("adv_lone_rls", "id int PRIMARY KEY, owner text, v text",
                        "(1, 'trust_user', 't1')", f"(2, '{other}', 'o2')", "(3, 'trust_user', 't3')")  # fmt: skip
    schema = unique("adv_lone_s")
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    await env.admin(
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY own ON {t} USING (owner = current_user)",
        f"GRANT {other} TO trust_user",
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE {schema}.{t} (id int PRIMARY KEY, owner text, v text)",
        f"INSERT INTO {schema}.{t} VALUES (1, 'x', 'shadow 1'), (2, 'x', 'shadow 2')",
        f"GRANT SELECT ON {schema}.{t} TO PUBLIC",
    )
    via, direct = await raw_pair(env, parse("q", f"SELECT v FROM {t} WHERE id >= $1 ORDER BY id", (INT4,)))
    await first_hit(env, via, direct, lone("q", b"2"))
    frames = lone("q", b"1")
    await first_hit(env, via, direct, frames)
    for change in (f"SET ROLE {other}", "RESET ROLE", f"SET search_path = {schema}, public", "RESET search_path"):
        for raw in (via, direct):
            raw.send(query(change))
            await raw.until_ready()
        for n in range(3):
            await same(env, via, direct, frames, f"after {change} ({n})")


@in_process
async def test_a_remembered_first_hit_past_its_ttl(env: Env) -> None:
    """The store's clocks moved past the remembered entry's TTL (not slept through) and a
    write neonpoly did not see: the repeat is the origin's."""
    t = await env.table("adv_lone_ttl", "id int PRIMARY KEY, v text", "(1, 'a')", "(2, 'b')")
    via, direct = await raw_pair(env, parse("q", f"SELECT v FROM {t} WHERE id = $1", (INT4,)))
    await first_hit(env, via, direct, lone("q", b"2"))
    frames = lone("q", b"1")
    await first_hit(env, via, direct, frames)
    await env.admin(f"UPDATE {t} SET v = 'later' WHERE id = 1")  # not seen by neonpoly
    proxy = env.proxy
    assert isinstance(proxy, CachingProxy)
    (cache,) = [r.cache for r in proxy.service.routes.by_id.values() if r.cache is not None]
    store: Any = cache.store
    ahead = 10_000.0
    for holder, attr in ((cache, "clock"), (store.l1, "_clock"), (store.l2, "_clock")):
        clock = getattr(holder, attr)
        setattr(holder, attr, lambda clock=clock: clock() + ahead)
    (session,) = [s for s in proxy.service.server.sessions if isinstance(s, Session) and s.hit_memos]
    assert any(m.entry is not None for m in session.hit_memos.values())  # remembered with its entry
    for n in range(2):
        got, _ = await same(env, via, direct, frames, f"past its TTL ({n})")
        assert rows(got) == [[b"later"]]


@in_process
async def test_the_unnamed_statement_and_a_flush_behind_a_passed_lone_batch(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lone batches of the unnamed statement, bypassed and passed; behind one held: a simple
    Query (which drops the unnamed statement: the next Bind of it fails on both), a Parse of
    it with another text, a write left open by a Flush and committed by its Sync, reads."""
    async with bypass_world(pg, tmp_path, monkeypatch) as (_proxy, _spied, passed, table, twin, via, direct):
        for raw, t in ((via, table), (direct, twin)):
            raw.send(parse("", f"SELECT name FROM {t} WHERE id = $1", (INT4,)), SYNC)
            await raw.until_ready()
        before = len(passed)
        for key in range(1, 8):
            via.send(lone("", str(key).encode()))
            assert rows(await via.until_ready()) == [[f"name {key}".encode()]]
        assert len(passed) > before  # the unnamed statement's lone batches are passed too

        def script(t: str) -> list[bytes]:
            return [
                query("SELECT 1"),
                lone("", b"8"),
                parse("", f"SELECT id, name FROM {t} WHERE id = $1", (INT4,)) + SYNC,
                lone("", b"8"),
                tx(f"UPDATE {t} SET name = 'flushed' WHERE id = 8")[:-5] + pgwire.frame(b"H"),
                SYNC,
                lone("", b"8"),
                lone("h", b"8"),
                lone("s", b"8"),
            ]

        readies = len(script(twin))  # the held one, then all but the Flushed one
        direct.send(lone("", b"9"), *script(twin))
        expected = await answers_of(direct, readies)
        await _sent_behind_a_held_pass(pg, table, via, passed, b"9", "", script(table))
        assert await answers_of(via, readies) == expected
        for _ in range(3):
            for frames in (lone("", b"8"), lone("h", b"8")):
                via.send(frames)
                direct.send(frames)
                assert norm(await via.until_ready()) == norm(await direct.until_ready())


async def test_asyncpg_prepared_reads_between_writes_of_another_session(env: Env) -> None:
    """asyncpg's prepared statements (a lone Bind/Execute/Sync per call): hit from the shape's
    memo, then from the remembered bytes, with another session writing between rounds; every
    answer is the origin's."""
    t = await env.table("adv_lone_apg", "id int PRIMARY KEY, v text", *(f"({i}, 'v{i}')" for i in range(1, 6)))
    reader = await env.twin(driver="asyncpg")
    writer = await env.twin()
    sql = f"SELECT v FROM {t} WHERE id = $1"
    await reader.probe(sql, (5,))  # the shape's memo made, a hit
    for n in range(4):
        for key in (1, 2, 3):
            for _ in range(3):
                await reader.check(sql, (key,), why=f"round {n}, key {key}")
        await writer.via.run(f"UPDATE {t} SET v = v || '+' WHERE id = {n % 3 + 1}")
    for key in (1, 2, 3):
        await reader.check(sql, (key,), why="after the last write")


async def _sent_behind_a_held_pass(
    pg: PgServer, table: str, via: Raw, passed: list[bytes], key: bytes, statement: str, script: list[bytes]
) -> None:
    """`script`'s requests sent one write each, a little apart, while a passed lone batch of
    `statement` is held outstanding by a table lock; then the lock is released."""
    locker = await held_pass(pg, table, via, passed, key, statement)
    try:
        for frames in script:
            via.send(frames)
            await via.writer.drain()
            await asyncio.sleep(0.003)
    finally:
        await locker.execute("ROLLBACK")
        await locker.close()

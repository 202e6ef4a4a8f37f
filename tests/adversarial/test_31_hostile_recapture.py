"""Hostile review of the cheaper capture-miss path: an answer taken whole in one read
(`OriginAnswers._origin_fast` with a capture), the entry a hit memo stores from the miss it sent
(served again only while the store holds it, live), and the generation names a memo works
out once (`HitMemo.names`).

Every case makes the path provably taken (the read that is captured is cut, or not, as the
case says; a hit counted for the call that must come from the entry) and compares the
proxy's answer with a direct connection's, byte for byte where the raw protocol is used.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from neonpoly import pgwire
from neonpoly.cache.query_cache import QueryCache
from neonpoly.proxy.hits import HitMemo
from neonpoly.proxy.session import Session
from tests.adversarial.harness import Env, Twin, hits, unique
from tests.adversarial.rawpg import SYNC, Message, Raw, execute, parse, query, rows
from tests.adversarial.test_30_hostile_pass_relay import bind_binary, normal, raw_pid, session_of
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy

Shape = Callable[[bytes], list[bytes]]


@contextlib.asynccontextmanager
async def world(pg: PgServer, tmp_path: Path, **cache: Any) -> AsyncIterator[Env]:
    """An in-process caching neonpoly (its sessions and store are looked into)."""
    async with caching_proxy(pg, tmp_path / "cache", **cache) as proxy:
        env = Env(pg, proxy, contextlib.AsyncExitStack())
        try:
            async with env.stack:
                yield env
        finally:
            await env.run_cleanups()


def cache_of(env: Env) -> QueryCache:
    assert isinstance(env.proxy, CachingProxy)
    (cache,) = [r.cache for r in env.proxy.service.routes.by_id.values() if r.cache is not None]
    return cache


class Origin:
    """One session's origin reads, gathered up to the next whole answer and handed on in the
    pieces `shape` makes (then as they come again: neonpoly's own lookups may follow at
    once); `hold` keeps the next answers back."""

    def __init__(self, session: Session) -> None:
        self.deliver = session.origin_data
        self.shape: Shape | None = None
        self.hold = False
        self.held: list[bytes] = []
        self.gathered = bytearray()
        transport = session.origin_transport
        assert transport is not None
        protocol: Any = transport.get_protocol()
        protocol.data_received = self.received
        transport.set_protocol(protocol)  # uvloop reads data_received again only here

    def received(self, data: bytes) -> None:
        if self.shape is None and not self.hold:
            self.deliver(data)
            return
        self.gathered.extend(data)
        frames, used = pgwire.scan_frames(self.gathered)
        if used != len(self.gathered) or not frames or frames[-1][0] != ord("Z"):
            return
        answer = bytes(self.gathered)
        self.gathered.clear()
        if self.hold:
            self.held.append(answer)
            return
        shape, self.shape = self.shape, None
        assert shape is not None
        for piece in shape(answer):
            self.deliver(piece)

    def release(self) -> None:
        self.hold = False
        for answer in self.held:
            self.deliver(answer)
        self.held.clear()


async def ask(raw: Raw, *frames: bytes) -> list[Message]:
    raw.send(*frames)
    return normal(await raw.until_ready())


async def raw_pair(env: Env) -> tuple[Raw, Raw, Session]:
    """A raw session through neonpoly, its double straight to the origin, and the proxy's
    session object."""
    assert isinstance(env.proxy, CachingProxy)
    via = await Raw.connect(env.proxy.port)
    direct = await Raw.connect(env.pg.port)
    env.stack.push_async_callback(via.close)
    env.stack.push_async_callback(direct.close)
    return via, direct, session_of(env.proxy, await raw_pid(via))


async def hit_of(env: Env, raw: Raw, *frames: bytes) -> tuple[list[Message], bool]:
    before = hits(env.proxy)
    got = await ask(raw, *frames)
    return got, hits(env.proxy) > before


def memo_of(session: Session, sql: str) -> HitMemo:
    return session.hit_memos[query(sql)]


# --- one read, captured whole -------------------------------------------------------------


def two_pieces(k: int) -> Shape:
    return lambda answer: [answer[:k], answer[k:]] if 0 < k < len(answer) else [answer]


def byte_by_byte(answer: bytes) -> list[bytes]:
    return [answer[i : i + 1] for i in range(len(answer))]


async def test_a_captured_answer_cut_at_every_byte_is_stored_as_the_origin_sent_it(
    pg: PgServer, tmp_path: Path
) -> None:
    """Rows whose bytes end like a ReadyForQuery (text columns across a column boundary,
    a binary bytea), captured from reads cut at each byte boundary in turn, whole, and one
    byte at a time: every hit replays exactly what the origin answered."""
    async with world(pg, tmp_path, admit_after=1) as env:
        t = await env.table("adv_recap", "id int PRIMARY KEY, a text, b text, c bytea",
                            "(1, 'xZ', 'IIIII', '\\x5a0000000549'::bytea)",
                            "(2, 'yZ', 'TTTTT', '\\x5a0000000554'::bytea)")  # fmt: skip
        via, direct, session = await raw_pair(env)
        origin = Origin(session)
        forms: list[Callable[[int], tuple[bytes, ...]]] = [
            lambda k: (query(f"SELECT a, b FROM {t} WHERE id = 1 AND {k} >= 0"),),
            lambda k: (query(f"SELECT a, b, c FROM {t} WHERE id <= 2 AND {k} >= 0 ORDER BY id"),),
            lambda k: (parse("", f"SELECT c FROM {t} WHERE id = 2 AND {k} >= 0"), bind_binary(), execute(), SYNC),
        ]
        for form in forms:
            expected = await ask(direct, *form(0))
            assert await ask(via, *form(0)) == expected  # the catalog learns what it reads
            size = sum(5 + len(body) for _, body in expected)
            shapes: list[Shape | None] = [None, byte_by_byte, *(two_pieces(k) for k in range(1, size))]
            for k, shape in enumerate(shapes):
                request = form(k + 1)
                origin.shape = shape
                assert await ask(via, *request) == expected  # captured from the shaped read
                got, hit = await hit_of(env, via, *request)
                assert hit, f"no hit after a capture shaped {k}"
                assert got == expected, f"the entry captured from read shape {k} replays wrong"


async def test_several_results_empty_results_and_big_rows_captured(pg: PgServer, tmp_path: Path) -> None:
    """A Query of two statements (the second failing in one), an empty result, a row over
    many reads: each captured and replayed as the origin answers it (or not stored)."""
    async with world(pg, tmp_path) as env:
        t = await env.table("adv_recap_m", "id int PRIMARY KEY, a text", "(1, 'one')", "(2, 'two')")
        via, direct, _ = await raw_pair(env)
        for sql in (
            f"SELECT a FROM {t} WHERE id = 1; SELECT a FROM {t} WHERE id = 2",
            f"SELECT a FROM {t} WHERE id = 1; SELECT a FROM {t} WHERE id < 0",
            f"SELECT a FROM {t} WHERE id = 1; SELECT 1 / (id - 1) FROM {t} WHERE id = 1",
            f"SELECT a FROM {t} WHERE id < 0",
            f"SELECT repeat(a, 200000) FROM {t} WHERE id = 2",
            f"SELECT a, repeat('Z', 5) FROM {t} ORDER BY id",
        ):
            expected = await ask(direct, query(sql))
            for _ in range(3):
                assert await ask(via, query(sql)) == expected, sql
            got, hit = await hit_of(env, via, query(sql))
            assert got == expected, sql
            assert hit or ";" in sql, sql  # several statements in one Query may not be cached


async def test_answers_around_the_largest_entry_size(pg: PgServer, tmp_path: Path) -> None:
    """Answers one byte under, at and over the largest entry, each in one read: the first two
    stored whole, the last not stored at all (no truncated entry)."""
    limit = 4000
    async with world(pg, tmp_path, max_entry_bytes=limit) as env:
        t = await env.table("adv_recap_l", "id int PRIMARY KEY, a text", "(1, 'x')")
        via, direct, _ = await raw_pair(env)

        def read(n: int) -> bytes:
            return query(f"SELECT repeat(a, {n}) AS r FROM {t} WHERE id = 1")

        base = sum(5 + len(body) for kind, body in await ask(direct, read(1000)) if kind != b"Z") - 1000
        for size, stored in ((limit - 1, True), (limit, True), (limit + 1, False)):
            expected = await ask(direct, read(size - base))
            assert sum(5 + len(body) for kind, body in expected if kind != b"Z") == size
            for _ in range(2):
                assert await ask(via, read(size - base)) == expected
            got, hit = await hit_of(env, via, read(size - base))
            assert (got, hit) == (expected, stored), size


def slipped(frame: bytes, at: int) -> Shape:
    """The answer, whole in one read, with `frame` slipped in after its `at`-th frame."""

    def shape(answer: bytes) -> list[bytes]:
        frames, _ = pgwire.scan_frames(answer)
        cut = frames[at - 1][2] if at else 0
        return [answer[:cut] + frame + answer[cut:]]

    return shape


async def test_notifications_notices_and_settings_in_a_captured_read_are_never_replayed(
    pg: PgServer, tmp_path: Path
) -> None:
    """What the origin may send at any moment (a notification, a notice, a setting) arriving
    in the very read that answers a captured miss, first or between rows: the client gets it
    once, the entry never holds it."""
    async with world(pg, tmp_path) as env:
        t = await env.table("adv_recap_n", "id int PRIMARY KEY, a text", "(1, 'one')", "(2, 'two')")
        via, direct, session = await raw_pair(env)
        origin = Origin(session)
        extras = [
            pgwire.frame(b"A", b"\x00\x00\x00\x07" + pgwire.cstr("chan") + pgwire.cstr("Z\x00")),
            pgwire.frame(b"N", b"SNOTICE\x00C00000\x00Mslipped\x00\x00"),
            pgwire.frame(b"S", pgwire.cstr("application_name") + pgwire.cstr("slipped")),
        ]
        n = 0
        for extra in extras:
            for at in (0, 1, 2):
                n += 1
                sql = f"SELECT a FROM {t} WHERE id < {n} + 2 ORDER BY id"
                expected = await ask(direct, query(sql))
                assert await ask(via, query(sql)) == expected
                origin.shape = slipped(extra, at)
                captured = await ask(via, query(sql))
                assert [m[0] for m in captured].count(extra[:1]) == 1, "the client lost it, or got it twice"
                if extra[:1] == b"S":
                    assert session.state.server_params.get("application_name") == "slipped"
                got, hit = await hit_of(env, via, query(sql))
                assert hit and got == expected, (extra[:1], at)


# --- the entry a memo stored --------------------------------------------------------------


async def memo_holding_its_capture(env: Env, via: Raw, writer: Twin, t: str, sql: str, value: int) -> None:
    """A memo whose entry a write (seen by neonpoly) made stale sends the miss and keeps the
    entry stored from it: the next repeat is a hit served from that entry."""
    await writer.via.run(f"UPDATE {t} SET v = {value} WHERE id = 1")
    assert rows(await ask(via, query(sql))) == [[str(value).encode()]]
    got, hit = await hit_of(env, via, query(sql))
    assert hit and rows(got) == [[str(value).encode()]]


async def test_the_entry_a_memo_stored_is_not_served_after_a_write_purge_or_expiry(
    pg: PgServer, tmp_path: Path
) -> None:
    """After each way an entry stops being servable (a write through another session,
    PURGE ALL / TABLE / QUERY followed by a write neonpoly did not see, its TTL running
    out), the memo that stored it answers as the origin does."""
    async with world(pg, tmp_path) as env:
        t = await env.table("adv_recap_p", "id int PRIMARY KEY, v int", "(1, 0)", "(2, 0)")
        via, direct, session = await raw_pair(env)
        writer = await env.twin()
        cache = cache_of(env)
        sql = f"SELECT v FROM {t} WHERE id = 1"
        for _ in range(3):
            await ask(via, query(sql))
        assert (await hit_of(env, via, query(sql)))[1]
        memo = memo_of(session, sql)
        value = 0

        async def same() -> None:
            assert await ask(via, query(sql)) == await ask(direct, query(sql))

        value += 1
        await memo_holding_its_capture(env, via, writer, t, sql, value)
        kept = memo.entry
        await writer.via.run(f"UPDATE {t} SET v = v + 100 WHERE id = 1")  # seen
        await same()
        assert memo.entry is not kept  # the write made it stale: the memo stored anew

        (table_tag,) = memo.entry.tables if memo.entry is not None else {t}
        purges: list[Callable[[], int]] = [cache.purge, lambda: cache.store.purge_tables([table_tag]),
                  lambda: cache.store.purge_template(memo.template_id)]  # fmt: skip
        for purge in purges:
            value += 1
            await memo_holding_its_capture(env, via, writer, t, sql, value)
            await env.admin(f"UPDATE {t} SET v = v + 1000 WHERE id = 1")  # not seen by neonpoly
            purge()
            await same()

        # Its TTL runs out (the store's clocks moved past it, not slept through).
        value += 1
        await memo_holding_its_capture(env, via, writer, t, sql, value)
        await env.admin(f"UPDATE {t} SET v = v + 1000 WHERE id = 1")  # not seen by neonpoly
        entry = memo.entry
        assert entry is not None
        ttl = entry.ttl

        def ahead(clock: Callable[[], float]) -> Callable[[], float]:
            return lambda: clock() + ttl + 1.0

        store: Any = cache.store
        cache.clock = ahead(cache.clock)
        store.l1._clock = ahead(store.l1._clock)
        store.l2._clock = ahead(store.l2._clock)
        await same()


async def test_a_write_landing_while_the_memos_miss_is_out(pg: PgServer, tmp_path: Path) -> None:
    """The memo's miss is sent, a write through another session commits before its answer
    comes back: the answer (older than the write) is not kept, so the repeat is fresh."""
    async with world(pg, tmp_path) as env:
        t = await env.table("adv_recap_r", "id int PRIMARY KEY, v int", "(1, 0)")
        via, direct, session = await raw_pair(env)
        writer = await env.twin()
        sql = f"SELECT v FROM {t} WHERE id = 1"
        for _ in range(3):
            await ask(via, query(sql))
        await memo_holding_its_capture(env, via, writer, t, sql, 1)
        origin = Origin(session)
        for value in (2, 3):
            await writer.via.run(f"UPDATE {t} SET v = {value * 10} WHERE id = 1")
            origin.hold = True
            via.send(query(sql))  # the memo's miss: its answer is held back
            for _ in range(200):
                if origin.held:
                    break
                await writer.via.run("SELECT 1")  # a round trip: time for the origin to answer
            assert origin.held
            await writer.via.run(f"UPDATE {t} SET v = {value * 10 + 1} WHERE id = 1")
            origin.release()
            assert rows(await via.until_ready()) == [[str(value * 10).encode()]]
            assert await ask(via, query(sql)) == await ask(direct, query(sql))


async def test_the_entry_a_memo_stored_pushed_out_of_memory(pg: PgServer, tmp_path: Path) -> None:
    """A memory tier of a few entries: the memo's entry is evicted by others (LRU); its
    repeats answer from disk or the origin, never what a write made stale."""
    async with world(pg, tmp_path, l1_bytes=6000, admit_after=1) as env:
        t = await env.table("adv_recap_e", "id int PRIMARY KEY, v int", "(1, 0)")
        via, direct, session = await raw_pair(env)
        writer = await env.twin()
        cache = cache_of(env)
        sql = f"SELECT v FROM {t} WHERE id = 1"
        for _ in range(2):
            await ask(via, query(sql))
        await memo_holding_its_capture(env, via, writer, t, sql, 1)
        memo = memo_of(session, sql)
        for round_ in range(2):
            for i in range(40):  # each a template of its own (one evicted unread stops its template)
                await ask(via, query(f"SELECT v AS v{round_}_{i} FROM {t} WHERE id = 1"))
            store: Any = cache.store
            assert store.l1._entries.get(memo.key) is None, "the memo's entry is still in memory"
            got, _ = await hit_of(env, via, query(sql))
            assert got == await ask(direct, query(sql))
            await writer.via.run(f"UPDATE {t} SET v = v + 1 WHERE id = 1")
            assert await ask(via, query(sql)) == await ask(direct, query(sql)), round_


# --- the generation names a memo keeps ------------------------------------------------------


async def warm_memo(env: Env, via: Raw, writer: Twin, t: str, sql: str) -> None:
    """A memo for `sql` that already sent one miss (its names worked out) and holds its entry."""
    for _ in range(3):
        await ask(via, query(sql))
    await writer.via.run(f"UPDATE {t} SET v = v + 1 WHERE id = 1")
    await ask(via, query(sql))
    assert (await hit_of(env, via, query(sql)))[1]


async def test_memo_names_after_the_key_moves_the_table_is_made_again_or_renamed(pg: PgServer, tmp_path: Path) -> None:
    """A memo of a point read (stamped by its key's bucket): the primary key moves to another
    column, the table is dropped and made again without a key, another table is renamed into
    its name, all through neonpoly; then writes through another session that a stale stamp
    would miss (a keyed write of the new key, a whole-table write)."""
    async with world(pg, tmp_path) as env:
        t = unique("adv_recap_k")
        other = unique("adv_recap_o")
        env.on_cleanup(f"DROP TABLE IF EXISTS {t} CASCADE", f"DROP TABLE IF EXISTS {other} CASCADE")
        writer = await env.twin()
        await writer.via.run(f"CREATE TABLE {t} (id int PRIMARY KEY, k2 int UNIQUE NOT NULL, v int)")
        await writer.via.run(f"INSERT INTO {t} VALUES (1, 10, 0), (2, 20, 0)")
        await writer.via.run(f"GRANT ALL ON {t} TO PUBLIC")
        via, direct, _ = await raw_pair(env)
        sql = f"SELECT v FROM {t} WHERE id = 1"

        async def same(why: str) -> None:
            assert await ask(via, query(sql)) == await ask(direct, query(sql)), why

        await warm_memo(env, via, writer, t, sql)
        await writer.via.run(f"ALTER TABLE {t} DROP CONSTRAINT {t}_pkey, ADD PRIMARY KEY (k2)")
        await same("the key moved")
        await warm_memo(env, via, writer, t, sql)
        await writer.via.run(f"UPDATE {t} SET v = 50 WHERE k2 = 10")  # keyed by the new key
        await same("a write keyed by the new key")

        await writer.via.run(f"DROP TABLE {t}")
        await writer.via.run(f"CREATE TABLE {t} (id int, v int)")
        await writer.via.run(f"INSERT INTO {t} VALUES (1, 7)")
        await writer.via.run(f"GRANT ALL ON {t} TO PUBLIC")
        await same("dropped and made again")
        await warm_memo(env, via, writer, t, sql)
        await writer.via.run(f"UPDATE {t} SET v = 8 WHERE id = 1")  # no key: a whole-table write
        await same("a write to the table made again")

        await writer.via.run(f"CREATE TABLE {other} (id int PRIMARY KEY, v int)")
        await writer.via.run(f"INSERT INTO {other} VALUES (1, 900)")
        await writer.via.run(f"GRANT ALL ON {other} TO PUBLIC")
        await warm_memo(env, via, writer, t, sql)
        await writer.via.run(f"ALTER TABLE {t} RENAME TO {t}_gone")
        env.on_cleanup(f"DROP TABLE IF EXISTS {t}_gone CASCADE")
        await writer.via.run(f"ALTER TABLE {other} RENAME TO {t}")
        await same("another table renamed into its name")
        await warm_memo(env, via, writer, t, sql)
        await writer.via.run(f"UPDATE {t} SET v = 901 WHERE id = 1")
        await same("a keyed write to the renamed table")


async def test_memo_names_after_a_view_is_redefined_or_a_schema_shadows_the_table(pg: PgServer, tmp_path: Path) -> None:
    async with world(pg, tmp_path) as env:
        s = unique("adv_recap_s")
        a = await env.table("adv_recap_va", "id int PRIMARY KEY, v int", "(1, 1)")
        b = await env.table("adv_recap_vb", "id int PRIMARY KEY, v int", "(1, 2)")
        view = unique("adv_recap_v")
        env.on_cleanup(f"DROP VIEW IF EXISTS {view}", f"DROP SCHEMA IF EXISTS {s} CASCADE")
        writer = await env.twin()
        await writer.via.run(f"CREATE VIEW {view} AS SELECT id, v FROM {a}")
        await writer.via.run(f"GRANT ALL ON {view} TO PUBLIC")
        via, direct, _ = await raw_pair(env)
        read = f"SELECT v FROM {view} WHERE id = 1"
        await warm_memo(env, via, writer, a, read)
        await writer.via.run(f"CREATE OR REPLACE VIEW {view} AS SELECT id, v FROM {b}")
        assert await ask(via, query(read)) == await ask(direct, query(read))
        await warm_memo(env, via, writer, b, read)
        await writer.via.run(f"UPDATE {b} SET v = 77 WHERE id = 1")
        assert await ask(via, query(read)) == await ask(direct, query(read)), "a write to the view's new table"

        # A schema on the search_path made after the memo shadows the table's name.
        await writer.via.run(f"CREATE SCHEMA {s}")
        await writer.via.run(f"GRANT ALL ON SCHEMA {s} TO PUBLIC")
        for side in (via, direct):
            await ask(side, query(f"SET search_path = {s}, public"))
        read = f"SELECT v FROM {a} WHERE id = 1"
        await warm_memo(env, via, writer, a, read)
        await writer.via.run(f"CREATE TABLE {s}.{a} (id int PRIMARY KEY, v int)")
        await writer.via.run(f"INSERT INTO {s}.{a} VALUES (1, 555)")
        await writer.via.run(f"GRANT ALL ON {s}.{a} TO PUBLIC")
        assert await ask(via, query(read)) == await ask(direct, query(read)), "shadowed"
        await warm_memo(env, via, writer, f"{s}.{a}", read)
        await writer.via.run(f"UPDATE {s}.{a} SET v = 556 WHERE id = 1")
        assert await ask(via, query(read)) == await ask(direct, query(read)), "a write to the shadowing table"


async def test_sessions_sharing_a_template_with_other_search_paths_and_roles(pg: PgServer, tmp_path: Path) -> None:
    """The same bytes in sessions whose search_path (or role) makes them read other rows,
    each memo sending misses and keeping entries: no session is served another's rows."""
    async with world(pg, tmp_path) as env:
        s1, s2 = unique("adv_recap_p1"), unique("adv_recap_p2")
        env.on_cleanup(f"DROP SCHEMA IF EXISTS {s1} CASCADE", f"DROP SCHEMA IF EXISTS {s2} CASCADE")
        for s, v in ((s1, 100), (s2, 200)):
            await env.admin(f"CREATE SCHEMA {s}", f"CREATE TABLE {s}.t (id int PRIMARY KEY, v int)",
                            f"INSERT INTO {s}.t VALUES (1, {v})", f"GRANT USAGE ON SCHEMA {s} TO PUBLIC",
                            f"GRANT ALL ON {s}.t TO PUBLIC")  # fmt: skip
        writer = await env.twin()
        sql = "SELECT v FROM t WHERE id = 1"
        sides = []
        for s in (s1, s2):
            via, direct, _ = await raw_pair(env)
            for side in (via, direct):
                await ask(side, query(f"SET search_path = {s}"))
            await warm_memo(env, via, writer, f"{s}.t", sql)
            sides.append((via, direct))
        for round_ in range(2):
            for s in (s1, s2, s2):
                await writer.via.run(f"UPDATE {s}.t SET v = v + 1 WHERE id = 1")
                for via, direct in sides:
                    for _ in range(2):  # the memo's miss, then its kept entry
                        assert await ask(via, query(sql)) == await ask(direct, query(sql)), (round_, s)

        # Roles: a policy shows each role its own rows; one session switches roles.
        r1, r2 = await env.role("adv_recap_r"), await env.role("adv_recap_r")
        t = await env.table("adv_recap_rls", "id int PRIMARY KEY, owner text, v int",
                            f"(1, '{r1}', 1)", f"(2, '{r2}', 2)")  # fmt: skip
        await env.admin(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
                        f"CREATE POLICY p ON {t} USING (owner = current_user)",
                        f"GRANT {r1}, {r2} TO postgres")  # fmt: skip
        twins = [await env.twin(env.login(r)) for r in (r1, r2)]
        switching = await env.twin()
        read = f"SELECT id, v FROM {t} ORDER BY id"
        for twin in twins:
            await twin.probe(read)
        for i, role in enumerate((r1, r2, "postgres", r1)):
            await switching.both(f"SET ROLE {role}")
            await switching.probe(read, require_hit=False)
            await writer.via.run(f"UPDATE {t} SET v = v + 10 WHERE id = {i % 2 + 1}")
            for twin in (*twins, switching):
                for _ in range(2):
                    await twin.check(read, why=f"after a write, {role}")


def one_read_per_answer(answer: bytes) -> list[bytes]:
    """Answers to pipelined requests, one read each: each whole, as `_origin_fast` takes it."""
    frames, _ = pgwire.scan_frames(answer)
    ends = [0, *(end for mtype, _, end in frames if mtype == ord("Z"))]
    return [answer[a:b] for a, b in itertools.pairwise(ends)]


async def test_pipelined_captures_and_writes_answered_one_read_each(pg: PgServer, tmp_path: Path) -> None:
    """Requests sent in one write (two captured misses, then a write to what they read, then
    the read again), their answers in one read each: the misses' entries are stamped before
    the write and never served after it."""
    async with world(pg, tmp_path) as env:
        t = await env.table("adv_recap_q", "id int PRIMARY KEY, v int", "(1, 0)", "(2, 0)")
        via, direct, session = await raw_pair(env)
        origin = Origin(session)
        for i in range(1, 6):
            reads = [query(f"SELECT v FROM {t} WHERE id = {k} AND {i} >= 0") for k in (1, 2)]
            for read in reads:
                await ask(via, read)  # first sightings
            write = query(f"UPDATE {t} SET v = v + 1")
            origin.shape = one_read_per_answer
            via.send(*reads, write, *reads)
            answers = [normal(await via.until_ready()) for _ in range(5)]
            assert [rows(a) for a in answers] == [[[str(i - 1).encode()]]] * 2 + [[]] + [[[str(i).encode()]]] * 2
            for read in reads:
                got, _ = await hit_of(env, via, read)
                assert got == await ask(direct, read), i

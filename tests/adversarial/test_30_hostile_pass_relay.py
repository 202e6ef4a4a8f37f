"""Hostile review of the pass-through fast path (`OriginAnswers._pass_origin`, `Session.passing`) and
the tail-first check of `_origin_fast`: an answer is taken as whole when its last six bytes
are a ReadyForQuery and one walk over the frames before it lands exactly there.

The origin's bytes for a session are gathered up to each whole answer (or the start of a
COPY IN) and handed to the session cut at every byte boundary in turn, one cut per answer;
after each answer the session's unanswered-request count, transaction status and settings
must be what the answer says, and the client must get what a direct connection gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from neonpoly import pgwire
from neonpoly.proxy.session import Session
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, unique
from tests.adversarial.rawpg import SYNC, Message, Raw, execute, kinds, parse, query
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.conftest import RunningProxy, start_proxy

Cut = Callable[[bytes], list[bytes]]
FAKE = (b"Z\x00\x00\x00\x05I", b"Z\x00\x00\x00\x05T", b"Z\x00\x00\x00\x05E")


@contextlib.asynccontextmanager
async def serving(pg: PgServer, tmp_path: Path, *, cache: bool) -> AsyncIterator[CachingProxy]:
    async with caching_proxy(pg, tmp_path / "cache", enabled=cache) as proxy:
        yield proxy


def session_of(proxy: CachingProxy, pid: int) -> Session:
    (session,) = [s for s in proxy.service.server.sessions if s.origin_key and s.origin_key[0] == pid]
    return session


class Sweep:
    """Cuts each whole answer at the next of its cut points, counted per answer (the same
    bytes again take the next point): by default every byte boundary; `near_frames` only
    those at and just after each frame's start and inside the last six bytes (where the
    walks decide). `three` cuts the rest once more, in its middle."""

    def __init__(self, three: bool = False, near_frames: bool = False) -> None:
        self.seen: dict[bytes, int] = {}
        self.three = three
        self.near_frames = near_frames

    def __call__(self, answer: bytes) -> list[bytes]:
        if len(answer) < 2:
            return [answer]
        points = list(range(1, len(answer)))
        if self.near_frames:
            frames, _ = pgwire.scan_frames(answer)
            near = {start + d for _, start, _ in frames for d in range(6)} | set(range(len(answer) - 6, len(answer)))
            points = sorted(p for p in near if 0 < p < len(answer))
        i = self.seen.get(answer, 0)
        self.seen[answer] = i + 1
        k = points[i % len(points)]
        if not self.three or len(answer) - k < 2:
            return [answer[:k], answer[k:]]
        j = k + (len(answer) - k) // 2
        return [answer[:k], answer[k:j], answer[j:]]


class Tear:
    """The origin's reads for one session, gathered and re-delivered in the pieces `cut`
    makes. Pass `cut=None` to forward reads untouched again."""

    def __init__(self, session: Session, cut: Cut | None) -> None:
        self.session = session
        self.cut = cut
        self.deliver = session.origin_data
        self.gathered = bytearray()
        self.answers: list[bytes] = []
        self.wrong: list[str] = []  # what the session believed after an answer, when wrong
        transport = session.origin_transport
        assert transport is not None
        protocol: Any = transport.get_protocol()  # OriginSide: its data_received is swapped
        protocol.data_received = self.received
        transport.set_protocol(protocol)  # uvloop reads data_received again only here

    def received(self, data: bytes) -> None:
        if self.cut is None:
            self.deliver(data)
            return
        self.gathered.extend(data)
        frames, used = pgwire.scan_frames(self.gathered)
        if used != len(self.gathered) or not frames or frames[-1][0] not in (ord("Z"), ord("G")):
            return
        answer = bytes(self.gathered)
        self.gathered.clear()
        self.answers.append(answer)
        session = self.session
        inflight, status = session.inflight, session.state.tx_status
        ready_ends = [end for mtype, _, end in frames if mtype == ord("Z")]
        settings: dict[str, str] = {}
        delivered = 0
        for piece in self.cut(answer):
            self.deliver(piece)
            delivered += len(piece)
            # What the session must believe now: as many answers done as whole ReadyForQuery
            # frames delivered, the status of the last one, every setting delivered taken in.
            done = [end for end in ready_ends if end <= delivered]
            want_status = answer[done[-1] - 1 : done[-1]] if done else status
            want = (max(inflight - len(done), 0), want_status)
            if session.passing and (session.inflight, session.state.tx_status) != want:
                self.wrong.append(
                    f"after {delivered}/{len(answer)} of {answer[-30:]!r}: "
                    f"{(session.inflight, session.state.tx_status)} != {want}"
                )
            if not session.passing and not session.pending and session.state.tx_status != want_status:
                self.wrong.append(
                    f"after {delivered}/{len(answer)} of {answer[-30:]!r}: "
                    f"status {session.state.tx_status!r} != {want_status!r}"
                )
            for mtype, start, end in frames:
                if mtype == ord("S") and end <= delivered:
                    name, value = pgwire.parse_parameter_status(answer[start + 5 : end])
                    settings[name] = value
            for name, value in settings.items():
                if session.state.server_params.get(name) != value:
                    self.wrong.append(
                        f"after {delivered}/{len(answer)}: {name} is "
                        f"{session.state.server_params.get(name)!r}, origin said {value!r}"
                    )


def normal(msgs: list[Message]) -> list[Message]:
    """What must match a direct connection: every message, but notices' and errors' source
    lines and a backend's pid in notifications."""
    out: list[Message] = []
    for t, body in msgs:
        if t in (b"E", b"N"):
            fields = pgwire.parse_error_fields(body)
            out.append((t, repr(sorted((k, v) for k, v in fields.items() if k in "SCM")).encode()))
        elif t == b"A":
            out.append((t, body[4:]))
        elif t == b"K":
            continue
        else:
            out.append((t, body))
    return out


async def raw_pid(raw: Raw) -> int:
    raw.send(query("SELECT pg_backend_pid()"))
    return int(rawpg.rows(await raw.until_ready())[0][0] or b"0")


def bind_binary() -> bytes:
    """Bind the unnamed statement, no parameters, results in binary (a bytea comes raw)."""
    return pgwire.frame(b"B", pgwire.cstr("") + pgwire.cstr("") + struct.pack("!hh", 0, 0) + struct.pack("!hh", 1, 1))


def fake_rows(fake: bytes) -> bytes:
    """A batch answered with two rows whose bytes end like a ReadyForQuery (volatile: never
    cached, so the cache mode forwards it on its fast path too)."""
    sql = f"SELECT '\\x{fake.hex()}'::bytea FROM generate_series(1, 2) WHERE random() >= 0"
    return parse("", sql) + bind_binary() + execute() + SYNC


# Simple-protocol requests whose answers the pass-through must read right at every cut:
# settings, errors mid-way, transactions, notices, empty queries, and rows that look like
# a ReadyForQuery across a column boundary.
SCRIPT = [
    "SELECT 'xZ', 'IIIII'",
    "SELECT 1; SELECT 1/0; SELECT 2",
    "",
    "BEGIN",
    "SELECT 'in'",
    "SELECT 1/0",
    "SELECT 1",
    "ROLLBACK",
    "BEGIN; SET LOCAL application_name = 'local'; SELECT 'T'",
    "COMMIT",
    "SET application_name = 'torn'",
    "SELECT set_config('application_name', 'viaselect', false)",
    "SET ROLE trust_user",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION trust_user",
    "RESET SESSION AUTHORIZATION",
    "SET DateStyle = 'German'",
    "RESET ALL",
    "DO $$BEGIN RAISE NOTICE 'before'; PERFORM set_config('application_name', 'indo', false); END$$",
    "LISTEN hostile30; NOTIFY hostile30, 'Z'; SELECT 'after'",
    "UNLISTEN *",
    "SELECT 1; SET application_name = 'multi'; SELECT 1/0; SET application_name = 'never'",
    "BEGIN; SELECT 1/0",
    "ROLLBACK",
    "RESET ALL",  # back where it started: the script runs again on the same session
]


REPEAT = 16  # each answer's cut points, taken in turn, one per run of the script


async def run_script(raw: Raw, script: list[str], repeat: int) -> list[list[Message]]:
    out = []
    for _ in range(repeat):
        for sql in script:
            raw.send(query(sql))
            out.append(normal(await raw.until_ready()))
        for fake in FAKE:
            raw.send(fake_rows(fake))
            out.append(normal(await raw.until_ready()))
    return out


@pytest.mark.parametrize("cache", [False, True], ids=["pass", "cache"])
async def test_every_cut_of_every_answer_reads_as_a_direct_connection(
    pg: PgServer, tmp_path: Path, cache: bool
) -> None:
    """Each answer of the script cut at successive byte boundaries (2 or 3 pieces): the client
    gets what a direct connection gets, and after each answer the session knows no request
    unanswered and the transaction status the answer ends in; its settings follow."""
    async with serving(pg, tmp_path, cache=cache) as proxy:
        direct = await Raw.connect(pg.port)
        via = await Raw.connect(proxy.port)
        try:
            session = session_of(proxy, await raw_pid(via))
            assert session.passing is not cache
            for three in (False, True):
                expected = await run_script(direct, SCRIPT, 1)
                tear = Tear(session, Sweep(three, near_frames=True))
                got = await run_script(via, SCRIPT, REPEAT)
                assert got == expected * REPEAT
                tear.cut = None
                assert tear.wrong == []
            for name, value in dict(await_params(expected)).items():
                assert session.state.server_params.get(name) == value, name
        finally:
            await via.close()
            await direct.close()


def await_params(answers: list[list[Message]]) -> list[tuple[str, str]]:
    out = []
    for msgs in answers:
        for t, body in msgs:
            if t == b"S":
                out.append(pgwire.parse_parameter_status(body))
    return out


@pytest.mark.parametrize("cache", [False, True], ids=["pass", "cache"])
async def test_fake_ready_rows_at_every_cut(pg: PgServer, tmp_path: Path, cache: bool) -> None:
    """Binary bytea rows ending in each ReadyForQuery status: every cut of the answer, both
    walks (in a transaction too: the status the row mimics differs from the real one)."""
    async with serving(pg, tmp_path, cache=cache) as proxy:
        via = await Raw.connect(proxy.port)
        try:
            session = session_of(proxy, await raw_pid(via))
            tear = Tear(session, Sweep())
            for fake in FAKE:
                for begin in (False, True):
                    if begin:
                        via.send(query("BEGIN"))
                        await via.until_ready()
                    for _ in range(75):
                        via.send(fake_rows(fake))
                        msgs = await via.until_ready()
                        assert rawpg.rows(msgs) == [[fake], [fake]] and kinds(msgs) == b"12DDCZ"
                    if begin:
                        via.send(query("COMMIT"))
                        await via.until_ready()
            assert len(tear.answers) >= 450 and tear.wrong == []
        finally:
            await via.close()


@pytest.mark.parametrize("cache", [False, True], ids=["pass", "cache"])
async def test_pipelined_syncs_in_one_read_at_every_cut(pg: PgServer, tmp_path: Path, cache: bool) -> None:
    """Three Syncs in one write, their answers gathered into one origin read and cut at
    every boundary: three answers, in order, and nothing counted as outstanding after."""
    async with serving(pg, tmp_path, cache=cache) as proxy:
        via = await Raw.connect(proxy.port)
        try:
            session = session_of(proxy, await raw_pid(via))
            batch = b"".join(
                parse("", sql) + rawpg.bind("", "") + execute() + SYNC
                for sql in ("SELECT 'one' WHERE random() >= 0", "SELECT 1/0", "SELECT 'three' WHERE random() >= 0")
            )
            tear = Tear(session, Sweep())
            for _ in range(120):
                via.send(batch)
                a, b, c = (await via.until_ready(), await via.until_ready(), await via.until_ready())
                assert (rawpg.rows(a), kinds(b), rawpg.rows(c)) == ([[b"one"]], b"1EZ", [[b"three"]])
                assert session.inflight == 0
            assert tear.answers and tear.wrong == []
        finally:
            await via.close()


async def test_copy_in_and_out_torn(pg: PgServer, tmp_path: Path) -> None:
    """COPY TO STDOUT and FROM STDIN through the pass-through with the origin's reads cut."""
    table = unique("adv_copy")
    async with (
        serving(pg, tmp_path, cache=False) as proxy,
        await psycopg.AsyncConnection.connect(proxy.url(), autocommit=True) as conn,
    ):
        session = session_of(proxy, conn.info.backend_pid)
        tear = Tear(session, Sweep(three=True))
        await conn.execute(f"CREATE TABLE {table} (id int, v text)")
        try:
            for round_ in range(20):
                async with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                    for i in range(5):
                        await copy.write_row((round_ * 5 + i, f"Z\x05I{i}"))
                out = bytearray()
                async with conn.cursor().copy(f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT") as copy:
                    async for chunk in copy:
                        out += chunk
                assert out.count(b"\n") == (round_ + 1) * 5
                assert (session.inflight, session.state.tx_status) == (0, b"I")
            assert tear.wrong == []
        finally:
            await conn.execute(f"DROP TABLE {table}")


async def test_large_results_and_notifications_untouched(pg: PgServer, tmp_path: Path) -> None:
    """MBs over many reads (the answer's last read ends in its ReadyForQuery), and
    notifications arriving alone between answers: same bytes as a direct connection."""
    async with serving(pg, tmp_path, cache=False) as proxy:
        via = await asyncpg.connect(**proxy.dsn())
        direct = await asyncpg.connect(**pg.dsn("postgres", "app"))
        try:
            for sql in (
                "SELECT repeat('Z', 3000000) || E'\\x05I'",
                "SELECT i, md5(i::text) FROM generate_series(1, 60000) i",
                "SELECT decode(repeat('5a0000000549', 300000), 'hex')",
            ):
                a, b = await via.fetch(sql), await direct.fetch(sql)
                assert hashlib.sha256(repr(a).encode()).digest() == hashlib.sha256(repr(b).encode()).digest()
            got: asyncio.Queue[str] = asyncio.Queue()
            await via.add_listener("hostile30", lambda *args: got.put_nowait(args[3]))
            for i in range(5):
                await direct.execute(f"NOTIFY hostile30, 'n{i}'")
                assert await asyncio.wait_for(got.get(), 5) == f"n{i}"
                assert await via.fetchval("SELECT $1::int", i) == i
            session = session_of(proxy, via.get_server_pid())
            assert (session.inflight, session.state.tx_status) == (0, b"I")
        finally:
            await via.close()
            await direct.close()


async def test_cancel_then_next_answer(pg: PgServer, tmp_path: Path) -> None:
    """A cancelled statement through the pass-through: the error, then the next answer."""
    async with serving(pg, tmp_path, cache=False) as proxy:
        via = await asyncpg.connect(**proxy.dsn())
        try:
            task = asyncio.ensure_future(via.fetchval("SELECT pg_sleep(5)"))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await via.fetchval("SELECT 42") == 42
            session = session_of(proxy, via.get_server_pid())
            assert (session.inflight, session.state.tx_status) == (0, b"I")
        finally:
            await via.close()


async def test_search_path_moved_under_torn_answers_then_cached_read(env: Env) -> None:
    """Cache mode, the origin's answers cut at every boundary: a search_path moved by SET,
    by set_config() in a SELECT and by a function, then the same read: as direct."""
    s1, s2 = unique("adv_p1"), unique("adv_p2")
    await env.admin(f"CREATE SCHEMA {s1}", f"CREATE SCHEMA {s2}",
                    f"CREATE TABLE {s1}.t (v int)", f"INSERT INTO {s1}.t VALUES (1)",
                    f"CREATE TABLE {s2}.t (v int)", f"INSERT INTO {s2}.t VALUES (2)",
                    f"CREATE FUNCTION {s1}.go(p text) RETURNS int LANGUAGE sql AS "
                    "$$ SELECT length(set_config('search_path', p, false)) * 0 $$",
                    f"GRANT USAGE ON SCHEMA {s1}, {s2} TO PUBLIC",
                    f"GRANT SELECT ON {s1}.t, {s2}.t TO PUBLIC")  # fmt: skip
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {s1} CASCADE", f"DROP SCHEMA IF EXISTS {s2} CASCADE")
    twin = await env.twin()
    assert isinstance(env.proxy, CachingProxy)
    pid = await twin.via.backend_pid()
    session = session_of(env.proxy, pid)
    tear = Tear(session, Sweep(three=True))
    read = "SELECT v FROM t"
    for i in range(8):
        first, second = (s1, s2) if i % 2 == 0 else (s2, s1)
        await twin.both(f"SET search_path = {first}")
        await twin.probe(read, require_hit=False)
        await twin.both(f"SET search_path = {second}")
        await twin.check(read, why=f"after SET search_path = {second}")
        await twin.both(f"SELECT set_config('search_path', '{first}', false)")
        await twin.check(read, why="after set_config() in a SELECT")
        await twin.both(f"SELECT {s1}.go('{second}')")
        await twin.check(read, why="after a function set search_path")
        await twin.both("BEGIN", f"SET LOCAL search_path = {first}")
        await twin.check(read, why="SET LOCAL inside a transaction")
        await twin.both("ROLLBACK")
        await twin.check(read, why="after the transaction rolled back")
    assert tear.wrong == []


async def _tear_on_loop(running: RunningProxy, pid: int, cut: Cut) -> Tear:
    (session,) = [s for s in running.service.server.sessions if s.origin_key and s.origin_key[0] == pid]
    return Tear(session, cut)


def test_uvloop_pass_through_every_cut_and_psql(pg: PgServer) -> None:
    """What `neonpoly serve --no-cache` runs (uvloop, the origin over TLS): the script's
    answers cut at their frames' starts and last six bytes, then psql's own script (errors
    mid-way, \\copy both ways, a failed transaction rolled back) as psql straight to the origin
    prints it."""
    running = start_proxy(pg, loop="uvloop")
    try:

        async def script() -> tuple[list[list[Message]], list[list[Message]], list[str]]:
            direct = await Raw.connect(pg.port)
            via = await Raw.connect(running.port)
            try:
                pid = await raw_pid(via)
                tear = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(_tear_on_loop(running, pid, Sweep(near_frames=True)), running.loop)
                )
                expected = await run_script(direct, SCRIPT, 1)
                got = await run_script(via, SCRIPT, REPEAT)
                assert len(tear.answers) >= len(SCRIPT) * REPEAT  # the cuts were made
                return expected * REPEAT, got, tear.wrong
            finally:
                await via.close()
                await direct.close()

        expected, got, wrong = asyncio.run(script())
        assert got == expected and wrong == []
        table = unique("adv_psql")
        lines = [
            f"CREATE TEMP TABLE {table} (id int, v text);",
            f"\\copy {table} FROM PROGRAM 'printf \"1\\tZ\\n2\\tI\\n\"'",
            f"\\copy {table} TO STDOUT",
            "SELECT 1 AS a; SELECT 1/0; SELECT 2;",
            "BEGIN;", "SELECT 1/0;", "SELECT 'lost';", "ROLLBACK;",
            "SET application_name = 'psql_torn';", "SHOW application_name;",
            f"SELECT count(*), string_agg(v, ',' ORDER BY id) FROM {table};",
            ";", "\\echo :LAST_ERROR_SQLSTATE",
        ]  # fmt: skip

        def psql(url: str) -> list[str]:
            proc = subprocess.run(
                ["psql", url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0"],
                input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30,
                env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
            )  # fmt: skip
            return [line.split(":  ")[-1] for line in (proc.stdout + proc.stderr).splitlines()]

        printed = psql(running.url())
        assert "1\tZ" in printed and "division by zero" in printed and "psql_torn" in printed
        assert printed == psql(pg.url("postgres", "app"))
    finally:
        running.close()


async def test_client_requests_torn_at_every_byte_are_counted_once(pg: PgServer, tmp_path: Path) -> None:
    """The client's writes (a pipeline of three Syncs and two simple Queries) handed to the
    session cut at every byte boundary: right after each write, the session counts exactly
    the requests it holds whole, and every answer comes back in order."""
    async with serving(pg, tmp_path, cache=False) as proxy:
        via = await Raw.connect(proxy.port)
        try:
            session = session_of(proxy, await raw_pid(via))
            transport: Any = session.client
            protocol: Any = transport.get_protocol()  # ClientSide: its data_received is swapped
            deliver = session.client_data
            counted: list[tuple[int, int]] = []
            cut = Sweep()

            gathered = bytearray()

            def received(data: bytes) -> None:
                gathered.extend(data)  # one write may come in two reads: cut whole writes
                frames, used = pgwire.scan_frames(gathered, allowed=pgwire.FRONTEND_TYPES)
                if used != len(gathered):
                    return
                data = bytes(gathered)
                gathered.clear()
                ends = sum(1 for mtype, _, _ in frames if mtype in (ord("Q"), ord("S"), ord("F")))
                before = session.inflight
                for piece in cut(data):
                    deliver(piece)
                counted.append((session.inflight - before, ends))

            protocol.data_received = received
            transport.set_protocol(protocol)
            batch = b"".join(parse("", f"SELECT {i}") + rawpg.bind("", "") + execute() + SYNC for i in range(3))
            batch += query("SELECT 'q1'; SELECT 1/0") + query("")
            for _ in range(len(batch)):
                via.send(batch)
                answers = [await via.until_ready() for _ in range(5)]
                assert [rawpg.rows(a) for a in answers[:3]] == [[[b"0"]], [[b"1"]], [[b"2"]]]
                assert [kinds(a) for a in answers[3:]] == [b"TDCEZ", b"IZ"]
            assert session.inflight == 0
            assert counted == [(5, 5)] * len(counted) and len(counted) >= len(batch)
        finally:
            await via.close()

"""Hostile review of the lookup bypass (cache/bypass.py): a template whose lookups never hit
stops being looked up (its reads forwarded as pass-through forwards them), 1 read in
`probe_every` still takes the full path, and the bypass ends at a hit or when it expires.

Each case puts the route's cache on a small bypass (a window of 4 misses, a probe every 4th
read, a clock of its own) so that the transitions happen in a few dozen reads: entries
stored before the template was bypassed, writes while it is bypassed, the template looked
up again; every answer through neonpoly is compared with a direct connection's, and the
cases prove the transitions happened (the template bypassed, hits after it ended).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from neonpoly.cache.bypass import Bypass
from neonpoly.cache.entry import CacheEntry
from neonpoly.cache.query_cache import QueryCache
from tests.adversarial.batch_memo import FLUSH, Pair, bind, lone, normal, parse, prepared
from tests.adversarial.harness import Env, Twin, hits
from tests.adversarial.rawpg import SYNC, describe_portal, execute, query
from tests.adversarial.test_31_hostile_recapture import cache_of, world
from tests.pgharness import PgServer

pytestmark = pytest.mark.skipif(
    __import__("os").environ.get("NEONPOLY_TEST_WORKERS", "1") not in ("", "1"),
    reason="sets the in-process cache's bypass window",
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def bypassing(pg: PgServer, tmp_path: Path) -> AsyncIterator[tuple[Env, QueryCache, Clock]]:
    async with world(pg, tmp_path) as env:
        cache = cache_of(env)
        clock = Clock()
        cache.bypass = Bypass(clock, window=4, probe_every=4, bypass_for=5.0)
        yield env, cache, clock


def bypassed(cache: QueryCache) -> int:
    return cache.bypass.sizes()["bypassed"]


async def cold(twin: Twin, cache: QueryCache, sql: str, keys: range) -> None:
    """Reads of keys never read before (never hit) until the template is bypassed."""
    if bypassed(cache):
        return
    for key in keys:
        await twin.check(sql, (key,) if "$1" in sql or "%s" in sql else (), why=f"cold key {key}")
        if bypassed(cache):
            return
    raise AssertionError(f"not bypassed after {len(keys)} cold reads: {cache.bypass.sizes()}")


async def checks(twin: Twin, sql: str, keys: tuple[int, ...], why: str, times: int = 6) -> bool:
    """Every key read `times` times (probes among them), each equal to the origin's; True
    when any of them was a cache hit."""
    hit = False
    for _ in range(times):
        for key in keys:
            before = hits(twin.env.proxy)
            await twin.check(sql, (key,), why=f"{why}: key {key}")
            hit = hit or hits(twin.env.proxy) > before
    return hit


# --- entries stored before the bypass, writes while bypassed, the template looked up again --


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_writes_while_bypassed_evict_what_was_stored_before(pg: PgServer, tmp_path: Path, driver: str) -> None:
    """Entries of keys 1..4 stored and hit; cold keys bypass the template; writes through
    neonpoly while it is bypassed (keyed, table-wide, in transactions committed and rolled
    back); then the bypass ends (expiry, then a probe's hit): no entry a write made stale is
    served, and what was not written is served again."""
    async with bypassing(pg, tmp_path) as (env, cache, clock):
        t = await env.table("adv_byp", "id int PRIMARY KEY, v text", "(generate_series(1, 300), 'v')")
        twin = await env.twin(driver=driver)  # type: ignore[arg-type]
        param = "$1" if driver == "asyncpg" else "%s"
        sql = f"SELECT v || id FROM {t} WHERE id = {param}"
        fresh = iter(range(100, 300))

        async def bypass_again() -> None:
            await cold(twin, cache, sql, range(next(fresh), 300))
            for _ in range(8):
                next(fresh)

        for key in (1, 2, 3, 4, 5, 6):
            await twin.probe(sql, (key,))  # stored and provably served
        # Each write is sent while the template is bypassed (its entries stored before).
        await bypass_again()
        await twin.via.run(f"UPDATE {t} SET v = 'k1' WHERE id = 1")
        await checks(twin, sql, (1, 2), "after a keyed write while bypassed")
        await bypass_again()
        await twin.via.run("BEGIN")
        await twin.via.run(f"UPDATE {t} SET v = 'rolled' WHERE id = 2")
        assert await twin.via.rows(f"SELECT v FROM {t} WHERE id = 2") == [("rolled",)]
        await twin.via.run("ROLLBACK")
        await checks(twin, sql, (2, 3), "after a rolled back write while bypassed")
        await bypass_again()
        await twin.via.run("BEGIN")
        await twin.via.run(f"UPDATE {t} SET v = 'k3' WHERE id = 3")
        await twin.via.run("COMMIT")
        assert bypassed(cache)
        clock.now += 10  # the bypass expires: looked up again, fresh
        hit = await checks(twin, sql, (1, 2, 3, 4), "after the bypass expired", times=4)
        assert hit, "the template must be looked up (and hit) again once the bypass expired"
        await bypass_again()
        await twin.via.run(f"UPDATE {t} SET v = v || '+' WHERE id % 2 = 0")
        await twin.via.run(f"UPDATE {t} SET v = 'k5' WHERE id = 5")
        # Probes of written keys miss; a probe's hit of an unwritten key ends the bypass.
        await checks(twin, sql, (5, 6), "after table-wide and keyed writes while bypassed", times=8)
        assert await checks(twin, sql, (1, 4, 5, 6), "looked up again after a probe's hit"), "no hit after the bypass"


async def test_sessions_of_other_identities_share_a_bypassed_template(pg: PgServer, tmp_path: Path) -> None:
    """Two search_paths, one template text: session A (schema a) reads cold keys until the
    template is bypassed, session B (schema b, its own rows) hits and probes it; writes in
    each schema while bypassed: neither session ever reads the other's rows nor a stale one."""
    async with bypassing(pg, tmp_path) as (env, cache, clock):
        schemas = [f"adv_byp_{n}" for n in ("a", "b")]
        for schema in schemas:
            await env.admin(
                f"CREATE SCHEMA {schema}",
                f"CREATE TABLE {schema}.items (id int PRIMARY KEY, v text)",
                f"INSERT INTO {schema}.items SELECT i, '{schema}:' || i FROM generate_series(1, 60) i",
                f"GRANT ALL ON SCHEMA {schema} TO PUBLIC",
            )
            env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        a = await env.twin(env.login(options=f"-c search_path={schemas[0]}"))
        b = await env.twin(env.login(options=f"-c search_path={schemas[1]}"))
        sql = "SELECT v FROM items WHERE id = %s"
        for twin in (a, b):
            await twin.probe(sql, (1,))
            await twin.probe(sql, (2,))
        await cold(a, cache, sql, range(10, 40))
        await checks(b, sql, (1, 2), "session B while A bypassed the template")
        await cold(a, cache, sql, range(40, 60))
        await b.via.run("UPDATE items SET v = 'b-new' WHERE id = 1")
        await a.via.run("UPDATE items SET v = 'a-new' WHERE id = 2")
        for twin, who in ((a, "A"), (b, "B")):
            await checks(twin, sql, (1, 2), f"session {who} after writes while bypassed")
        clock.now += 10
        hit = False
        for twin, who in ((a, "A"), (b, "B"), (a, "A again")):
            hit = await checks(twin, sql, (1, 2), f"session {who} after the bypass expired") or hit
        assert hit, "no hit once the bypass ended"


# --- what the stats say ---------------------------------------------------------------------


async def test_the_stats_count_every_read_once_by_what_happened_to_it(pg: PgServer, tmp_path: Path) -> None:
    """Counts by status across the transitions: every read counted once; `miss` = the reads
    looked up that missed and the reads not looked up (`Bypass.passed`), `hit` = the hits;
    the template's last status and reason say what happened to its last read."""
    async with bypassing(pg, tmp_path) as (env, cache, _clock):
        t = await env.table("adv_byp_s", "id int PRIMARY KEY, v text", *(f"({i}, 'v{i}')" for i in range(1, 80)))
        twin = await env.twin()
        looked = 0
        get = cache.store.get

        def counted(key: bytes) -> CacheEntry | None:
            nonlocal looked
            looked += 1
            return get(key)

        cache.store.get = counted  # type: ignore[method-assign]
        sql = f"SELECT v FROM {t} WHERE id = %s"

        def template() -> tuple[dict[str, int], str, str | None]:
            (tpl,) = [x for x in cache.stats.snapshot().templates if f"FROM {t} WHERE" in x.template]
            return dict(tpl.by_status), tpl.last_status, tpl.last_reason

        reads = 0
        for key in range(1, 41):  # cold: bypassed after the first window, probed
            await twin.check(sql, (key,))
            reads += 1
        counts, last, reason = template()
        assert bypassed(cache) and cache.bypass.passed > 0, counts
        assert counts == {"miss": reads} and cache.bypass.passed == reads - looked, (counts, looked, reads)
        ids = [tid for tid in cache.bypass._scores if cache.bypass.explain(tid)]
        assert len(ids) == 1
        assert last == "miss"
        if reason is not None:  # the last read not looked up (else a probe's plain miss)
            assert reason == cache.bypass.explain(ids[0])
        # Warm key 1 (its probes admit and store it), then hit: the bypass ends, counted right.
        hit_seen = 0
        for _ in range(40):
            before = hits(env.proxy)
            await twin.check(sql, (1,))
            reads += 1
            hit_seen += hits(env.proxy) - before
        counts, last, reason = template()
        assert hit_seen and not bypassed(cache)
        assert sum(counts.values()) == reads, (counts, reads)
        assert counts.get("hit", 0) == hit_seen, (counts, hit_seen)
        assert (last, reason) == ("hit", None)
        totals = cache.stats.snapshot().totals
        assert totals.hit_rate == pytest.approx(counts["hit"] / (counts["hit"] + counts["miss"]))


# --- raw frames: the prepared-batch shortcut, pipelines, errors, transactions, Flush -----


async def test_bypassed_lone_batches_in_pipelines_errors_and_transactions(pg: PgServer, tmp_path: Path) -> None:
    """A prepared statement whose lone batches (`_lone_batch`) are bypassed, sent in one read
    with writes, failing Binds, transactions (also failed ones) and a Flush, byte for byte
    as the origin answers; then the bypass expires and the entries stored before it, or
    since, are served only while no write made them stale."""
    async with bypassing(pg, tmp_path) as (env, cache, clock):
        t = await env.table("adv_byp_r", "id int PRIMARY KEY, v text", "(generate_series(1, 300), 'v')")
        pair = await Pair.open(env)
        await prepared(pair, parse("s", f"SELECT v || id FROM {t} WHERE id = $1", (23,)))

        def s(key: int) -> bytes:
            return lone("s", str(key).encode())

        for key in (1, 2, 3, 4):
            await pair.shortcut_hit(s(key), why=f"s({key})")
        fresh = iter(range(100, 300))

        async def bypass_again() -> None:
            for key in fresh:
                if bypassed(cache):
                    return
                await pair.both(s(key), why=f"cold s({key})")

        async def alone(*frames: bytes, readies: int) -> tuple[list[str], list[bytes]]:
            """Sent through neonpoly only (the double's session would race its writes): the
            values read and the errors' SQLSTATEs, in order."""
            pair.forget_hit_memos()
            pair.via.send(b"".join(frames))
            got = []
            for _ in range(readies):
                got += normal(await pair.via.until_ready())
            return [body[6:].decode() for kind, body in got if kind == b"D"], [b for k, b in got if k == b"E"]

        await bypass_again()
        got = await alone(s(1), query(f"UPDATE {t} SET v = 'w' WHERE id = 1"), s(1), s(2), readies=4)
        assert got == (["v1", "w1", "v2"], []), "a bypassed read, a write and reads pipelined"
        await bypass_again()
        bad = bind("s", (b"nope",)) + execute() + SYNC
        got = await alone(s(2), bad, s(2), query(f"UPDATE {t} SET v = 'w' WHERE id = 2"), s(2), readies=5)
        assert got == (["v2", "v2", "w2"], [b"22P02"]), "a failing Bind between bypassed reads"
        await bypass_again()
        got = await alone(query("BEGIN"), s(3), query(f"UPDATE {t} SET v = 'w' WHERE id = 3"), s(3),
                          query("COMMIT"), s(3), readies=6)  # fmt: skip
        assert got == (["v3", "w3", "w3"], []), "reads around a write in a transaction"
        await bypass_again()
        got = await alone(query("BEGIN"), query("SELECT 1/0"), s(4), query("ROLLBACK"), s(4), readies=5)
        assert got == (["v4"], [b"22012", b"25P02"]), "a read in a failed transaction"
        await bypass_again()
        flushed = bind("s", (b"4",)) + describe_portal() + execute() + FLUSH
        got = await alone(flushed, SYNC, query(f"UPDATE {t} SET v = 'w' WHERE id = 4"), s(4), readies=3)
        assert got == (["v4", "w4"], []), "a Flush, its Sync, a write, a read"
        # The shortcut passed bypassed reads: cold reads after the bypass, all taken by it.
        taken, passed = pair.taken[0], cache.bypass.passed
        for key in range(295, 300):
            await pair.both(s(key), why=f"cold s({key}) while bypassed")
        now = cache.bypass.passed
        assert pair.taken[0] == taken + 5 and now > passed, (now, passed)
        clock.now += 10
        served = hits(env.proxy)
        for _ in range(4):
            for key in (1, 2, 3, 4, 5):
                await pair.both(s(key), why=f"s({key}) after the bypass expired")
        assert hits(env.proxy) > served, "no hit once the bypass expired"


async def test_a_bypassed_read_that_changes_the_session_is_followed(pg: PgServer, tmp_path: Path) -> None:
    """A view of a bypassed template is redefined (through neonpoly) to call a function that
    moves the search_path: the bypassed read runs it, and the session's next read of an
    unqualified table answers from the new path, not from an entry of the old one."""
    async with bypassing(pg, tmp_path) as (env, cache, _clock):
        cache.bypass = Bypass(cache.bypass.clock, window=4, probe_every=1000)  # no probe: passed
        s1, s2 = "adv_byp_p1", "adv_byp_p2"
        t = await env.table("adv_byp_v", "id int PRIMARY KEY, v text", "(generate_series(1, 100), 'v')")
        for schema, word in ((s1, "one"), (s2, "two")):
            await env.admin(
                f"CREATE SCHEMA {schema}",
                f"CREATE TABLE {schema}.items (id int PRIMARY KEY, v text)",
                f"INSERT INTO {schema}.items VALUES (1, '{word}')",
                f"GRANT ALL ON SCHEMA {schema} TO PUBLIC",
            )
            env.on_cleanup(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        view, fn = f"{t}_vw", f"{t}_fn"
        await env.admin(f"CREATE VIEW public.{view} AS SELECT id, v FROM public.{t}")
        await env.admin(
            f"CREATE FUNCTION public.{fn}(x text) RETURNS text LANGUAGE plpgsql VOLATILE AS "
            f"$$ BEGIN PERFORM set_config('search_path', '{s2}, public', false); RETURN x; END $$"
        )
        env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}", f"DROP FUNCTION IF EXISTS public.{fn}(text)")
        twin = await env.twin(env.login(options=f"-c search_path={s1},public"))
        items = "SELECT v FROM items WHERE id = 1"
        await twin.probe(items)
        sql = f"SELECT v FROM {view} WHERE id = %s"
        await cold(twin, cache, sql, range(1, 60))
        await twin.via.run(f"CREATE OR REPLACE VIEW public.{view} AS SELECT id, public.{fn}(v) AS v FROM public.{t}")
        await twin.check("SELECT 2")  # the session's identity learned again after the DDL
        await twin.probe(items)  # stored again (the DDL evicted everything), served
        assert await twin.via.rows(sql, (90,)) == [("v",)]
        assert await twin.direct.rows(sql, (90,)) == [("v",)]
        (tpl,) = [x for x in cache.stats.snapshot().templates if f"FROM {view} WHERE" in x.template]
        # Sent bypassed (not looked up) while the DDL had the view unknown; once the catalog
        # said it runs code it counts as its repeats will: volatile, not a miss.
        assert tpl.last_status == "volatile" and "runs code" in (tpl.last_reason or ""), tpl
        await twin.check(items, why="after a bypassed read moved the search_path")
        await twin.check(items, why="again")


async def test_a_batch_led_by_a_bypassed_template_does_not_lend_its_reason(pg: PgServer, tmp_path: Path) -> None:
    """A batch of two Executes, led by a bypassed template's: it is not looked up, and its
    second statement's template (whose own lookups hit) is counted a miss with a reason of
    its own, not the leader's hit rate."""
    async with bypassing(pg, tmp_path) as (env, cache, _clock):
        t = await env.table("adv_byp_b", "id int PRIMARY KEY, v text", "(generate_series(1, 100), 'v')")
        pair = await Pair.open(env)
        await prepared(pair, parse("a", f"SELECT v || id FROM {t} WHERE id = $1", (23,)),
                       parse("b", f"SELECT id FROM {t} WHERE v = $1 ORDER BY id LIMIT 1", (25,)))  # fmt: skip
        await pair.shortcut_hit(lone("b", b"v"), why="b")
        for key in range(10, 60):
            if bypassed(cache):
                break
            await pair.both(lone("a", str(key).encode()), why="cold a")
        both = bind("a", (b"70",)) + execute() + bind("b", (b"v",)) + execute() + SYNC
        await pair.both(both, why="a batch led by the bypassed template")
        (a,) = [x for x in cache.stats.snapshot().templates if "SELECT v ||" in x.template]
        (b,) = [x for x in cache.stats.snapshot().templates if "SELECT id FROM" in x.template]
        assert a.last_status == b.last_status == "miss", (a, b)
        assert (a.last_reason or "").startswith("not looked up: 0.0% of its last"), a.last_reason
        assert (b.last_reason or "").startswith("not looked up: in a batch led by"), b.last_reason

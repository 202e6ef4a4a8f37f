"""Attacks on the shared invalidation plane (plane.py's rules 1-5): each test makes a write
through one node return to its client and then reads through another, and fails if that read
is answered from a cache the write made stale (or checks the rule the stale read hangs on).

Links that fail in ways other than closing (`CuttableLink.freeze`, `drop_replies_after`)
stand in for a slow or half-broken network; Redis keys are deleted under live nodes as an
operator (or an evicting `maxmemory-policy`) would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from redis.asyncio import Redis

from neonpoly.freshness.plane import PlaneSettings
from neonpoly.freshness.redis_origin import FollowedOrigin
from neonpoly.freshness.redis_plane import RedisPlane
from tests.freshness.conftest import FeedProxy, plane_node, until
from tests.freshness.redisharness import CuttableLink, RedisServer
from tests.freshness.test_plane_partition import _origin, _serving, _until_hit
from tests.pgharness import PgServer


async def _tables(pg: PgServer, count: int = 1) -> list[tuple[str, str]]:
    out = []
    async with await psycopg.AsyncConnection.connect(pg.url("postgres", "app"), autocommit=True) as direct:
        for _ in range(count):
            table = f"attack_{uuid.uuid4().hex[:8]}"
            await direct.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            await direct.execute(f"INSERT INTO {table} VALUES (1, 0)")
            out.append((table, f"SELECT v FROM {table} WHERE id = 1"))
    return out


def _plane(node: FeedProxy) -> RedisPlane:
    plane = node.service.plane
    assert plane is not None
    return plane


def _followed(node: FeedProxy) -> FollowedOrigin:
    return _plane(node)._origins[node.origin_key]


async def _until_async(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


async def _redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _redis(server: RedisServer) -> Redis:
    return Redis.from_url(server.url, protocol=2, decode_responses=True)


async def _both_up(a: FeedProxy, b: FeedProxy) -> None:
    await until(lambda: _serving(a) and _serving(b) and len(_origin(b)[0].nodes) == 2, "both nodes up")


async def test_two_nodes_under_one_name_never_serve_a_write_of_the_other_stale(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`--node-id` given twice, or the default HOST:PORT on hosts that share a hostname (compose
    replicas with `hostname:` set): B took A's entries for its own and never applied them, and
    A's writes waited for nobody. Now the second process under a live name is refused (it
    passes through, saying why)."""
    [(table, sql)] = await _tables(pg_logical)
    # A long heartbeat: under load A could miss its 3 s one, lose the name to B and then be
    # refused itself, which is the plane working, not what this test proves.
    twin = {"node": "twin", "heartbeat": 30.0}
    async with plane_node(pg_logical, tmp_path / "a", redis_server.url, plane=twin) as a:
        await until(lambda: _serving(a), "A up")
        async with plane_node(pg_logical, tmp_path / "b", redis_server.url, plane=twin) as b:
            writer = await asyncpg.connect(**a.dsn())
            reader = await asyncpg.connect(**b.dsn())
            try:
                for _ in range(3):  # B stores the row and may answer it from its cache
                    assert await reader.fetchval(sql) == 0
                await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
                mark = _followed(a).cursor
                assert mark is not None
                # B read past A's entry and is caught up again, or B is refused the name.
                await until(lambda: ((c := _followed(b).cursor) is not None and c.last_n >= mark.last_n
                                     and _serving(b)) or "holds the name" in _origin(b)[0].reason, "B read A's entry")
                assert await reader.fetchval(sql) == 1, "B answered the row A's returned write made stale"
                assert _serving(a), "the first node keeps its name"
            finally:
                await writer.close()
                await reader.close()


async def test_a_twin_that_stops_leaves_the_holder_registered(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A refused twin rejoins now and then (its name is checked on the round after), so it may
    be `up` when it stops. Its goodbye (ZREM by name) would then take the holder off the
    node lists until the holder's next check, and other nodes would stop waiting for its
    acknowledgements meanwhile. A goodbye is said only by the process the name is registered to."""
    twin = {"node": "twin", "heartbeat": 40.0, "check": 20.0, "limit": 19.0, "hold": 19.5, "block": 0.2}
    redis = _redis(redis_server)
    try:
        async with plane_node(pg_logical, tmp_path / "a", redis_server.url, plane=twin) as a:
            await until(lambda: _serving(a), "A up")
            origin_nodes = _followed(a).nodes
            async with plane_node(pg_logical, tmp_path / "b", redis_server.url, plane=twin) as b:
                await until(lambda: "holds the name" in _plane(b).reason, "B refused")
                _plane(b).state = "up"  # as between its rejoin and the round that refuses it again
            # A's check is 20 s away: nothing but B's stop could have changed the lists.
            assert await redis.zscore("neonpoly:nodes", "twin") is not None, "B's stop unregistered A"
            assert await redis.zscore(origin_nodes, "twin") is not None
    finally:
        await redis.aclose()


def _shortest_heartbeat(limit: float, check: float, block: float, hold: float) -> float:
    """The shortest heartbeat the plane accepts with these timings."""
    for heartbeat in (limit, check + limit, check + limit + 0.25, check + limit + 0.5):
        try:
            PlaneSettings("redis://x", heartbeat=heartbeat, limit=limit, check=check, block=block, hold=hold)
        except ValueError:
            continue
        return heartbeat
    raise AssertionError("no heartbeat accepted")


async def test_a_node_whose_registration_expired_serves_no_hit_a_write_made_stale(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Rule 3 says a node's gate closes before its heartbeat expires, so a writer may stop
    waiting for it. A round proves the gate up to `check` after the last registration, for
    `limit` more: the heartbeat must outlast check + limit, not just limit. Here B's link goes
    silent just after a proof well past its last registration; its registration expires while
    its gate is open, A's next write waits for nobody, and B answers from its cache."""
    timings = {"limit": 1.5, "check": 1.4, "block": 0.1, "hold": 2.0}
    plane: dict[str, Any] = {**timings, "heartbeat": _shortest_heartbeat(**timings)}
    [(table, sql)] = await _tables(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    redis = _redis(redis_server)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url, plane={**plane, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", link.url, plane={**plane, "node": "node-b"}) as b,
    ):
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            await _both_up(a, b)
            await _until_hit(reader, b, sql, 0)
            pb = _plane(b)
            gate = _followed(b).gate
            # A proof at least 0.6 s after B's last registration, B's gate open: then silence.
            await until(lambda: gate.open and gate.proven - pb._check_sent >= 0.6, "B proved well past its check")
            link.freeze()
            nodes = f"neonpoly:o:{a.origin_key}:nodes"

            async def expired() -> bool:
                score = await redis.zscore(nodes, "node-b")
                return score is None or score <= await _redis_ms(redis)

            await _until_async(expired, "B's registration expired")
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
            assert await reader.fetchval(sql) == 1, "B served a hit the returned write made stale"
        finally:
            link.thaw()
            await writer.close()
            await reader.close()
            await redis.aclose()
    await link.cut()


async def test_a_sequence_that_starts_over_does_not_count_old_acknowledgements(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The seq key deleted (DEL, or evicted by an allkeys-* maxmemory-policy) while the epoch
    stays: INCR starts at 1 again, and A took B's acknowledgement of entry 3 for one of entry
    1: its write returned at once while B, silent, still had its gate open."""
    plane: dict[str, Any] = {"limit": 3.0, "hold": 3.5, "heartbeat": 8.0, "check": 0.5, "block": 0.2}
    (table, sql), (other, _) = await _tables(pg_logical, 2)
    link = CuttableLink(redis_server.port)
    await link.start()
    redis = _redis(redis_server)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url, plane={**plane, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", link.url, plane={**plane, "node": "node-b"}) as b,
    ):
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            await _both_up(a, b)
            for i in range(3):  # B applies and acknowledges entries 1-3 (another table)
                await writer.execute(f"UPDATE {other} SET v = $1 WHERE id = 1", i)
            key = a.origin_key
            await until(lambda: _plane(a).holds.acked.get("node-b", {}).get(key, 0) >= 3, "B acknowledged 3")
            await _until_hit(reader, b, sql, 0)  # again: a first write to a table may bump everything
            await until(lambda: _serving(b), "B caught up")
            link.freeze()
            await redis.delete(f"neonpoly:o:{key}:seq")
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
            assert await reader.fetchval(sql) == 1, "B served a hit the returned write made stale"
        finally:
            link.thaw()
            await writer.close()
            await reader.close()
            await redis.aclose()
    await link.cut()


async def test_a_registering_round_whose_reply_was_lost_extends_the_fence(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Rule 4: a cut-off node holds a write until every gate proven before the others saw it
    lost has closed: its last registration in Redis + check + limit. Here A's registering round
    executed but its reply never came back (the reader waits for its io timeout), and A's
    publisher failed at once: the fence counted from the round before, and released the write
    while A was still registered (nobody can know it lost) or shortly after."""
    # The fence (counted from the round before) ends before the reader's io timeout.
    plane: dict[str, Any] = {"heartbeat": 2.75, "check": 2.0, "limit": 0.5, "block": 0.1, "hold": 1.0,
                             "io_timeout": 4.0, "node": "node-a"}
    [(table, _)] = await _tables(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    redis = _redis(redis_server)
    async with plane_node(pg_logical, tmp_path / "a", link.url, plane=plane) as a:
        writer = await asyncpg.connect(**a.dsn())
        try:
            await until(lambda: _serving(a), "A up")
            link.drop_replies_after(b"ZREMRANGEBYSCORE")  # the next round that registers A
            await link.tripped.wait()
            nodes = f"neonpoly:o:{a.origin_key}:nodes"
            now = await _redis_ms(redis)

            async def registered() -> bool:  # that round's registration (not the one before)
                score = await redis.zscore(nodes, "node-a")
                return score is not None and score > now + 2750 - 1000

            await _until_async(registered, "the lost round registered A")
            expiry = await redis.zscore(nodes, "node-a")
            assert expiry is not None
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
            released = await _redis_ms(redis)
            closed = expiry + (2.0 + 0.5) * 1000  # every gate proven before it expired is closed
            assert released >= closed, (
                f"the write returned {(closed - released) / 1000:.2f} s before gates proven while A was "
                "registered (by the round whose reply was lost) had surely closed"
            )
        finally:
            await writer.close()
            await redis.aclose()
    await link.cut()


@pytest.mark.parametrize("key", ["lost", "nodes"])
@pytest.mark.xfail(strict=True, reason="a deleted (or evicted) lost/nodes key is not noticed: the cut-off "
                   "node is forgotten and the others serve hits again (see the report)")
async def test_a_deleted_membership_key_does_not_forget_a_cut_off_node(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path, key: str
) -> None:
    plane: dict[str, Any] = {"heartbeat": 2.0, "check": 0.3, "limit": 1.0, "block": 0.1, "hold": 1.5}
    [(table, sql)] = await _tables(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    redis = _redis(redis_server)
    async with (
        plane_node(pg_logical, tmp_path / "a", link.url, plane={**plane, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url, plane={**plane, "node": "node-b"}) as b,
    ):
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            await _both_up(a, b)
            await _until_hit(reader, b, sql, 0)
            await link.cut()
            await until(lambda: _origin(a)[0].state == "down", "A sees Redis gone")
            if key == "lost":
                await until(lambda: _origin(b)[1].lost == ("node-a",), "B sees A lost")
            await redis.delete(f"neonpoly:o:{a.origin_key}:{key}")
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")  # held by the fence, then goes
            await until(lambda: _serving(b), "B serves hits")
            assert await reader.fetchval(sql) == 1, "B served a hit the returned write made stale"
        finally:
            await writer.close()
            await reader.close()
            await redis.aclose()


async def test_a_vanished_node_list_does_not_release_a_write_waiting_for_an_acknowledgement(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The plane's `nodes` key (the only one with a TTL: what a volatile-* maxmemory-policy
    evicts first) deleted: A's next round read a node list without B and stopped waiting for
    B's acknowledgement, though B is alive and its gate open."""
    plane: dict[str, Any] = {"limit": 3.0, "hold": 3.5, "heartbeat": 8.0, "check": 0.3, "block": 0.2}
    [(table, sql)] = await _tables(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    redis = _redis(redis_server)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url, plane={**plane, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", link.url, plane={**plane, "node": "node-b"}) as b,
    ):
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            await _both_up(a, b)
            await _until_hit(reader, b, sql, 0)
            await until(lambda: _serving(b), "B caught up")
            link.freeze()
            write = asyncio.ensure_future(writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1"))
            await until(lambda: _plane(a).holds.waiting == 1, "A waits for B's acknowledgement")
            await redis.delete("neonpoly:nodes")
            await write
            assert await reader.fetchval(sql) == 1, "B served a hit the returned write made stale"
        finally:
            link.thaw()
            await writer.close()
            await reader.close()
            await redis.aclose()
    await link.cut()


async def test_an_integration_removed_and_added_again_stays_registered(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Removing an integration says goodbye (ZREM from the origin's nodes) once its last bumps
    are out; added again meanwhile, the node follows the origin, and the late goodbye took it
    off the nodes until its next registration: writers stopped waiting for it while its gate
    was open."""
    plane: dict[str, Any] = {"check": 2.5, "limit": 1.0, "heartbeat": 3.75, "block": 0.2, "hold": 1.5}
    [(table, sql)] = await _tables(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    async with (
        plane_node(pg_logical, tmp_path / "a", link.url, plane={**plane, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", redis_server.url, plane={**plane, "node": "node-b"}) as b,
    ):
        await _both_up(a, b)
        pa = _plane(a)
        origin = a.service.routes.by_id["default"].origin
        pa._observed(a.origin_key, ("p",))  # bumps of the origin still to go out: the goodbye waits
        batch = pa._open
        assert batch is not None
        a.service.remove_cache("default")
        a.service.add_cache("default", origin, default=True)
        await batch.future
        await until(lambda: not pa._goodbyes and _serving(a), "the goodbye went; A follows the origin")
        writer = await asyncpg.connect(**b.dsn())
        reader = await asyncpg.connect(**a.dsn())
        try:
            await _until_hit(reader, a, sql, 0)
            link.freeze()
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
            assert await reader.fetchval(sql) == 1, "A served a hit the returned write made stale"
        finally:
            link.thaw()
            await writer.close()
            await reader.close()
    await link.cut()


async def test_a_write_right_after_redis_lost_its_data_waits_for_gates_proven_before(
    pg_logical: PgServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """FLUSHALL (or a restart a slow node has not noticed yet): rule 5 makes the readers pass
    through once they see the new epoch, but B has not looked yet (its link is slow) and its
    gate, proven before the flush, stays open for `limit`. A's write was published into the
    empty Redis, where no node is registered: its reply went at once. Now a publish checks the
    epoch, and a reply waits until `limit` after the new one was made."""
    plane: dict[str, Any] = {"limit": 3.0, "hold": 3.5, "heartbeat": 8.0, "check": 0.3, "block": 0.2}
    [(table, sql)] = await _tables(pg_logical)
    link = CuttableLink(redis_server.port)
    await link.start()
    redis = _redis(redis_server)
    async with (
        plane_node(pg_logical, tmp_path / "a", redis_server.url, plane={**plane, "node": "node-a"}) as a,
        plane_node(pg_logical, tmp_path / "b", link.url, plane={**plane, "node": "node-b"}) as b,
    ):
        writer = await asyncpg.connect(**a.dsn())
        reader = await asyncpg.connect(**b.dsn())
        try:
            await _both_up(a, b)
            await _until_hit(reader, b, sql, 0)
            await until(lambda: _serving(b), "B caught up")
            link.freeze()
            await redis.flushall()
            await writer.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
            assert await reader.fetchval(sql) == 1, "B served a hit the returned write made stale"
        finally:
            link.thaw()
            await writer.close()
            await reader.close()
            await redis.aclose()
    await link.cut()

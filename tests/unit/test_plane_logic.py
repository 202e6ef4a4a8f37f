"""The invalidation plane's rules without Redis: when a node may serve hits, when a stream
has a gap, what a bump carries and does to a cache, when a held write reply is released."""

from __future__ import annotations

import asyncio
import time

import pytest

from neonpoly.cache.query_cache import QueryCache
from neonpoly.cache.store import MemoryStore
from neonpoly.freshness.plane import (
    Batch,
    Bump,
    Cursor,
    Fence,
    Gate,
    HoldBook,
    OriginPlaneStatus,
    PlaneSettings,
    PlaneStatus,
    entry_position,
    epoch_made,
    public_url,
)
from neonpoly.freshness.redis_wire import streams
from neonpoly.stats import StatsRecorder


def test_the_gate_is_closed_until_a_read_proves_the_node_caught_up() -> None:
    gate = Gate(limit=1.0)
    assert not gate() and gate.refused == 1


def test_the_gate_opens_on_a_recent_proof_and_closes_on_an_old_one() -> None:
    gate = Gate(limit=1.0)
    gate.prove(time.monotonic())
    assert gate() and gate.open
    old = Gate(limit=1.0)
    old.prove(time.monotonic() - 5.0)  # the last read that returned was sent long ago
    assert not old()


def test_a_later_proof_never_moves_the_gate_back() -> None:
    gate = Gate(limit=1.0)
    now = time.monotonic()
    gate.prove(now)
    gate.prove(now - 10.0)  # a slower round's answer arriving after a faster one's
    assert gate.proven == now


def test_closing_the_gate_refuses_hits_at_once() -> None:
    gate = Gate(limit=1.0)
    gate.prove(time.monotonic())
    gate.close()
    assert not gate()


def test_consecutive_sequence_numbers_are_no_gap() -> None:
    cursor = Cursor("0-0", 0)
    assert cursor.take(1, "1-0") and cursor.take(2, "2-0")
    assert (cursor.last_id, cursor.last_n) == ("2-0", 2)


def test_a_skipped_sequence_number_is_a_gap() -> None:
    cursor = Cursor("5-0", 5)
    assert not cursor.take(9, "9-0")  # 6..8 trimmed before this node read them
    assert cursor.take(10, "10-0")


def test_a_counter_that_starts_over_is_a_gap() -> None:
    cursor = Cursor("5-0", 41)
    assert not cursor.take(1, "6-0")  # Redis restarted or was flushed


def test_a_bump_survives_its_encoding() -> None:
    bump = Bump()
    for op in (("t", "app", frozenset({"t1", "t2@7"})), ("d", "other"), ("e", frozenset({"x"})), ("g",), ("p",)):
        bump.add(op)
    again = Bump.decode(bump.encode())
    assert again == bump


def test_an_unreadable_bump_is_refused() -> None:
    with pytest.raises(ValueError):
        Bump.decode("[1, 2")
    with pytest.raises(ValueError):
        Bump().add(("z",))


def _cache() -> QueryCache:
    return QueryCache("c", MemoryStore(1 << 20), StatsRecorder())


def test_a_remote_table_bump_makes_the_local_stamp_stale() -> None:
    cache = _cache()
    stamp = cache.stamp("app", ["t1"])
    untouched = cache.stamp("app", ["t9"])
    bump = Bump()
    bump.add(("t", "app", frozenset({"t1"})))
    bump.apply([cache])
    gens = cache.store.generations
    assert not gens.is_current(stamp) and gens.is_current(untouched)


def test_a_purge_makes_every_stamp_stale_and_forgets_what_the_catalog_said() -> None:
    cache = _cache()
    stamps = [cache.stamp("app", ["t1"]), cache.stamp("other", [])]
    epoch = cache.ddl_epoch
    Bump(purge=True).apply([cache])
    assert not any(cache.store.generations.is_current(s) for s in stamps)
    assert cache.ddl_epoch == epoch + 1


def test_generations_tell_their_observer_every_bump_with_its_names() -> None:
    cache = _cache()
    seen: list[tuple[object, ...]] = []
    cache.store.generations.observe(seen.append)
    cache.invalidate("app", frozenset({"t1", "t1@42"}), False)
    cache.invalidate("app", frozenset(), True)
    assert seen == [("t", "app", frozenset({"t1", "t1@42"})), ("d", "app")]


async def test_a_hold_is_released_once_every_live_node_acknowledged() -> None:
    book = HoldBook("a")
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.add(future, {"o": 7}, {"o": ["a", "b", "c"]})
    book.ack("b", {"o": 7})
    assert not future.done()
    book.ack("c", {"o": 6})  # not far enough yet
    assert not future.done()
    book.ack("c", {"o": 8})
    assert future.done() and book.timed_out == 0


async def test_an_acknowledgement_read_before_the_publish_answered_counts() -> None:
    book = HoldBook("a")
    book.ack("b", {"o": 7})
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.add(future, {"o": 7}, {"o": ["a", "b"]})
    assert future.done()


async def test_a_hold_with_no_other_live_node_is_not_held() -> None:
    book = HoldBook("a")
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.add(future, {"o": 1}, {"o": ["a"]})
    assert future.done()


async def test_a_node_gone_from_the_heartbeats_is_not_waited_for() -> None:
    book = HoldBook("a")
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.add(future, {"o": 3}, {"o": ["b"]})
    book.forget_node("b")
    assert future.done()


async def test_a_hold_past_its_time_is_released_and_counted() -> None:
    book = HoldBook("a")
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    book.add(future, {"o": 3}, {"o": ["b"]})
    book.expire(future)
    assert future.done() and book.timed_out == 1 and book.waiting == 0


async def test_a_batch_merges_the_bumps_of_one_origin() -> None:
    batch = Batch(asyncio.get_running_loop())
    assert not batch
    batch.add("o", ("t", "app", frozenset({"t1"})))
    batch.add("o", ("t", "app", frozenset({"t2"})))
    batch.add("p", ("g",))
    assert batch.bumps["o"].tables == {"app": {"t1", "t2"}} and batch.bumps["p"].all


def test_the_plane_refuses_timings_that_break_the_guarantee() -> None:
    with pytest.raises(ValueError):
        PlaneSettings("redis://x", limit=1.0, hold=0.5)  # a writer would stop waiting before readers stop
    with pytest.raises(ValueError):
        PlaneSettings("redis://x", limit=1.0, block=2.0)  # an idle plane could never prove itself


def test_reports_never_show_the_redis_password() -> None:
    assert public_url("redis://:s3cret@cache.example:6380/2") == "redis://***@cache.example:6380/2"
    assert public_url("redis://user:s3cret@cache.example/0") == "redis://user:***@cache.example/0"
    assert public_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_xread_replies_read_alike_in_resp2_and_resp3_shapes() -> None:
    resp2 = [["s", [("1-0", {"n": "1"}), ("2-0", {"n": "2"})]]]
    resp3 = {"s": [["1-0", {"n": "1"}], ["2-0", ["n", "2"]]]}
    assert streams(resp2) == streams(resp3) == {"s": [("1-0", {"n": "1"}), ("2-0", {"n": "2"})]}
    assert streams(None) == {}


async def test_the_fence_holds_a_reply_until_the_node_is_surely_known_lost() -> None:
    fence = Fence(span=0.05)
    assert fence.hold() is not None, "a node that never registered holds until it joins"
    fence.after(None)  # it joined with nothing to publish: released at once
    fence.beat = time.monotonic()
    held = fence.hold()
    assert held is not None and not held.done() and fence.held == 1
    fence.beat = time.monotonic()  # a round registered it again meanwhile: the wait moves on
    await asyncio.wait_for(held, 5)
    assert fence.released_by_time == 1 and fence.held == 0
    fence.beat = time.monotonic() - 1.0  # registered last a second ago: everyone knows by now
    assert fence.hold() is None


async def test_the_fence_releases_on_return_once_the_purge_is_acknowledged() -> None:
    fence = Fence(span=3600.0)
    fence.beat = time.monotonic()
    held = fence.hold()
    assert held is not None
    purge: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fence.after(purge)
    await asyncio.sleep(0)
    assert not held.done()
    purge.set_result(None)
    await asyncio.wait_for(held, 5)


def test_an_epoch_says_when_it_was_made() -> None:
    assert epoch_made("9f2c@1764590000123") == 1764590000123
    assert epoch_made("9f2c") is None  # an older neonpoly's epoch: no grace
    assert epoch_made("a@b@12") == 12


def test_a_lost_node_pauses_the_origin_in_the_summary() -> None:
    origin = OriginPlaneStatus("o", "s", False, "1-0", 1, None, 0, 0, 0, 0, "", lost=("n1",))
    status = PlaneStatus("redis://x", "me", "up", "", 0.0, ("me",), 0, 0, 0, 0, 0, None, 0, (origin,))
    assert status.summary("o") == "up, 1 node, paused: node n1 lost without a goodbye (passing through)"


def test_a_node_is_named_by_its_address_unless_told_and_workers_add_their_index() -> None:
    import argparse
    import socket

    from neonpoly.cli.serve import _plane
    from neonpoly.control.workers import WorkerRole

    host = socket.gethostname()
    args = argparse.Namespace(node_id=None, listen=("127.0.0.1", 6543), redis="redis://r:6379/0")
    assert _plane(args, None, "redis://r:6379/0").node == f"{host}:6543"
    assert _plane(argparse.Namespace(node_id="edge-1", listen=("127.0.0.1", 0), redis=None), None, "redis://r").node \
        == "edge-1"  # fmt: skip
    assert _plane(argparse.Namespace(node_id=None, listen=("127.0.0.1", 0), redis=None), None, "redis://r").node is None
    worker = WorkerRole(1, 2, "g", "unix:///tmp/x.sock", None, None)
    given = _plane(args, worker, "redis://r:6379/0")
    assert given.node == f"{host}:6543/w1" and given.grace is None  # a shared Redis may lose its data
    private = _plane(argparse.Namespace(node_id=None, listen=("127.0.0.1", 6543), redis=None), worker, "unix:///x")
    assert private.grace == 0.0  # the workers' own redis-server cannot outlive them
    # Its only nodes are the workers, which share their generations in memory; a given one may
    # have other nodes, which must hear of every bump.
    assert private.siblings_only and not given.siblings_only
    with_board = WorkerRole(1, 2, "g", "unix:///x", 5, None, board=7)
    assert WorkerRole.from_json(with_board.to_json()) == with_board


def test_the_heartbeat_outlasts_a_gate_proven_up_to_a_check_after_it() -> None:
    with pytest.raises(ValueError):  # the registration could expire while the gate is open
        PlaneSettings("redis://x", limit=1.0, heartbeat=1.0, check=0.5)
    PlaneSettings("redis://x", limit=1.0, heartbeat=1.75, check=0.5)


def test_acknowledgements_count_entry_ids_which_grow_when_the_seq_starts_over() -> None:
    assert entry_position("1700000000000-5") < entry_position("1700000000000-6") < entry_position("1700000000001-0")


async def test_the_fence_waits_for_a_registering_round_that_has_not_answered() -> None:
    fence = Fence(span=0.01)
    fence.beat = time.monotonic() - 1.0  # its time is up...
    fence.pending = 1  # ...but a round that may have registered the node since is in flight
    held = fence.hold()
    assert held is not None
    await asyncio.sleep(0.03)
    assert not held.done()
    fence.settle(time.monotonic())  # it answered: counted from now
    await asyncio.wait_for(held, 5)

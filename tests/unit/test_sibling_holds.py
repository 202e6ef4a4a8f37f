"""Holds of prepared transactions shared by the workers of one `serve --workers N`
(cache/siblings.py `BoardHolds`): a hold taken through one worker keeps every worker from
storing what it wrote, and a release through any worker ends it in all."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from neonpoly.cache.holds import UNREADABLE, LocalHolds, PreparedHolds
from neonpoly.cache.siblings import HOLD_RECORDS, SiblingBoard

ORIGIN = "pg:5432"
T = frozenset({"public.t"})


@pytest.fixture
def boards() -> Iterator[tuple[SiblingBoard, SiblingBoard, SiblingBoard]]:
    """The parent's region and two workers' mappings of it (as `serve --workers 2` makes them)."""
    parent = SiblingBoard.create(2, slots=64)
    a = SiblingBoard.attach(os.dup(parent.fileno()), 0)
    b = SiblingBoard.attach(os.dup(parent.fileno()), 1)
    try:
        yield parent, a, b
    finally:
        b.close()
        a.close()
        parent.close()


def test_a_hold_through_one_worker_holds_in_the_other_until_any_releases_it(
    boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard],
) -> None:
    _, a, b = boards
    held_a, held_b = a.holds(ORIGIN), b.holds(ORIGIN)
    assert not held_b and held_b.holding("app", T) is None
    held_a.hold(("c1", "g1"), "app", T | {"public.v"})
    assert held_b
    why = held_b.holding("app", frozenset({"public.t", "public.u"}))
    assert why is not None and "'g1'" in why and "COMMIT or ROLLBACK PREPARED" in why
    assert held_b.holding("app", frozenset({"public.u"})) is None  # not what it wrote
    assert held_b.holding("other", T) is None  # another database
    assert b.holds("pg:6543").holding("app", T) is None  # another origin
    held_b.release(("c2", "g1"))  # the same gid through another cache: another server's transaction
    assert held_a.holding("app", T) is not None
    held_b.release(("c1", "g1"))
    assert not held_a and held_a.holding("app", T) is None


def test_holds_of_one_gid_add_up_and_anything_holds_every_database(
    boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard],
) -> None:
    _, a, b = boards
    a.holds(ORIGIN).hold(("c1", "g1"), "app", T)
    b.holds(ORIGIN).hold(("c1", "g1"), "app", frozenset({"public.u"}))  # a failed PREPARE reusing g1
    assert a.holds(ORIGIN).holding("app", frozenset({"public.t"})) is not None
    assert a.holds(ORIGIN).holding("app", frozenset({"public.u"})) is not None
    b.holds(ORIGIN).hold(("c1", "g2"), "app", None)
    assert a.holds(ORIGIN).holding("other", frozenset({"public.w"})) is not None
    a.holds(ORIGIN).release(("c1", "g2"))
    assert b.holds(ORIGIN).holding("other", frozenset({"public.w"})) is None
    assert b.holds(ORIGIN).holding("app", T) is not None


def test_an_unreadable_prepare_holds_everything_in_every_worker_for_good(
    boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard],
) -> None:
    _, a, b = boards
    a.holds(ORIGIN).hold(("c1", UNREADABLE), "app", None)
    why = b.holds(ORIGIN).holding("other", T)
    assert why is not None and "could not read" in why
    b.holds(ORIGIN).release(("c1", "unreadable"))  # what a COMMIT PREPARED can spell
    assert a.holds(ORIGIN).holding("app", T) is not None


def test_more_holds_than_records_hold_everything(boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard]) -> None:
    _, a, b = boards
    for n in range(HOLD_RECORDS):
        a.holds(ORIGIN).hold(("c1", f"g{n}"), "app", T)
    assert b.holds(ORIGIN).holding("app", frozenset({"public.u"})) is None
    b.holds(ORIGIN).hold(("c1", "one too many"), "app", T)
    assert a.holds(ORIGIN).holding("app", frozenset({"public.u"})) is not None
    for n in range(HOLD_RECORDS):
        b.holds(ORIGIN).release(("c1", f"g{n}"))
    assert a.holds(ORIGIN).holding("other", frozenset({"public.u"})) is not None  # never released


def test_a_released_record_is_used_again(boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard]) -> None:
    _, a, b = boards
    for n in range(3 * HOLD_RECORDS):
        a.holds(ORIGIN).hold(("c1", f"g{n}"), "app", T)
        b.holds(ORIGIN).release(("c1", f"g{n}"))
    assert not a.holds(ORIGIN) and b.holds(ORIGIN).holding("app", T) is None


_CHILD = """
import os, sys
from neonpoly.cache.siblings import SiblingBoard
board = SiblingBoard.attach(int(sys.argv[1]), 0)
board.holds("pg:5432").hold(("c1", "g1"), "app", frozenset({"public.t"}))
with board.locked_holds(__import__("fcntl").LOCK_EX):
    print("locked", flush=True)
    os.kill(os.getpid(), 9)  # killed while holding the lock
"""


def test_a_dead_workers_hold_stays_and_its_lock_does_not(
    boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard],
) -> None:
    """A worker killed while it held the holds' lock: the others can still read and release
    (the kernel drops its lock), and its hold stays (its transaction is still prepared)."""
    parent, _, b = boards
    fd = os.dup(parent.fileno())
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(fd)], pass_fds=(fd,), capture_output=True, text=True, timeout=60
        )
    finally:
        os.close(fd)
    assert child.returncode == -9 and child.stdout == "locked\n", child.stderr
    assert b.holds(ORIGIN).holding("app", T) is not None
    b.holds(ORIGIN).release(("c1", "g1"))
    assert b.holds(ORIGIN).holding("app", T) is None


def test_local_and_board_holds_answer_alike(boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard]) -> None:
    keepers: list[PreparedHolds] = [LocalHolds(), boards[1].holds(ORIGIN)]
    for holds in keepers:
        holds.hold(("c1", "g1"), "app", T)
        holds.hold(("c1", "g1"), "other", T)  # two databases: everything
        assert holds.holding("third", frozenset({"public.x"})) is not None
        holds.release(("c1", "g1"))
        assert not holds


@pytest.mark.parametrize("where", ["board", "local"])
def test_a_release_sent_before_the_gid_was_held_again_keeps_the_new_hold(
    boards: tuple[SiblingBoard, SiblingBoard, SiblingBoard], where: str
) -> None:
    """COMMIT PREPARED 'g1' frees the gid at the origin as it runs; its batch may end later
    (a next statement waiting on a lock), after another transaction was prepared as 'g1'.
    The release (told `taken()` as of its sending) must leave that new hold."""
    _, a, b = boards
    first: PreparedHolds = a.holds(ORIGIN) if where == "board" else LocalHolds()
    second: PreparedHolds = b.holds(ORIGIN) if where == "board" else first
    first.hold(("c1", "g1"), "app", T)
    sent = second.taken()  # the COMMIT PREPARED is sent
    first.hold(("c1", "g1"), "app", T)  # prepared again, before that batch ended
    second.release(("c1", "g1"), sent)
    assert second.holding("app", T) is not None, "the new transaction's hold was released"
    sent = second.taken()
    second.release(("c1", "g1"), sent)  # its own COMMIT PREPARED, sent after it
    assert not first and first.holding("app", T) is None

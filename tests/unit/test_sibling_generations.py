"""Table generations shared by the workers of one host (cache/siblings.py): a bump by one
worker makes another worker's entries stale at once, through memory, and nothing else does."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from neonpoly.cache.invalidation import SharedTableGenerations, TableGenerations
from neonpoly.cache.siblings import SiblingBoard


@pytest.fixture
def boards() -> Iterator[tuple[SiblingBoard, SiblingBoard]]:
    """Two workers' mappings of one parent's region (as `serve --workers 2` makes them)."""
    parent = SiblingBoard.create(2, slots=64)
    # Each worker's descriptor is its own (Popen's pass_fds), as a dup is here.
    a = SiblingBoard.attach(os.dup(parent.fileno()), 0)
    b = SiblingBoard.attach(os.dup(parent.fileno()), 1)
    try:
        yield a, b
    finally:
        b.close()
        a.close()
        parent.close()


def _shared(board: SiblingBoard, origin: str = "pg:5432") -> TableGenerations:
    gens = TableGenerations()
    gens.share(board.view(origin))
    return gens


def test_a_siblings_bump_makes_this_workers_entry_stale(boards: tuple[SiblingBoard, SiblingBoard]) -> None:
    a, b = boards
    gens_b = _shared(b)
    stamp = gens_b.stamp("app", {"public.t", "public.u"})
    assert gens_b.is_current(stamp)
    a.view("pg:5432").bump("app", frozenset({"public.t"}))
    assert not gens_b.is_current(stamp)
    assert gens_b.is_current(gens_b.stamp("app", {"public.t", "public.u"}))  # a new miss is stamped anew


def test_other_tables_databases_and_origins_stay_current(boards: tuple[SiblingBoard, SiblingBoard]) -> None:
    a, b = boards
    gens_b = _shared(b)
    stamp = gens_b.stamp("app", {"public.t"})
    a.view("pg:5432").bump("other", frozenset({"public.t"}))
    a.view("pg:6543").bump("app", frozenset({"public.t"}))
    a.view("pg:5432").bump("app", frozenset({"public.u"}))
    # 64 slots: these three may share the slot of public.t (an extra eviction, allowed); the
    # crc32 of these names does not, and a test that counts on it says so.
    assert gens_b.is_current(stamp)


def test_a_workers_own_bumps_count_once_and_its_row_is_not_read_back(
    boards: tuple[SiblingBoard, SiblingBoard],
) -> None:
    a = boards[0]
    gens_a = _shared(a)
    stamp = gens_a.stamp("app", {"public.t"})
    a.view("pg:5432").bump("app", frozenset({"public.t"}))  # what the plane does beside the local bump
    assert gens_a.is_current(stamp)  # its own row is not its siblings' part
    gens_a.bump_tables("app", {"public.t"})
    assert not gens_a.is_current(stamp)


def test_sharing_forgets_what_was_stamped_before(boards: tuple[SiblingBoard, SiblingBoard]) -> None:
    gens = TableGenerations()
    stamp = gens.stamp("app", {"public.t"})
    gens.share(boards[1].view("pg:5432"))
    assert isinstance(gens, SharedTableGenerations)
    assert not gens.is_current(stamp)


def test_a_copy_keeps_the_siblings_counts_of_its_moment(boards: tuple[SiblingBoard, SiblingBoard]) -> None:
    a, b = boards
    gens_b = _shared(b)
    stamp = gens_b.stamp("app", {"public.t"})
    view = gens_b.copy()
    a.view("pg:5432").bump("app", frozenset({"public.t"}))
    assert view.is_current(stamp) and not gens_b.is_current(stamp)


def test_the_plain_generations_keep_their_own_hit_check() -> None:
    """One process without siblings: the hit check is TableGenerations' own method."""
    gens = TableGenerations()
    assert type(gens).is_current is TableGenerations.is_current


def test_workers_name_their_rows_and_see_each_others(boards: tuple[SiblingBoard, SiblingBoard]) -> None:
    a, b = boards
    assert a.siblings() == frozenset()
    b.join("host:5432/w1")
    a.join("host:5432/w0")
    assert a.siblings() == {"host:5432/w1"} and b.siblings() == {"host:5432/w0"}


def test_a_region_that_is_not_a_board_is_refused() -> None:
    fd = os.memfd_create("not-a-board")
    os.ftruncate(fd, 4096)
    with pytest.raises(ValueError, match="not a neonpoly sibling board"):
        SiblingBoard.attach(fd, 0)
    os.close(fd)

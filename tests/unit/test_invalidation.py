"""TableGenerations: stamps, bumps and persistence of the counters."""

from __future__ import annotations

import pickle

import pytest

from neonpoly.cache.invalidation import GenerationStamp, TableGenerations


def test_stamp_is_hashable_picklable_and_order_insensitive() -> None:
    gens = TableGenerations()
    a = gens.stamp("db", ["b", "a", "a"])
    b = gens.stamp("db", ("a", "b"))
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    assert GenerationStamp.from_json(a.to_json()) == a


def test_bump_tables_only_affects_that_table_in_that_database() -> None:
    gens = TableGenerations()
    users = gens.stamp("db", ["users"])
    orders = gens.stamp("db", ["orders"])
    other_db = gens.stamp("other", ["users"])
    gens.bump_tables("db", ["users"])
    assert not gens.is_current(users)
    assert gens.is_current(orders)
    assert gens.is_current(other_db)
    assert gens.is_current(gens.stamp("db", ["users"]))


def test_bump_database_and_bump_all() -> None:
    gens = TableGenerations()
    a = gens.stamp("a", ["t"])
    b = gens.stamp("b", ["t"])
    gens.bump_database("a")
    assert not gens.is_current(a) and gens.is_current(b)
    gens.bump_all()
    assert not gens.is_current(b)


def test_bump_tables_everywhere_reaches_every_stamped_database() -> None:
    gens = TableGenerations()
    a = gens.stamp("a", ["t", "u"])
    b = gens.stamp("b", ["t"])
    c = gens.stamp("c", ["u"])
    gens.bump_tables_everywhere(["t"])
    assert not gens.is_current(a) and not gens.is_current(b) and gens.is_current(c)


def test_state_round_trip_keeps_current_and_stale_stamps() -> None:
    gens = TableGenerations()
    stale = gens.stamp("db", ["t"])
    gens.bump_tables("db", ["t"])
    gens.bump_database("x")
    fresh = gens.stamp("db", ["t", "u"])
    restored = TableGenerations.from_state(gens.to_state())
    assert restored.is_current(fresh)
    assert not restored.is_current(stale)


def test_unknown_history_matches_no_old_stamp() -> None:
    old = TableGenerations().stamp("db", ["t"])
    assert not TableGenerations.with_unknown_history().is_current(old)


@pytest.mark.parametrize("state", [{}, {"version": 99}, {"version": 1, "global": "x"},
                                   {"version": 1, "global": 0, "databases": 3, "tables": []}])
def test_from_state_rejects_malformed(state: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TableGenerations.from_state(state)


def test_listener_fires_on_bumps_and_new_database() -> None:
    calls: list[int] = []
    gens = TableGenerations()
    gens.set_listener(lambda: calls.append(1))
    gens.stamp("db", ["t"])
    gens.stamp("db", ["t"])  # known database: no persistence needed
    gens.bump_tables("db", ["t"])
    assert len(calls) == 2

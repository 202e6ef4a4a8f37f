"""Code and clocks a statement runs without naming them: a configuration reload, planning,
values made from text where no cast is (tests/adversarial/test_38 proves each on a server)."""

from __future__ import annotations

import pytest

from neonpoly.cache.policy import Status, classify

S = Status


@pytest.mark.parametrize(
    ("sql", "cacheable", "status", "everything"),
    [
        ("SELECT pg_reload_conf()", False, S.VOLATILE, True),  # every session's settings change
        ("EXPLAIN SELECT my_func(1)", False, S.UNCACHEABLE, True),  # planning folds IMMUTABLE calls
        ("EXPLAIN SELECT lower(a) FROM t", False, S.UNCACHEABLE, False),
        # values made from text where no cast is: the type's input reads the clock for 'now'
        ("SELECT * FROM t, xmltable('/r' PASSING b COLUMNS v date PATH 'v')", False, S.VOLATILE, False),
        ("SELECT JSON_VALUE(j, '$.v' RETURNING timestamptz) FROM t", False, S.VOLATILE, False),
        ("SELECT * FROM t, JSON_TABLE(j, '$' COLUMNS (v date PATH '$.v'))", False, S.VOLATILE, False),
        ("SELECT * FROM t, xmltable('/r' PASSING b COLUMNS v int PATH 'v')", True, None, False),
        ("SELECT * FROM xmltable('/r' PASSING b COLUMNS v app.d PATH 'v')", False, S.VOLATILE, True),
    ],
)
def test_hidden_code_and_clocks(sql: str, cacheable: bool, status: Status | None, everything: bool) -> None:
    c = classify(sql)
    assert (c.cacheable, c.status, c.invalidate_all) == (cacheable, status, everything)
    assert c.changes_session is everything  # code of the user's may SET too


def test_a_type_named_outside_a_cast_is_trusted_only_as_a_builtin() -> None:
    c = classify("SELECT * FROM jsonb_to_record(j) AS x(v money_d)")
    assert "type money_d" in c.shadowable

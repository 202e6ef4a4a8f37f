"""Code and clocks a statement runs without naming them: a configuration reload, planning,
values made from text where no cast is, types given as values, json casts, two-phase commit
(tests/adversarial/test_38, 41 and 42 prove them on a server)."""

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
        # a type given as a value (an OID, a regtype string, an argument's type): its checks run
        ("SELECT array_in('{5}', 'd'::regtype, -1)", False, S.VOLATILE, True),
        ("SELECT record_in('(5)', 16555, -1)", False, S.VOLATILE, True),
        ("SELECT (json_populate_record(x, j)).v FROM t x", False, S.VOLATILE, True),
        ("SELECT * FROM jsonb_populate_recordset(NULL::r, j)", False, S.VOLATILE, True),
    ],
)
def test_hidden_code_and_clocks(sql: str, cacheable: bool, status: Status | None, everything: bool) -> None:
    c = classify(sql)
    assert (c.cacheable, c.status, c.invalidate_all) == (cacheable, status, everything)
    assert c.changes_session is everything  # code of the user's may SET too


def test_a_type_named_outside_a_cast_is_trusted_only_as_a_builtin() -> None:
    c = classify("SELECT * FROM jsonb_to_record(j) AS x(v money_d)")
    assert "type money_d" in c.shadowable


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT to_json(m) FROM t",
        "SELECT pg_catalog.row_to_json(x) FROM t x",
        "SELECT json_agg(x) FROM t x",
        "SELECT jsonb_build_object('m', m) FROM t",
        "SELECT JSON_OBJECT('m': m) FROM t",
        "SELECT JSON_ARRAYAGG(m) FROM t",
        "SELECT JSON_SCALAR(m) FROM t",
    ],
)
def test_json_builders_trust_that_no_cast_to_json_is_the_users(sql: str) -> None:
    """A value of a type of the user's becomes json through its own cast to json, if any
    (relations.py answers whether one runs their code): cacheable, with the casts trusted."""
    c = classify(sql)
    assert c.cacheable
    assert "json cast" in c.shadowable


def test_two_phase_commit_names_its_transaction() -> None:
    """PREPARE TRANSACTION holds what it wrote until its COMMIT/ROLLBACK PREPARED (by gid)."""
    assert classify("PREPARE TRANSACTION 'g1'").prepared == (("prepare", "g1"),)
    assert classify("BEGIN; UPDATE t SET v = 1; PREPARE TRANSACTION 'g2'").prepared == (("prepare", "g2"),)
    assert classify("COMMIT PREPARED 'g3'").prepared == (("end", "g3"),)
    assert classify("ROLLBACK PREPARED 'g4'").prepared == (("end", "g4"),)
    assert classify("ROLLBACK PREPARED 'g4'").has_effects
    assert classify("COMMIT").prepared == ()
    # Every gid of a query string, in order: one that prepares two holds both.
    two = "BEGIN; UPDATE t SET v = 1; PREPARE TRANSACTION 'a'; BEGIN; UPDATE u SET v = 1; PREPARE TRANSACTION 'b'"
    assert classify(two).prepared == (("prepare", "a"), ("prepare", "b"))


@pytest.mark.parametrize(
    ("sql", "label"),
    [
        ("SELECT CASE m WHEN 1 THEN 2 END FROM t", "operator ="),
        ("SELECT 1 FROM t WHERE id IN (SELECT 1)", "operator ="),
        ("SELECT 1 FROM t WHERE id < ALL (SELECT 1)", "operator <"),
        ("SELECT 1 FROM a JOIN b USING (id)", "operator ="),
        ("SELECT 1 FROM a NATURAL JOIN b", "operator ="),
        ("SELECT 1 FROM t ORDER BY id USING >", "operator >"),
    ],
)
def test_operators_implied_by_syntax_are_trusted_by_name(sql: str, label: str) -> None:
    c = classify(sql)
    assert c.cacheable and label in c.shadowable


def test_a_schema_qualified_operator_in_a_sublink_is_the_users_code() -> None:
    c = classify("SELECT 1 FROM t WHERE id OPERATOR(evil.=) ANY (SELECT 1)")
    assert (c.cacheable, c.status, c.invalidate_all) == (False, S.VOLATILE, True)


def test_a_cursor_trusts_what_its_query_trusts() -> None:
    c = classify("DECLARE c CURSOR WITH HOLD FOR SELECT upper(m) FROM t")
    assert "upper()" in c.shadowable and c.tables_read == {"t"}


@pytest.mark.parametrize("sql", ["EXPLAIN ANALYZE SELECT upper(m) FROM t", "EXPLAIN SELECT upper(m) FROM t"])
def test_explain_trusts_what_its_query_trusts(sql: str) -> None:
    c = classify(sql)
    assert "upper()" in c.shadowable and c.tables_read == {"t"} and not c.cacheable


def test_an_unreadable_text_that_may_prepare_a_transaction_is_held() -> None:
    deep = "SELECT " + "(SELECT " * 100 + "1" + ")" * 100
    c = classify(f"BEGIN; UPDATE t SET v = 1; PREPARE /* x */ TRANSACTION 'g'; {deep}")
    assert c.prepared == (("prepare", "\0unreadable"),) and c.has_effects
    assert classify(f"BEGIN; {deep}").prepared == ()


@pytest.mark.parametrize(
    "sql",
    ["UPDATE pg_catalog.pg_description SET description = 'x'", "DELETE FROM pg_shdescription",
     "INSERT INTO pg_catalog.pg_description VALUES (1, 1259, 0, 'x')",
     "WITH x AS (UPDATE pg_authid SET rolname = 'y' RETURNING 1) SELECT * FROM x"],
)
def test_a_write_to_a_system_catalog_is_ddl_of_every_database(sql: str) -> None:
    """Trusted builtins (obj_description, pg_get_userbyid) read the catalogs, whose writes
    are otherwise DDL's (tests/adversarial/test_46 proves one on a server)."""
    c = classify(sql)
    assert c.invalidate_all and c.changes_session and c.cluster_wide


def test_a_read_of_a_system_catalog_is_no_ddl() -> None:
    c = classify("SELECT description FROM pg_catalog.pg_description")
    assert not (c.invalidate_all or c.cluster_wide or c.is_write)


@pytest.mark.parametrize(
    "sql", ["COPY (SELECT 1) TO PROGRAM 'psql -c x'", "COPY t FROM PROGRAM 'cat f'", "COPY t TO PROGRAM 'gzip > f'"]
)
def test_copy_program_runs_server_code(sql: str) -> None:
    """The program may connect back and write anything (tests/adversarial/test_46)."""
    c = classify(sql)
    assert c.invalidate_all and c.changes_session and c.is_write and "PROGRAM" in c.reason


def test_copy_to_stdout_is_no_write() -> None:
    c = classify("COPY t TO STDOUT")
    assert not (c.invalidate_all or c.is_write)

"""The cache policy: what may be cached, which tables a statement touches, templates."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from neonpoly.cache.policy import MEMO_MAX_CHARS, Classification, Status, classify

S = Status
F = frozenset

# sql, cacheable, status, is_write, tables_read, tables_written, invalidate_all
CASES: list[tuple[str, bool, Status | None, bool, set[str], set[str], bool]] = [
    # plain reads
    ("SELECT 1", True, None, False, set(), set(), False),
    ("select * from t where id = $1", True, None, False, {"t"}, set(), False),
    ("SELECT a FROM public.t JOIN s.u ON u.id = t.id", True, None, False, {"t", "u"}, set(), False),
    ('SELECT * FROM "MixedCase" m, Orders o', True, None, False, {"MixedCase", "orders"},
     set(), False),
    ("TABLE s.t", True, None, False, {"t"}, set(), False),
    ("VALUES (1, 'a'), (2, 'b')", True, None, False, set(), set(), False),
    ("(SELECT a FROM x) UNION (SELECT a FROM y)", True, None, False, {"x", "y"}, set(), False),
    ("SELECT * FROM a WHERE b IN (SELECT b FROM c)", True, None, False, {"a", "c"}, set(), False),
    ("SELECT * FROM a, LATERAL (SELECT * FROM b WHERE b.x = a.x) l", True, None, False,
     {"a", "b"}, set(), False),
    ("WITH x AS (SELECT * FROM t), y AS (SELECT * FROM x) SELECT * FROM y", True, None, False,
     {"t"}, set(), False),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
     True, None, False, set(), set(), False),
    ("SELECT * FROM generate_series(1, 10) g JOIN t ON t.id = g", True, None, False, {"t"},
     set(), False),
    ("SELECT * FROM unnest($1::int[]) AS u(x)", True, None, False, set(), set(), False),
    ("SELECT count(*) FILTER (WHERE a > 1), string_agg(b, ',' ORDER BY b) FROM t GROUP BY c",
     True, None, False, {"t"}, set(), False),
    ("SELECT lower(a), upper(b), length(c), coalesce(d, 0), date_trunc('day', e), "
     "extract(year FROM e), to_char(e, 'YYYY'), age(e, f), abs(g), round(g, 2), "
     "row_number() OVER (ORDER BY a), jsonb_build_object('a', a), a->>'k', "
     "array_agg(a), md5(a), greatest(a, b) FROM t", True, None, False, {"t"}, set(), False),
    ("SELECT current_user, session_user, current_database(), current_schema()", True, None,
     False, set(), set(), False),
    ("SELECT pg_catalog.lower(relname) FROM pg_class", True, None, False, {"pg_class"}, set(),
     False),
    # volatile
    ("SELECT random()", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT nextval('s')", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT now()", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT * FROM t WHERE ts > current_timestamp - interval '1 day'", False, S.VOLATILE,
     False, {"t"}, set(), False),
    ("SELECT current_date, localtime", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT clock_timestamp()", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT gen_random_uuid()", False, S.VOLATILE, False, set(), set(), False),
    # an extension's function is not a builtin: it may write or SET anything
    ("SELECT uuid_generate_v4()", False, S.VOLATILE, False, set(), set(), True),
    ("SELECT pg_sleep(1)", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT pg_advisory_lock(1)", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT txid_current()", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT pg_relation_size('t')", False, S.VOLATILE, False, set(), set(), False),
    ("SELECT set_config('a', 'b', false)", False, S.VOLATILE, False, set(), set(), False),
    # every setting is part of the server-derived session identity in the key
    ("SELECT current_setting('work_mem')", True, None, False, set(), set(), False),
    ("SELECT my_func(a) FROM t", False, S.VOLATILE, False, {"t"}, set(), True),  # unknown function
    ("SELECT app.lower(a) FROM t", False, S.VOLATILE, False, {"t"}, set(), True),  # unknown function
    ("SELECT * FROM my_table_func(1)", False, S.VOLATILE, False, set(), set(), True),  # unknown function
    ("SELECT age(born) FROM people", False, S.VOLATILE, False, {"people"}, set(), False),
    ("SELECT 'now'::timestamptz", False, S.VOLATILE, False, set(), set(), False),
    # reads that lock or create
    ("SELECT * FROM t FOR UPDATE", False, S.UNCACHEABLE, False, {"t"}, set(), False),
    ("SELECT * FROM t FOR SHARE", False, S.UNCACHEABLE, False, {"t"}, set(), False),
    ("SELECT * FROM t FOR NO KEY UPDATE", False, S.UNCACHEABLE, False, {"t"}, set(), False),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", False, S.UNCACHEABLE, False, {"t"}, set(),
     False),
    ("SELECT * INTO newt FROM t", False, S.UNCACHEABLE, True, {"t"}, {"newt"}, True),
    # writes
    ("INSERT INTO s.t (a, b) VALUES (1, 2)", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("INSERT INTO t SELECT * FROM u", False, S.UNCACHEABLE, True, {"u"}, {"t"}, False),
    ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", False, S.UNCACHEABLE, True, {"u"},
     {"t"}, False),
    ("DELETE FROM t USING u WHERE t.a = u.a", False, S.UNCACHEABLE, True, {"u"}, {"t"}, False),
    ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN UPDATE SET b = 1", False,
     S.UNCACHEABLE, True, {"s"}, {"t"}, False),
    ("WITH x AS (UPDATE orders SET a = 1 RETURNING *) SELECT * FROM x", False,
     S.UNCACHEABLE, True, set(), {"orders"}, False),
    ("WITH x AS (DELETE FROM t2 RETURNING *) INSERT INTO t3 SELECT * FROM x", False,
     S.UNCACHEABLE, True, set(), {"t2", "t3"}, False),
    ("COPY t FROM STDIN", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("COPY s.t (a, b) TO STDOUT", False, S.UNCACHEABLE, False, {"t"}, set(), False),
    ("COPY (SELECT 1) TO STDOUT", False, S.UNCACHEABLE, False, set(), set(), False),
    ("TRUNCATE a, s.b", False, S.UNCACHEABLE, True, set(), {"a", "b"}, True),
    ("CREATE TABLE x (a int)", False, S.UNCACHEABLE, True, set(), set(), True),
    ("ALTER TABLE x ADD COLUMN b int", False, S.UNCACHEABLE, True, set(), set(), True),
    ("DROP TABLE x", False, S.UNCACHEABLE, True, set(), set(), True),
    ("GRANT SELECT ON t TO bob", False, S.UNCACHEABLE, True, set(), set(), True),
    ("REFRESH MATERIALIZED VIEW mv", False, S.UNCACHEABLE, True, set(), set(), True),
    ("CALL p(1)", False, S.UNCACHEABLE, True, set(), set(), True),
    ("DO $$ BEGIN PERFORM 1; END $$", False, S.UNCACHEABLE, True, set(), set(), True),
    ("EXECUTE stmt(1)", False, S.UNCACHEABLE, True, set(), set(), True),
    ("EXPLAIN ANALYZE DELETE FROM t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", False, S.UNCACHEABLE, True, set(),
     {"t"}, False),
    ("EXPLAIN DELETE FROM t", False, S.UNCACHEABLE, False, set(), set(), False),
    ("EXPLAIN SELECT * FROM t", False, S.UNCACHEABLE, False, {"t"}, set(), False),
    # side effects and utility
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", False, S.UNCACHEABLE, False, set(), set(), False),
    ("NOTIFY chan, 'payload'", False, S.UNCACHEABLE, False, set(), set(), False),
    ("LISTEN chan", False, S.NOTAQUERY, False, set(), set(), False),
    ("UNLISTEN *", False, S.NOTAQUERY, False, set(), set(), False),
    ("SHOW search_path", False, S.NOTAQUERY, False, set(), set(), False),
    # maintenance runs index expressions and operator classes: a write of what it names
    ("VACUUM ANALYZE t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("ANALYZE t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("ANALYZE", False, S.UNCACHEABLE, True, set(), set(), True),
    ("VACUUM t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM (FREEZE, ANALYZE) t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM (FULL false) t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM (FULL 0) t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("REINDEX TABLE t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("REINDEX (CONCURRENTLY) TABLE s.t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("REINDEX INDEX i", False, S.UNCACHEABLE, True, set(), set(), True),
    ("REINDEX SCHEMA s", False, S.UNCACHEABLE, True, set(), set(), True),
    # table rewrites: every row's ctid moves
    ("VACUUM FULL t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM FULL ANALYZE t, s.u", False, S.UNCACHEABLE, True, set(), {"t", "u"}, False),
    ("VACUUM (FULL) t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM (ANALYZE, FULL true) t (a)", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM (FULL false, FULL) t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("VACUUM FULL", False, S.UNCACHEABLE, True, set(), set(), True),
    ("VACUUM (FULL 1)", False, S.UNCACHEABLE, True, set(), set(), True),
    ("CLUSTER t USING t_pkey", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("CLUSTER s.t", False, S.UNCACHEABLE, True, set(), {"t"}, False),
    ("CLUSTER", False, S.UNCACHEABLE, True, set(), set(), True),
    ("PREPARE q AS SELECT 1", False, S.NOTAQUERY, False, set(), set(), False),
    ("DEALLOCATE q", False, S.NOTAQUERY, False, set(), set(), False),
    ("DECLARE c CURSOR FOR SELECT * FROM t", False, S.NOTAQUERY, False, {"t"}, set(), False),
    ("FETCH 10 FROM c", False, S.NOTAQUERY, False, set(), set(), False),
    ("MOVE NEXT IN c", False, S.NOTAQUERY, False, set(), set(), False),
    ("CLOSE c", False, S.NOTAQUERY, False, set(), set(), False),
    ("", False, S.NOTAQUERY, False, set(), set(), False),
    (" ; -- nothing\n", False, S.NOTAQUERY, False, set(), set(), False),
    # multiple statements: write facts are still reported
    ("UPDATE a SET x = 1; SELECT * FROM b", False, S.MULTIPLESTATEMENTS, True, {"b"}, {"a"},
     False),
    ("SELECT 1; SELECT 2", False, S.MULTIPLESTATEMENTS, False, set(), set(), False),
    ("SELECT 1; DROP TABLE t", False, S.MULTIPLESTATEMENTS, True, set(), set(), True),
    # unreadable
    ("SELECT 'unterminated", False, S.PARSEERROR, False, set(), set(), False),
    ("SELEKT * FROM t", False, S.PARSEERROR, True, set(), set(), True),
]


@pytest.mark.parametrize(
    ("sql", "cacheable", "status", "is_write", "read", "written", "everything"), CASES
)
def test_classification_table(
    sql: str,
    cacheable: bool,
    status: Status | None,
    is_write: bool,
    read: set[str],
    written: set[str],
    everything: bool,
) -> None:
    c = classify(sql)
    assert (c.cacheable, c.status, c.is_write) == (cacheable, status, is_write), c.reason
    assert c.tables_read == F(read)
    assert c.tables_written == F(written)
    assert c.invalidate_all is everything
    assert c.cacheable == (c.status is None)
    if not c.cacheable:
        assert c.reason


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("SELECT random()", "random()"),
        ("SELECT my_func(1)", "volatility is unknown"),
        ("SELECT * FROM t FOR UPDATE", "FOR UPDATE"),
        ("UPDATE orders SET a = 1", "writes table orders"),
        ("SELECT now()", "time-dependent"),
    ],
)
def test_reasons(sql: str, needle: str) -> None:
    assert needle in classify(sql).reason


def test_qualified_names_for_display() -> None:
    c = classify('SELECT * FROM public.t JOIN "Sales"."Orders" o ON TRUE JOIN u ON TRUE')
    assert c.qualified_tables == ("public.t", "Sales.Orders", "u")
    assert c.tables_read == F({"t", "Orders", "u"})


@pytest.mark.parametrize(
    ("sql", "changes"),
    [
        ("SET search_path TO app, public", True),
        ("SET search_path = 'a, b'", True),
        ("SET TimeZone = 'UTC'", True),
        ("SET TIME ZONE 'Europe/Paris'", True),
        ("SET SESSION statement_timeout = 5", True),
        ("SET datestyle TO DEFAULT", True),
        ("RESET search_path", True),
        ("SET ROLE admin", True),
        ("RESET ROLE", True),
        ("SET SESSION AUTHORIZATION bob", True),
        ("SET NAMES 'UTF8'", True),
        ("SET app.tenant = 'a'", True),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", True),
        ("RESET ALL", True),
        ("DISCARD ALL", True),
        ("DISCARD TEMP", True),
        ("SET LOCAL work_mem = '1MB'", False),
        ("SET LOCAL search_path = evil, pg_catalog, public", True),  # a keyed write in the transaction
        ("SET LOCAL ROLE admin", True),
        ("SET LOCAL SESSION AUTHORIZATION bob", True),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", False),
        ("SET CONSTRAINTS ALL DEFERRED", False),
    ],
)
def test_session_changes(sql: str, changes: bool) -> None:
    """The session learns its identity from the server again after anything that may change it;
    the text's idea of the new value is never used."""
    c = classify(sql)
    assert c.status is Status.NOTAQUERY and not c.cacheable and not c.is_write
    assert c.changes_session is changes


@pytest.mark.parametrize(
    ("sql", "control"),
    [
        ("BEGIN", "begin"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "begin"),
        ("START TRANSACTION READ ONLY", "begin"),
        ("COMMIT", "commit"),
        ("END", "commit"),
        ("ROLLBACK", "rollback"),
        ("ABORT", "rollback"),
        ("SAVEPOINT s1", "savepoint"),
        ("RELEASE SAVEPOINT s1", "release"),
        ("RELEASE s1", "release"),
        ("ROLLBACK TO SAVEPOINT s1", "rollback_to"),
        ("ROLLBACK TO s1", "rollback_to"),
        ("PREPARE TRANSACTION 'gid'", "prepare_transaction"),
        ("SELECT 1", None),
    ],
)
def test_transaction_control(sql: str, control: str | None) -> None:
    c = classify(sql)
    assert c.transaction_control == control
    if control is not None:
        assert c.status is Status.NOTAQUERY and not c.is_write


def test_commit_prepared_is_a_write_of_unknown_tables() -> None:
    c = classify("COMMIT PREPARED 'gid'")
    assert c.is_write and c.invalidate_all and c.transaction_control is None


# --- templates -------------------------------------------------------------------------

TEMPLATES = [
    ("select * from t where id = 42", "SELECT * FROM t WHERE id = ?"),
    ("SELECT  *\n FROM t WHERE name = 'bob'  AND x = -1.5e3",
     "SELECT * FROM t WHERE name = ? AND x = ?"),
    ("select * from t where id in (1, 2, 3)", "SELECT * FROM t WHERE id IN (?)"),
    ("select * from t where id = $1 and b = $2", "SELECT * FROM t WHERE id = $1 AND b = $2"),
    ("select $1::INT + 1", "SELECT $1::int + ?"),
    ('select "Col" from "My"."T"', 'SELECT "Col" FROM "My"."T"'),
    ("select count(*) from t -- secret 123", "SELECT count(*) FROM t"),
    ("insert into t values (1, 'a'), (2, 'b'), (3, 'c')", "INSERT INTO t VALUES (?, ?), ..."),
    ("select * from t where a = any(array[1, 2])", "SELECT * FROM t WHERE a = ANY (ARRAY[?])"),
    ("select E'x\\'y', $$dollar$$, $q$ quoted $q$, B'101', X'ff'", "SELECT ?, ?, ?, ?, ?"),
    ("select 1; select 2", "SELECT ?; SELECT ?"),
    ("select a from t order  by a desc, -1 group by b",
     "SELECT a FROM t ORDER BY a DESC, ? GROUP BY b"),
    ("select Name, NAME from T", "SELECT name, name FROM t"),
]


@pytest.mark.parametrize(("sql", "template"), TEMPLATES)
def test_templates(sql: str, template: str) -> None:
    assert classify(sql).template == template


SHAPES = [
    "SELECT * FROM orders WHERE id = {n} AND status = {s}",
    "SELECT * FROM t WHERE a IN ({n}, {n}, {s}) AND b BETWEEN {n} AND {n}",
    "UPDATE accounts SET balance = balance - {n}, note = {s} WHERE id = {n}",
    "INSERT INTO log (msg, level) VALUES ({s}, {n})",
    "SELECT {s}::date, interval {s}, {n} * price FROM items LIMIT {n} OFFSET {n}",
    "SELECT * FROM t WHERE j->>{s} = {s} ORDER BY {n}",
    "DELETE FROM sessions WHERE token = {s}; SELECT {n}",
    "SELECT * FROM t WHERE name = {s",  # unterminated: the tokenizer fails, regex redacts
]


def _random_string(rng: random.Random) -> tuple[str, str]:
    """(SQL literal, the secret inside it)."""
    secret = "".join(rng.choice("abcdefghijkXYZ0123456789 _-%") for _ in range(rng.randint(6, 12)))
    secret = "zq" + secret.strip() + "zq"
    style = rng.randint(0, 3)
    if style == 0:
        return f"'{secret}'", secret
    if style == 1:
        return f"E'{secret}'", secret
    if style == 2:
        return f"$${secret}$$", secret
    return f"'{secret}''s'", secret


@pytest.mark.parametrize("shape", SHAPES)
def test_templates_never_contain_literals(shape: str) -> None:
    rng = random.Random(shape)
    ids = set()
    for _ in range(60):
        secrets: list[str] = []

        def number(_: re.Match[str], secrets: list[str] = secrets) -> str:
            value = str(rng.randint(100_000, 999_999_999))
            if rng.random() < 0.3:
                value = f"{value}.{rng.randint(10, 99)}"
            secrets.append(value)
            return ("-" if rng.random() < 0.3 else "") + value

        def string(_: re.Match[str], secrets: list[str] = secrets) -> str:
            literal, secret = _random_string(rng)
            secrets.append(secret)
            return literal

        sql = re.sub(r"\{n\}", number, shape)
        sql = re.sub(r"\{s\}", string, sql)
        sql = sql.replace("{s", _random_string(rng)[0][:-1])  # the unterminated one
        c = classify(sql)
        for secret in secrets:
            assert secret not in c.template, (sql, c.template)
        assert "zq" not in c.template
        assert not re.search(r"(?<![\w$])\d{6,}", c.template), c.template
        ids.add(c.template_id)
    # literal values never change the group, except the unterminated shape's varying style
    assert len(ids) == 1 or shape.endswith("{s")


def test_template_id_separates_structure() -> None:
    a = classify("SELECT * FROM t WHERE a = 1")
    b = classify("select *   from t where a = 2")
    c = classify("SELECT * FROM t WHERE b = 1")
    d = classify("SELECT * FROM u WHERE a = 1")
    assert a.template_id == b.template_id
    assert len({a.template_id, c.template_id, d.template_id}) == 3
    assert re.fullmatch(r"[0-9a-f]{16}", a.template_id)


def test_template_id_is_stable_across_processes() -> None:
    sql = "SELECT * FROM orders WHERE id = 7"
    code = (
        "from neonpoly.cache.policy import classify;"
        f"print(classify({sql!r}).template_id)"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == classify(sql).template_id


# --- robustness and memoisation ---------------------------------------------------------

GARBAGE = [
    "SELECT (((",
    "SELECT * FROM",
    "'",
    '"unterminated ident',
    "$$ never closed",
    "/* open comment",
    "SELECT 1 +",
    ";;;",
    "\x00\x01\x02",
    "SELECT " + "(" * 3000 + "1",
    "🙂 SELECT",
    "INSERT INTO",
    "WITH x AS (",
]


@pytest.mark.parametrize("sql", GARBAGE)
def test_never_raises(sql: str) -> None:
    c = classify(sql)
    assert isinstance(c, Classification)
    assert not c.cacheable


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    alphabet = "SELECT FROM WHERE ()'\"$;,.-+*/:1234abc\n\t"
    for _ in range(300):
        sql = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        c = classify(sql)
        assert isinstance(c, Classification)


def test_memoised_by_text() -> None:
    sql = "SELECT * FROM memo_check WHERE id = $1"
    assert classify(sql) is classify(sql)


def test_huge_text_is_classified_but_not_memoised() -> None:
    sql = "INSERT INTO big VALUES " + ", ".join(f"({i}, 'v{i}')" for i in range(3000))
    assert len(sql) > MEMO_MAX_CHARS
    c = classify(sql)
    assert c.tables_written == F({"big"})
    assert c.template == "INSERT INTO big VALUES (?, ?), ..."


def test_status_values_are_the_taxonomy() -> None:
    assert [s.value for s in Status] == [
        "hit", "miss", "uncacheable", "multiplestatements", "notaquery", "parseerror",
        "transaction", "volatile", "oversizedresult", "disabled", "bypass",
    ]


def test_warm_up_builds_tables_without_touching_the_memo() -> None:
    from neonpoly.cache.policy import warm_up

    warm_up()
    assert classify("SELECT lower(a) FROM t").cacheable


def test_texts_differing_only_in_numbers_share_one_parse() -> None:
    first = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 48213")
    second = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7")
    assert second is first  # no second parse
    assert classify("SELECT abalance FROM pgbench_accounts2 WHERE aid = 7") is not first
    # Only plain queries and DML share by shape: EXPLAIN's options may be numbers.
    harmless = classify("EXPLAIN (ANALYZE 0) DELETE FROM shape_t")
    assert not harmless.is_write
    assert classify("EXPLAIN (ANALYZE 1) DELETE FROM shape_t").is_write
    # Quoted names are not shared by shape: "t 1" and "t 2" are different tables.
    assert classify('SELECT * FROM "t 1"').tables_read == frozenset({"t 1"})
    assert classify('SELECT * FROM "t 2"').tables_read == frozenset({"t 2"})
    # Numbers inside names or placeholders are not numbers.
    assert classify("SELECT * FROM t1 WHERE a = $1").tables_read == frozenset({"t1"})
    assert classify("SELECT * FROM t2 WHERE a = $1").tables_read == frozenset({"t2"})


# --- parsed as the server parses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "read"),
    [
        # A non-recursive WITH query sees only the ones before it: the inner t is the table.
        ("WITH t AS (SELECT * FROM t) SELECT * FROM t", {"t"}),
        ("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM b", {"b"}),
        ("WITH RECURSIVE t AS (SELECT 1 UNION ALL SELECT * FROM t) SELECT * FROM t", set()),
        ("SELECT * FROM s.t, (WITH u AS (SELECT 1) SELECT * FROM u) x, u", {"t", "u"}),
    ],
)
def test_with_names_are_scoped_as_postgresql_scopes_them(sql: str, read: set[str]) -> None:
    assert classify(sql).tables_read == F(read)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ('no' || 'w')::timestamptz",
        "SELECT timezone('UTC', 'now')",
        "SELECT E'\\x6eow'::timestamptz",
        "SELECT $$now$$::date",
        "SELECT U&'\\006Eow'::timestamp",
        "SELECT * FROM t WHERE at <= 'NOW'",
        "SELECT 'tomorrow'::date",
        "SELECT CAST(lower('NOW') AS timestamptz)",
        "SELECT current_date + 1",
        "SELECT localtimestamp(2)",
        "SELECT * FROM t TABLESAMPLE bernoulli (10)",
        "SELECT v::timestamptz FROM t",  # the column may hold 'now'
        "SELECT * FROM jsonb_to_record('{}') AS r(ts timestamptz)",
    ],
)
def test_the_clock_in_any_spelling_is_volatile(sql: str) -> None:
    c = classify(sql)
    assert c.status is Status.VOLATILE, (sql, c.reason)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'epoch'::timestamptz, 'infinity'::date",
        "SELECT $1::timestamptz",  # a parameter is judged when it is bound
        "SELECT * FROM t TABLESAMPLE bernoulli (10) REPEATABLE (7)",
        "SELECT 'nowhere' AS place",
    ],
)
def test_fixed_times_stay_cacheable(sql: str) -> None:
    assert classify(sql).cacheable, classify(sql).reason


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT xmax FROM t",
        "SELECT t.xmax::text FROM t",
        "SELECT id FROM t WHERE xmax = 0",
        "SELECT s.cmax FROM t s",
        "SELECT count(*) FROM t GROUP BY xmax",
    ],
)
def test_columns_row_locks_stamp_are_volatile(sql: str) -> None:
    c = classify(sql)
    assert c.status is Status.VOLATILE and "row locks" in c.reason, (sql, c.reason)
    assert not c.invalidate_all  # a read, not code: nothing to evict


def test_columns_only_writes_change_stay_cacheable() -> None:
    assert classify("SELECT xmin, ctid, tableoid, cmin, v FROM t").cacheable


@pytest.mark.parametrize(
    ("sql", "written", "everything"),
    [
        ("EXPLAIN (ANALYZE 1) DELETE FROM t", {"t"}, False),
        ("EXPLAIN (ANALYZE true, FORMAT JSON) UPDATE t SET a = 1", {"t"}, False),
        ("EXPLAIN ANALYZE SELECT bump()", set(), True),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", {"t"}, False),
        ("COPY (SELECT bump()) TO STDOUT", set(), True),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT bump()", set(), True),
        ("SELECT 1 /* /* nested */ ; DELETE FROM t; */", set(), False),
    ],
)
def test_writes_hidden_in_other_statements(sql: str, written: set[str], everything: bool) -> None:
    c = classify(sql)
    assert c.tables_written == F(written)
    assert c.invalidate_all is everything
    assert (c.is_write or c.invalidate_all) is bool(written or everything)


def test_explain_without_analyze_does_not_write() -> None:
    for sql in ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE off) DELETE FROM t"):
        assert not classify(sql).is_write


def test_cursors_over_writing_queries_make_fetches_write() -> None:
    assert classify("DECLARE c CURSOR FOR SELECT bump()").cursor_writes
    assert not classify("DECLARE c CURSOR FOR SELECT * FROM t").cursor_writes
    assert classify("FETCH 10 FROM c").fetches and classify("MOVE NEXT IN c").fetches


def test_transaction_control_with_chain_still_commits() -> None:
    assert classify("COMMIT AND CHAIN").transaction_control == "commit"
    assert classify("END AND CHAIN").transaction_control == "commit"
    assert classify("ROLLBACK AND CHAIN").transaction_control == "rollback"


def test_builtins_trusted_by_name_are_reported_for_the_shadow_check() -> None:
    c = classify("SELECT lower(a) FROM t WHERE b = 1 AND c BETWEEN 1 AND 2 AND d::text = 'x'")
    assert {"lower()", "operator =", "operator <=", "operator >=", "type text"} <= c.shadowable
    qualified = classify("SELECT pg_catalog.lower(a) FROM t WHERE b OPERATOR(pg_catalog.=) 1")
    assert "lower()" not in qualified.shadowable and "operator =" not in qualified.shadowable
    outside = classify("SELECT a FROM t WHERE b OPERATOR(evil.=) 1")
    assert outside.status is Status.VOLATILE and outside.invalidate_all


def test_settings_read_join_the_identity_and_computed_names_are_volatile() -> None:
    c = classify("SELECT * FROM t WHERE tenant = current_setting('App.Tenant', true)")
    assert c.cacheable and c.settings_read == F({"app.tenant"})
    assert classify("SELECT current_setting(name) FROM t").status is Status.VOLATILE


@pytest.mark.parametrize(
    "sql",
    ["GRANT r1 TO r2", "ALTER ROLE r SET search_path = x", "ALTER DATABASE d SET x = 1", "DROP ROLE r",
     "REVOKE SELECT ON t FROM r"],
)
def test_roles_and_grants_are_cluster_wide(sql: str) -> None:
    c = classify(sql)
    assert c.cluster_wide and c.invalidate_all and c.changes_session


def test_deallocate_names_what_it_drops() -> None:
    assert classify("DEALLOCATE s1").deallocates == "s1"
    assert classify('DEALLOCATE PREPARE "S 1"').deallocates == "S 1"
    assert classify("DEALLOCATE ALL").deallocates == "*"
    assert classify("DISCARD ALL").deallocates == "*"


def test_the_number_pattern_finds_what_the_lookbehind_first_spelling_finds() -> None:
    # The shape a text shares its classification by: the faster spelling must replace exactly
    # the numbers the plain one did, or texts would share a parse they did not before.
    from neonpoly.cache.policy import _NUMBER

    plain = re.compile(r"(?<![\w$.'@])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
    rng = random.Random(10)
    alphabet = "0123456789abxyzE.e$'\"_ -+,()=;é٣@"
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert _NUMBER.sub("0", text) == plain.sub("0", text), text

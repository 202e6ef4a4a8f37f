"""Rules and modes: precedence, persistence, and the TTL policy a QueryCache consults."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from neonpoly.admin.commands import AdminError, parse
from neonpoly.cache.adaptive import AdaptiveTTL
from neonpoly.cache.rules import RuleBook, RuleError, RulePolicy, bare_tables, normalize_table


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(book: RuleBook, cache_id: str = "c", max_ttl: float = 300.0, auto: AdaptiveTTL | None = None) -> RulePolicy:
    return RulePolicy(book, cache_id, lambda: max_ttl, auto)


def test_quoted_names_keep_their_case() -> None:
    book = RuleBook()
    book.add("table", '"MyTab"', None)
    book.add("table", "Lower", 7)
    p = policy(book)
    assert p("q", frozenset({"MyTab"})) is None  # the classifier's spelling of "MyTab"
    assert p("q", frozenset({"lower"})) == 7
    assert bare_tables(["other.MyTab", "items"]) == ["MyTab", "items"]


def test_normalize_table_matches_the_classifier() -> None:
    assert normalize_table("public.Items") == "items"
    assert normalize_table('"MyTab"') == "MyTab"
    assert normalize_table('s."a.b"') == "a.b"
    assert normalize_table("  ITEMS ") == "items"


def test_defaults_to_auto_with_cache_ttl() -> None:
    book = RuleBook()
    p = policy(book)
    assert p("t1", frozenset({"a"})) == 300.0
    assert p.decide("t1", ["a"]).source == "auto"


def test_lowest_table_ttl_wins_and_never_wins_over_all() -> None:
    book = RuleBook()
    p = policy(book)
    book.add("table", "a", 60)
    book.add("table", "b", 10)
    assert p("q", frozenset({"a", "b"})) == 10
    assert p("q", frozenset({"a", "c"})) == 60  # c has no rule: auto (300) is higher
    never = book.add("table", "c", None)
    assert p("q", frozenset({"a", "c"})) is None
    assert p.decide("q", ["a", "c"]).source == f"never (rule {never.id})"
    book.add("query", "q", 5)
    assert p("q", frozenset({"a"})) == 5  # a template rule beats table TTLs …
    assert p("q", frozenset({"a", "c"})) is None  # … but not a table's "never"


def test_template_never_and_cache_scoped_rules() -> None:
    book = RuleBook()
    book.add("query", "Q1", None, cache_id="c")
    assert policy(book, "c")("q1", frozenset()) is None
    assert policy(book, "other")("q1", frozenset()) == 300.0
    book.add("table", "a", 100)
    book.add("table", "a", 20, cache_id="c")
    assert policy(book, "c")("x", frozenset({"a"})) == 20  # cache-specific beats global
    assert policy(book, "d")("x", frozenset({"a"})) == 100


def test_modes() -> None:
    book = RuleBook()
    auto = AdaptiveTTL()
    for _ in range(30):
        auto.on_refetch("q", changed=True)  # always changed behind neonpoly's back
    p = policy(book, auto=auto)
    ttl = p("q", frozenset({"a"}))
    assert ttl is not None and ttl < 100.0
    assert "without a write through neonpoly" in p.decide("q", ["a"]).source
    assert p("other", frozenset({"a"})) == 300.0
    book.set_mode("fixed")
    assert p("q", frozenset({"a"})) == 300.0
    book.set_mode("off", "c")
    assert p("q", frozenset({"a"})) is None
    book.add("table", "a", 42)
    assert p("q", frozenset({"a"})) == 42  # off mode caches what a TTL rule names
    assert p("q", frozenset({"a", "b"})) is None  # b has no rule
    assert policy(book, "other")("q", frozenset({"b"})) == 300.0
    with pytest.raises(RuleError):
        book.set_mode("sometimes")


def test_persisted_and_reloaded(tmp_path: Path) -> None:
    changes: list[int] = []
    book = RuleBook.in_dir(tmp_path)
    book.listeners.append(lambda: changes.append(1))
    r1 = book.add("table", "public.A", 60, cache_id="c")
    r2 = book.add("query", "abc", None)
    book.set_mode("off", "c")
    book.drop(r1.id)
    assert len(changes) == 4
    again = RuleBook.in_dir(tmp_path)
    assert [(r.id, r.target, r.name, r.ttl) for r in again.rules()] == [(r2.id, "query", "abc", None)]
    assert again.mode("c") == "off" and again.mode("x") == "auto"
    assert again.add("table", "b", 1).id == "r3"  # ids are never reused
    with pytest.raises(RuleError):
        again.drop("r1")
    with pytest.raises(RuleError):
        again.add("table", "b", -5)


def test_statement_grammar() -> None:
    assert parse("show queries;").verb == "show queries"
    c = parse("Create Rule On Table public.Items TTL 60 for cache shop")
    assert (c.verb, c.target, c.name, c.ttl, c.cache_id) == ("create rule", "table", "public.Items", 60.0, "shop")
    c = parse("CREATE RULE ON QUERY 3be04863778f63ed NEVER")
    assert (c.target, c.name, c.ttl) == ("query", "3be04863778f63ed", None)
    assert parse("PURGE TABLE public.Items").name == "items"
    assert parse("set mode OFF").name == "off"
    assert parse("DROP RULE R2").name == "r2"
    for bad in (
        "",
        "SHOW",
        "SHOW STATS NOW",
        "PURGE",
        "CREATE RULE ON TABLE t",
        "SET MODE maybe",
        "CREATE RULE ON TABLE t TTL x",
        "SELECT 1",
    ):
        with pytest.raises(AdminError) as err:
            parse(bad)
        assert err.value.sqlstate == "42601" and err.value.hint and "SHOW QUERIES" in err.value.hint


def test_a_live_change_feed_lengthens_auto_ttls_only() -> None:
    book = RuleBook()
    following: dict[frozenset[str], float | None] = {frozenset({"t"}): 3600.0}
    p = RulePolicy(book, "c", lambda: 300.0, AdaptiveTTL(), feed_ttl=lambda tables: following.get(tables))
    assert p("q", frozenset({"t"})) == 3600.0
    assert p("q", frozenset({"u"})) == 300.0  # a table the feed does not follow
    assert "change feed live" in p.decide("q", ["t"], 3600.0).source
    following[frozenset({"t"})] = None  # the feed went down: the memo cannot hand out the long TTL
    assert p("q", frozenset({"t"})) == 300.0
    following[frozenset({"t"})] = 3600.0
    book.add("table", "t", 60)
    assert p("q", frozenset({"t"})) == 60  # a rule still wins
    book.set_mode("fixed", "c")
    assert p.decide("q", ["u"], 3600.0).ttl == 300.0  # fixed: the cache's TTL
    book.set_mode("auto", "c")
    assert p.decide("q", ["u"], 10.0).ttl == 300.0  # never shorter than the cache's


def test_whether_a_template_is_cached_follows_every_rule_change_at_once() -> None:
    # Asked for every miss without a clock: memoised until the book changes.
    book = RuleBook()
    reported: list[tuple[str, float | None]] = []
    p = RulePolicy(book, "c", lambda: 300.0, AdaptiveTTL(), lambda t, ttl: reported.append((t, ttl)))
    t = frozenset({"t"})
    assert p.allows("q", t) and reported == [("q", 300.0)]  # the TTL decided is reported
    rule = book.add("table", "t", None)
    assert not p.allows("q", t)
    book.drop(rule.id)
    assert p.allows("q", t)
    book.add("query", "q", None, cache_id="c")
    assert not p.allows("q", t) and p.allows("q2", t)
    book.set_mode("off", "c")
    assert not p.allows("q2", t) and not p.allows("q3", frozenset())
    book.set_mode("fixed", "c")
    assert p.allows("q2", t)


def test_allows_is_whether_there_is_a_ttl_whatever_the_feed_and_learning() -> None:
    for mode in ("auto", "fixed", "off"):
        for rules in ((), (("table", "t", 30.0),), (("table", "t", None),), (("query", "q", None),)):
            for feed in (None, 3600.0):
                book = RuleBook()
                book.set_mode(mode, "c")
                for target, name, ttl in rules:
                    book.add(target, name, ttl)  # type: ignore[arg-type]
                auto = AdaptiveTTL()
                p = RulePolicy(book, "c", lambda: 300.0, auto, feed_ttl=_constant(feed))
                for tables in (frozenset({"t"}), frozenset({"u"}), frozenset()):
                    assert p.allows("q", tables) == (p("q", tables) is not None), (mode, rules, feed, tables)


def _constant(ttl: float | None) -> Callable[[frozenset[str]], float | None]:
    return lambda tables: ttl

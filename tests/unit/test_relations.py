from neonpoly.cache.relations import RelationBook, askable, lookup_sql


def test_views_are_tagged_with_their_base_tables() -> None:
    book = RelationBook()
    assert book.resolve("app", ["v", "t"]) is None
    assert book.unknown("app", ["v", "t"]) == ["v", "t"]
    book.learn("app", ["v", "t"], [("r", "v", "v", False), ("r", "v", "t", False), ("r", "t", "t", False)])
    assert book.resolve("app", ["v"]) == (frozenset({"v", "t"}), False)
    assert book.resolve("other", ["v"]) is None  # per database


def test_volatile_and_refused_relations_are_never_cacheable() -> None:
    book = RelationBook()
    book.learn("app", ["stats"], [("r", "stats", "stats", True)])
    book.refuse("app", ["Weird Name"])
    assert book.volatile("app", ["stats"]) and book.volatile("app", ["Weird Name"])
    assert book.resolve("app", ["stats"]) == (frozenset({"stats"}), True)


def test_unknown_names_are_plain_and_ddl_forgets() -> None:
    book = RelationBook()
    book.learn("app", ["missing"], [])
    assert book.resolve("app", ["missing"]) == (frozenset({"missing"}), False)
    book.forget("app")
    assert book.resolve("app", ["missing"]) is None


def test_lookup_sql_only_takes_plain_names() -> None:
    assert askable("orders") and askable("_t1") and not askable('a"b') and not askable("a,b")
    sql = lookup_sql(["b", "a", "a"])
    assert "'{a,b}'::text[]" in sql


def test_writes_reach_cascades_and_triggers_evict_everything() -> None:
    book = RelationBook()
    assert book.reach("app", ["parent"]) is None  # unknown: evict the database
    book.learn(
        "app",
        ["parent", "audited"],
        [("w", "parent", "parent", False), ("w", "parent", "child", False), ("w", "audited", "audited", True)],
    )
    assert book.reach("app", ["parent"]) == frozenset({"parent", "child"})
    assert book.reach("app", ["parent", "audited"]) is None  # a trigger may write anything

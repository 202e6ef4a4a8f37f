from neonpoly.cache.relation_lookup import LOOKUP_SQL, lookup_params
from neonpoly.cache.relations import RelationBook, Resolution

NO_SHADOWS: list[tuple[str, str, str, bool, str | None]] = []


def test_views_are_tagged_with_their_base_tables() -> None:
    book = RelationBook()
    assert book.resolve("app", ["v", "t"]) is None
    assert book.unknown("app", ["v", "t"]) == ["v", "t"]
    book.learn(
        "app",
        ["v", "t"],
        [("r", "v", "v", False, " SELECT t.a FROM t;"), ("r", "v", "t", False, None), ("r", "t", "t", False, None)],
    )
    assert book.resolve("app", ["v"]) == Resolution(frozenset({"v", "t"}), None, None)
    assert book.resolve("other", ["v"]) is None  # per database


def test_sequences_catalogs_and_refused_relations_are_never_cacheable() -> None:
    book = RelationBook()
    book.learn("app", ["seq"], [("r", "seq", "seq", True, None)])
    book.refuse("app", ["gone"])
    seq = book.resolve("app", ["seq"])
    assert seq is not None and seq.volatile and seq.runs_code is None
    gone = book.resolve("app", ["gone"])
    assert gone is not None and gone.volatile and gone.runs_code


def test_views_over_the_clock_or_user_code_are_judged_by_their_definition() -> None:
    book = RelationBook()
    book.learn(
        "app",
        ["recent", "audited", "plain"],
        [
            ("r", "recent", "recent", False, " SELECT t.a FROM t WHERE t.ts > (CURRENT_TIMESTAMP - '1h'::interval);"),
            ("r", "audited", "audited", False, " SELECT log_access() AS log_access;"),
            ("r", "plain", "plain", False, " SELECT lower(t.a) AS lower FROM t;"),
        ],
    )
    recent = book.resolve("app", ["recent"])
    assert recent is not None and recent.volatile and recent.runs_code is None
    audited = book.resolve("app", ["audited"])
    assert audited is not None and audited.runs_code
    assert book.resolve("app", ["plain"]) == Resolution(frozenset({"plain"}), None, None)


def test_policies_add_what_they_read_and_their_code() -> None:
    book = RelationBook()
    book.learn(
        "app",
        ["docs"],
        [
            ("r", "docs", "docs", False, None),
            ("r", "docs", "members", False, None),  # read by the policy
            ("p", "docs", "docs", False, "SELECT (tenant = current_setting('app.tenant'::text))"),
        ],
    )
    # The setting the policy reads joins the session identity.
    assert book.resolve("app", ["docs"]) == Resolution(
        frozenset({"docs", "members"}), None, None, frozenset({"app.tenant"})
    )
    book.learn("app", ["clocked"], [("p", "clocked", "clocked", False, "SELECT (ts > now())")])
    clocked = book.resolve("app", ["clocked"])
    assert clocked is not None and clocked.volatile


def test_builtins_shadowed_in_a_database_are_not_trusted() -> None:
    book = RelationBook()
    book.learn("app", [], [("s", "", "lower()", False, None), ("s", "", "operator ===", False, None)])
    book.learn("other", [], NO_SHADOWS)
    shadowed = book.resolve("app", [], {"lower()"})
    assert shadowed is not None and shadowed.runs_code and "lower()" in shadowed.runs_code
    assert book.resolve("app", [], {"upper()", "operator ="}) == Resolution(frozenset(), None, None)
    assert book.resolve("other", [], {"lower()"}) == Resolution(frozenset(), None, None)
    assert book.resolve("third", [], {"lower()"}) is None  # not asked yet


def test_unknown_names_are_plain_and_ddl_forgets() -> None:
    book = RelationBook()
    book.learn("app", ["missing"], NO_SHADOWS)
    assert book.resolve("app", ["missing"]) == Resolution(frozenset({"missing"}), None, None)
    book.forget("app")
    assert book.resolve("app", ["missing"]) is None


def test_lookup_takes_names_as_a_parameter_and_qualifies_everything() -> None:
    names, shadows = lookup_params(["b", 'we"ird', "a,b", "a"], True)
    assert names == '{"a","a,b","b","we\\"ird"}' and shadows == "true"
    # Nothing a client's search_path can redirect: every operator is pg_catalog's.
    for operator in (" = ", " <> ", " IN "):
        assert operator not in LOOKUP_SQL


def test_writes_reach_cascades_and_triggers_evict_everything() -> None:
    book = RelationBook()
    assert book.reach("app", ["parent"]) is None  # unknown: evict the database
    book.learn(
        "app",
        ["parent", "audited"],
        [
            ("w", "parent", "parent", False, None),
            ("w", "parent", "child", False, None),
            ("w", "audited", "audited", True, None),
        ],
    )
    assert book.reach("app", ["parent"]) == frozenset({"parent", "child"})
    assert book.reach("app", ["parent", "audited"]) is None  # a trigger may write anything


def test_the_change_feed_follows_permanent_tables_and_views_over_them_only() -> None:
    book = RelationBook()
    assert not book.followed(["t"])  # not looked up
    book.learn(
        "app",
        ["t", "v", "u", "w"],
        [
            ("r", "t", "t", False, None),
            ("r", "v", "v", False, " SELECT t.a FROM t;"), ("r", "v", "t", False, None),
            ("r", "u", "u", False, None), ("u", "u", "u", False, None),  # unlogged
            ("r", "w", "w", False, " SELECT u.a FROM u;"), ("r", "w", "u", False, None), ("u", "w", "u", False, None),
        ],
    )
    assert book.followed(["t"]) and book.followed(["v", "t"])
    assert not book.followed(["u"]) and not book.followed(["w"]) and not book.followed(["t", "u"])
    book.learn("other", ["t"], [("r", "t", "t", False, None), ("u", "t", "t", False, None)])
    assert not book.followed(["t"])  # unlogged in another database of the same name: no
    book.forget("other")
    assert book.followed(["t"])
    book.forget()
    assert not book.followed(["t"])


def test_the_version_moves_whenever_an_answer_may_change() -> None:
    """A session's write memo holds the book's answers while the version stands still."""
    book = RelationBook()
    seen = [book.version]
    book.learn("app", ["t"], NO_SHADOWS)
    seen.append(book.version)
    book.resolve("app", ["t"])
    book.reach("app", ["t"])
    assert book.version == seen[-1]  # asking changes nothing
    book.refuse("app", ["u"])
    seen.append(book.version)
    book.forget("app")
    seen.append(book.version)
    book.forget()
    seen.append(book.version)
    assert len(set(seen)) == len(seen)


def test_views_casting_to_a_domain_whose_check_runs_code() -> None:
    """A view's casts are bound when it is made (no rivals), but a domain whose CHECK calls
    code of the user's runs it: listed with the rivals ('c'), learned again after a failure."""
    book = RelationBook()
    book.refuse("app", ["gone"])  # the first lookup failed: the code types are not known
    assert book.knows_shadows("app") and not book.knows_code_types("app")
    rows = [
        ("x", "*", "", False, None),
        ("c", "*", "type bumping", False, "SELECT (public.bump() > 0)"),
        ("c", "*", "type positive", False, "SELECT (VALUE > 0)"),
        ("r", "v", "v", False, " SELECT (t.a)::bumping AS a FROM t;"),
        ("r", "v", "t", False, None),
        ("r", "w", "w", False, " SELECT (t.a)::positive AS a FROM t;"),
        ("r", "w", "t", False, None),
    ]
    book.learn("app", ["v", "w"], rows)
    assert book.knows_code_types("app")
    v, w = book.resolve("app", ["v"]), book.resolve("app", ["w"])
    assert v is not None and v.runs_code is not None and "type bumping" in v.runs_code
    assert w is not None and w.runs_code is None


def test_code_a_read_runs_makes_its_writes_opaque_and_user_indexes_make_reads_run_code() -> None:
    """A view's quals run in a write through it; an index's operator class of the user's runs
    in a read the planner answers by it (tests/adversarial/test_46 proves both on a server)."""
    book = RelationBook()
    book.learn(
        "app",
        ["v", "t", "plain"],
        [
            ("r", "v", "v", False, " SELECT t.id FROM t WHERE bump() > 0;"), ("r", "v", "t", False, None),
            ("w", "v", "v", False, None), ("w", "v", "t", False, None),
            ("r", "t", "t", False, None), ("i", "t", "t", False, None), ("w", "t", "t", False, None),
            ("r", "plain", "plain", False, None), ("w", "plain", "plain", False, None),
        ],
    )
    assert book.reach("app", ["v"]) is None  # the whole database
    t = book.resolve("app", ["t"])
    assert t is not None and t.runs_code and "index" in t.runs_code
    assert book.reach("app", ["plain"]) == frozenset({"plain"})


def test_index_expressions_that_call_code_of_the_users_make_reads_run_code() -> None:
    """Planning folds an index's calls of constants when it loads the index."""
    book = RelationBook()
    book.learn(
        "app",
        ["folded", "plain"],
        [
            ("r", "folded", "folded", False, None), ("j", "folded", "folded", False, "SELECT (id > lying(0))"),
            ("r", "plain", "plain", False, None), ("j", "plain", "plain", False, "SELECT lower(name)"),
        ],
    )
    folded = book.resolve("app", ["folded"])
    assert folded is not None and folded.runs_code
    assert book.resolve("app", ["plain"]) == Resolution(frozenset({"plain"}), None, None)


def test_a_write_reaching_a_system_catalog_is_opaque() -> None:
    """An updatable view over pg_description writes the catalog (tests/adversarial/test_47):
    pg_depend records no dependency on a catalog (pinned), so only its definition says so."""
    book = RelationBook()
    book.learn(
        "app",
        ["descr", "v"],
        [
            ("r", "descr", "descr", False, " SELECT pg_description.objoid FROM pg_description;"),
            ("w", "descr", "descr", False, None),
            ("r", "v", "v", False, " SELECT t.a FROM t;"), ("r", "v", "t", False, None),
            ("w", "v", "v", False, None), ("w", "v", "t", False, None),
        ],
    )
    assert book.reach("app", ["descr"]) is None
    assert book.reach("app", ["v"]) == frozenset({"v", "t"})

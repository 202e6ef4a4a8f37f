"""The statement book believes a Parse, Close or DEALLOCATE only once the origin confirmed
it (proxy/extended.py: StatementBook.confirm/settle); a Bind of a statement it does not know
may run anything."""

from __future__ import annotations

from neonpoly import pgwire
from neonpoly.pgwire import MSG_BIND, MSG_CLOSE, MSG_DESCRIBE, MSG_EXECUTE, MSG_PARSE, TARGET_PORTAL, TARGET_STATEMENT
from neonpoly.proxy.extended import BookOp, StatementBook

EXECUTE = pgwire.cstr("") + b"\x00\x00\x00\x00"
READ = "SELECT v FROM t WHERE k = $1"
WRITE_ALL = "UPDATE t SET v = 'x' WHERE k >= $1"


def _parse(name: str, sql: str) -> tuple[int, bytes]:
    return MSG_PARSE, pgwire.cstr(name) + pgwire.cstr(sql) + b"\x00\x00"


def _close(name: str) -> tuple[int, bytes]:
    return MSG_CLOSE, TARGET_STATEMENT + pgwire.cstr(name)


def _bind_run(statement: str) -> list[tuple[int, bytes]]:
    bind = pgwire.cstr("") + pgwire.cstr(statement) + b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"
    return [(MSG_BIND, bind), (MSG_DESCRIBE, TARGET_PORTAL + pgwire.cstr("")), (MSG_EXECUTE, EXECUTE)]


def _sent(book: StatementBook, *messages: tuple[int, bytes]) -> list[BookOp]:
    """A batch forwarded with its Sync."""
    ops = book.after_forward(book.plan(list(messages)))
    book.synced()
    return ops


def test_a_confirmed_parse_is_believed() -> None:
    book = StatementBook()
    for op in _sent(book, _parse("s", READ)):
        book.confirm(op)
    assert book.known("s") is not None
    plan = book.plan(_bind_run("s"))
    assert plan.status is None and plan.tables == frozenset({"t"}) and not plan.writes_everything


def test_a_bind_of_a_statement_parsed_but_not_confirmed_may_run_anything() -> None:
    book = StatementBook()
    _sent(book, _parse("s", READ))
    assert book.known("s") is None
    plan = book.plan(_bind_run("s"))
    assert plan.status is not None and plan.writes_everything


def test_a_bind_of_a_statement_the_book_never_saw_may_run_anything() -> None:
    # PREPAREd in SQL: the same namespace as protocol statements.
    plan = StatementBook().plan(_bind_run("prepared_in_sql"))
    assert plan.status is not None and plan.writes_everything and plan.changes_session


def test_a_bind_of_a_statement_closed_earlier_in_its_batch_fails_and_writes_nothing() -> None:
    book = StatementBook()
    for op in _sent(book, _parse("s", READ)):
        book.confirm(op)
    plan = book.plan([_close("s"), *_bind_run("s")])
    assert plan.status is not None and not plan.writes_everything


def test_a_refused_parse_leaves_the_name_unknown() -> None:
    book = StatementBook()
    (op,) = _sent(book, _parse("s", READ))
    book.settle(op)  # 42P05: s was PREPAREd in SQL
    assert book.known("s") is None and "s" not in book.statements
    assert "s" in book.unknown
    plan = book.plan(_bind_run("s"))
    assert plan.status is not None and plan.writes_everything
    # A Parse of it again goes to the origin as it is (no Close of what the origin holds
    # there on the client's behalf), never answered locally: only the origin knows.
    again = book.plan([_parse("s", READ)])
    assert again.forward and book.deferred_parses(again) == []
    for op in book.after_forward(again):
        book.confirm(op)
    assert book.known("s") is not None and "s" not in book.unknown


def test_parses_and_closes_skipped_after_an_error_are_unknown_those_before_it_hold() -> None:
    book = StatementBook()
    for op in _sent(book, _parse("s", WRITE_ALL)):
        book.confirm(op)
    first, close, again = _sent(book, _parse("a", READ), _close("s"), _parse("s", READ))
    assert (first.kind, close.kind, again.kind) == (b"P", b"C", b"P")
    book.confirm(first)  # ParseComplete; then an Execute failed and the origin skipped the rest
    book.settle(close)
    book.settle(again)
    assert book.known("a") is not None
    assert book.known("s") is None
    assert book.plan(_bind_run("s")).writes_everything


def test_an_older_confirmation_does_not_vouch_for_a_newer_change() -> None:
    book = StatementBook()
    (older,) = _sent(book, _parse("s", READ))
    close, newer = _sent(book, _close("s"), _parse("s", WRITE_ALL))  # pipelined before the answer
    book.confirm(older)
    assert book.known("s") is None  # its latest Parse is still unanswered
    book.confirm(close)
    book.confirm(newer)
    known = book.known("s")
    assert known is not None and known.parse.query == WRITE_ALL
    (refused,) = _sent(book, _parse("s", READ))
    book.settle(refused)
    assert book.known("s") is None


def test_a_portal_close_is_answered_but_changes_no_statement() -> None:
    book = StatementBook()
    ops = _sent(book, _parse("s", READ), (MSG_CLOSE, TARGET_PORTAL + pgwire.cstr("")))
    assert [op.kind for op in ops] == [b"P", b"c"]
    for op in ops:
        book.confirm(op)
    assert book.known("s") is not None


def test_a_deallocate_drops_a_statement_the_origin_confirmed_it_dropped() -> None:
    book = StatementBook()
    for op in _sent(book, _parse("s", READ)):
        book.confirm(op)
    op = book.deallocating("s")
    assert book.known("s") is None and book.plan(_bind_run("s")).writes_everything
    book.confirm(op)
    assert "s" not in book.origin_has and book.known("s") is None


def test_a_refused_deallocate_leaves_the_statement_unknown_at_the_origin() -> None:
    book = StatementBook()
    for op in _sent(book, _parse("s", READ), _parse("u", READ)):
        book.confirm(op)
    op = book.deallocating("*")  # DISCARD ALL in a failed transaction
    assert book.statements == {}
    book.settle(op)
    assert {"s", "u"} <= book.unknown
    assert book.plan(_bind_run("s")).writes_everything and book.plan(_bind_run("u")).writes_everything


def test_a_version_moves_with_every_confirmation_so_no_shape_outlives_it() -> None:
    book = StatementBook()
    (op,) = _sent(book, _parse("s", READ))
    unknown, _ = book.plan_shaped(_bind_run("s"))
    assert unknown.writes_everything
    book.confirm(op)
    known, _ = book.plan_shaped(_bind_run("s"))
    assert known is not unknown and known.status is None and not known.writes_everything


def test_a_statement_closed_in_a_batch_answered_locally_is_closed_at_the_origin_before_its_next_parse() -> None:
    book = StatementBook()
    for op in _sent(book, _parse("s", READ)):
        book.confirm(op)
    book.after_local(book.plan([_close("s")]))
    again = book.plan([_parse("s", WRITE_ALL)])
    assert not again.forward
    assert book.deferred_parses(again) == [pgwire.close_statement("s")]


def test_a_name_prepared_in_sql_is_unknown_and_its_parse_goes_to_the_origin() -> None:
    book = StatementBook()
    (older,) = _sent(book, _parse("s", READ))
    book.prepared_in_sql(["s"])
    book.confirm(older)  # answered before the PREPARE ran: says nothing about what it left
    assert book.known("s") is None and "s" in book.unknown
    assert book.plan(_bind_run("s")).writes_everything
    assert book.plan([_parse("s", READ)]).forward


def test_a_bind_before_the_next_sync_believes_the_parse_it_follows() -> None:
    """Streamed, or after a Flush: if the Parse fails the origin skips the Bind too."""
    book = StatementBook()
    (op,) = book.after_forward(book.plan([_parse("s", WRITE_ALL)]))
    plan = book.plan(_bind_run("s"))
    assert plan.writes == frozenset({"t"}) and not plan.writes_everything
    book.synced()
    assert book.plan(_bind_run("s")).writes_everything  # a batch after the Sync runs whatever is there
    book.confirm(op)
    assert not book.plan(_bind_run("s")).writes_everything

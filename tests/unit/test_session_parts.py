"""The small objects a session is made of, on their own: the batch being received and the
cancels held back while neonpoly's own lookup runs."""

from __future__ import annotations

from collections import deque

from neonpoly import pgwire
from neonpoly.pgwire import MSG_BIND, MSG_DESCRIBE, MSG_EXECUTE, MSG_PARSE, TARGET_PORTAL, TARGET_STATEMENT
from neonpoly.proxy.cancel import CancelGate
from neonpoly.proxy.extended import BatchBuffer, BatchPlan, StatementBook
from neonpoly.proxy.pending import Pending


def _parse(name: str, sql: str) -> bytes:
    return pgwire.cstr(name) + pgwire.cstr(sql) + b"\x00\x00"


def _bind(statement: str) -> bytes:
    return pgwire.cstr("") + pgwire.cstr(statement) + b"\x00\x00\x00\x00\x00\x00"


EXECUTE = pgwire.cstr("") + b"\x00\x00\x00\x00"


def _forwarded(book: StatementBook, plan: BatchPlan) -> None:
    """The batch went to the origin, which confirmed every Parse and Close in it."""
    for op in book.after_forward(plan):
        book.confirm(op)


def test_an_execute_of_a_copy_parsed_in_the_batch_runs_copy() -> None:
    batch = BatchBuffer(StatementBook())
    assert not batch.add(MSG_PARSE, _parse("c", "COPY t FROM STDIN"))
    assert not batch.add(MSG_BIND, _bind("c"))
    assert batch.add(MSG_EXECUTE, EXECUTE)
    assert [t for t, _ in batch.take()] == [MSG_PARSE, MSG_BIND, MSG_EXECUTE]
    assert batch.messages == []
    # Taken: what the next batch binds is judged afresh.
    assert not batch.add(MSG_BIND, _bind("c")) and not batch.add(MSG_EXECUTE, EXECUTE)


def test_an_execute_of_a_copy_from_an_earlier_batch_runs_copy() -> None:
    book = StatementBook()
    plan = book.plan([(MSG_PARSE, _parse("c", "COPY t TO STDOUT")), (MSG_PARSE, _parse("s", "SELECT 1"))])
    _forwarded(book, plan)
    batch = BatchBuffer(book)
    assert not batch.add(MSG_BIND, _bind("s")) and not batch.add(MSG_EXECUTE, EXECUTE)
    batch.take()
    assert not batch.add(MSG_BIND, _bind("c")) and batch.add(MSG_EXECUTE, EXECUTE)


def test_a_flush_ended_batch_expects_one_answer_a_message_two_per_statement_describe() -> None:
    batch = BatchBuffer(StatementBook())
    batch.add(MSG_PARSE, _parse("s", "SELECT 1"))
    batch.add(MSG_DESCRIBE, TARGET_STATEMENT + pgwire.cstr("s"))
    batch.add(MSG_BIND, _bind("s"))
    batch.add(MSG_DESCRIBE, TARGET_PORTAL + pgwire.cstr(""))
    assert batch.expected_answers() == 5
    batch.add(MSG_EXECUTE, EXECUTE)
    assert batch.expected_answers() is None  # rows stream: no count


def test_cancels_wait_for_neonpolys_own_lookup_at_the_head() -> None:
    pending: deque[Pending] = deque()
    gate = CancelGate(pending)
    fired: list[int] = []
    pending.append(Pending(0.0, neutral=True, identity=frozenset()))
    gate.hold(lambda: fired.append(1))
    gate.release(closed=False)
    assert fired == [] and len(gate) == 1
    pending.popleft()
    pending.append(Pending(0.0))  # the client's own request runs now
    gate.release(closed=False)
    assert fired == [1] and len(gate) == 0


def test_a_closed_session_lets_held_cancels_go() -> None:
    pending: deque[Pending] = deque([Pending(0.0, lookup=["t"])])
    gate = CancelGate(pending)
    fired: list[int] = []
    gate.hold(lambda: fired.append(1))
    gate.release(closed=True)
    assert fired == [1]



def _bind_values(statement: str, value: bytes) -> bytes:
    return (
        pgwire.cstr("") + pgwire.cstr(statement) + b"\x00\x00\x00\x01"
        + len(value).to_bytes(4, "big") + value + b"\x00\x00"
    )  # fmt: skip


def _describe_execute() -> list[tuple[int, bytes]]:
    return [(MSG_DESCRIBE, TARGET_PORTAL + pgwire.cstr("")), (MSG_EXECUTE, EXECUTE)]


def test_a_batch_shape_is_planned_once_and_keyed_by_its_values() -> None:
    book = StatementBook()
    _forwarded(book, book.plan([(MSG_PARSE, _parse("s", "SELECT v FROM t WHERE k = $1"))]))
    one = [(MSG_BIND, _bind_values("s", b"1")), *_describe_execute()]
    two = [(MSG_BIND, _bind_values("s", b"2")), *_describe_execute()]
    plan_one, material_one = book.plan_shaped(one)
    plan_two, material_two = book.plan_shaped(two)
    assert plan_two is plan_one  # the same shape: planned once
    # The material is what a full plan of each batch says: same keys as before the memo.
    assert material_one == book.plan(one).material
    assert material_two == book.plan(two).material
    assert material_one != material_two


def test_a_statement_parsed_again_under_its_name_is_planned_and_classified_anew() -> None:
    book = StatementBook()
    _forwarded(book, book.plan([(MSG_PARSE, _parse("s", "SELECT v FROM t WHERE k = $1"))]))
    batch = [(MSG_BIND, _bind_values("s", b"1")), *_describe_execute()]
    read, _ = book.plan_shaped(batch)
    assert read.status is None and read.tables == frozenset({"t"}) and not read.writes
    # Same name, same Bind bytes, other text: a write now. The version moved, so the memo
    # of the old shape must not answer.
    _forwarded(book, book.plan([(MSG_PARSE, _parse("s", "DELETE FROM u WHERE k = $1 RETURNING v"))]))
    write, material = book.plan_shaped(batch)
    assert write is not read
    assert write.writes == frozenset({"u"}) and write.status is not None
    assert material == book.plan(batch).material


def test_values_that_read_the_clock_are_refused_per_batch() -> None:
    book = StatementBook()
    _forwarded(book, book.plan([(MSG_PARSE, _parse("s", "SELECT v FROM t WHERE at < $1"))]))
    plain, _ = book.plan_shaped([(MSG_BIND, _bind_values("s", b"2024-01-01")), *_describe_execute()])
    clock, _ = book.plan_shaped([(MSG_BIND, _bind_values("s", b"now")), *_describe_execute()])
    again, _ = book.plan_shaped([(MSG_BIND, _bind_values("s", b"2024-01-02")), *_describe_execute()])
    assert plain.status is None and again is plain
    assert clock.status is not None and clock is not plain

"""Extended query protocol: prepared-statement tracking and whole-batch decisions.

A batch is every client message up to Sync. The cache decides on the whole batch: either
every Execute/Describe in it can be answered from one stored response (so the batch is
served with no origin round trip), or the batch goes to the origin, preceded by any Parse
the origin never saw because an earlier batch was answered locally.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from neonpoly import pgwire
from neonpoly.cache.policy import Classification, Status, classify
from neonpoly.pgwire import MSG_BIND, MSG_CLOSE, MSG_DESCRIBE, MSG_EXECUTE, MSG_PARSE, TARGET_STATEMENT

# The messages a batch collects until its Sync.
BATCHED = frozenset((MSG_PARSE, MSG_BIND, MSG_DESCRIBE, MSG_EXECUTE, MSG_CLOSE))

# A parameter sent as text becomes a date/time by the server's input function, which reads the
# clock for these words ('now' bound to a timestamptz). Binary values cannot spell them as
# a date; matching their bytes anyway only costs a miss.
_CLOCK_WORDS = re.compile(rb"(?i)(?<![a-z])(now|today|tomorrow|yesterday)(?![a-z])")

# Batch shapes remembered per session (see StatementBook.plan_shaped): a driver's statements.
MAX_SHAPES = 512


@dataclass(slots=True)
class Statement:
    parse: pgwire.ParseMsg
    info: Classification
    at_origin: bool
    sql: bytes = b""  # the query text and declared parameter types as key material, encoded once

    def __post_init__(self) -> None:
        # The same text means something else with other parameter types ($1 < '9' as text
        # or as integer): both are part of what a Bind or Describe of it is keyed by.
        self.sql = self.parse.query.encode() + b"\x00" + self.parse.param_types


@dataclass(slots=True)
class BatchPlan:
    """What a batch is, for the cache: key material, tables, and why it is not cacheable."""

    status: Status | None = None  # None: cacheable
    reason: str = ""
    material: bytes = b""
    # The material before hashing, each Bind's values as None (StatementBook.plan_shaped).
    pieces: tuple[bytes | None, ...] = ()
    tables: frozenset[str] = frozenset()
    executes: int = 0
    executed: list[Classification] = field(default_factory=list)  # per Bind, for the stats
    primary: Classification | None = None
    writes: frozenset[str] = frozenset()
    writes_everything: bool = False
    parses: list[pgwire.ParseMsg] = field(default_factory=list)
    # Parses and statement Closes in batch order: a name may be closed and parsed again.
    ops: list[pgwire.ParseMsg | str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # statement names the batch uses but did not Parse
    changes_session: bool = False
    commits: bool = False
    cursor_writes: bool = False
    fetches: bool = False
    cluster_wide: bool = False
    shadowable: frozenset[str] = frozenset()
    settings_read: frozenset[str] = frozenset()
    deallocates: list[str] = field(default_factory=list)


class StatementBook:
    """The prepared statements of one session, and whether the origin has each of them."""

    def __init__(self) -> None:
        self.statements: dict[str, Statement] = {}
        self.version = 0  # bumped whenever a statement is added or closed
        self.copies: set[str] = set()  # names of statements that run COPY
        # Named statements the origin holds, whatever the client did with them since: one
        # closed or parsed again in a batch the cache answered is still there in its old form.
        self.origin_has: set[str] = set()
        # Plans by batch shape: (version, the messages with every Bind's values cut off) ->
        # (plan, the key material around the values). See plan_shaped.
        self._shapes: dict[tuple[object, ...], tuple[BatchPlan, tuple[bytes | None, ...]]] = {}

    def plan_shaped(self, batch: list[tuple[int, bytes]]) -> tuple[BatchPlan, bytes]:
        """The plan of a batch and its key material, planned once per shape.

        A driver re-running a prepared statement sends the same Bind/Describe/Execute with
        other parameter values (pgbench -M prepared, asyncpg, psycopg): everything the plan
        says (statements, tables, refusals) depends on the messages without those values and
        on the book's version, which every Parse, Close and DEALLOCATE bumps (a statement
        parsed again under the same name with other text is planned, and classified, anew).
        The values only enter the key material and the clock-word check, done per batch. A
        batch that parses or closes is planned in full; so is one whose values read the clock
        (its refusal is per batch)."""
        key: list[object] = [self.version]
        tails: list[bytes] = []
        for mtype, body in batch:
            if mtype == MSG_BIND:
                # Values start after the portal and statement names (two NUL-ended strings).
                cut = body.find(b"\x00", body.find(b"\x00") + 1) + 1
                if cut <= 0:
                    break
                tail = body[cut:]
                if _CLOCK_WORDS.search(tail):
                    break
                key.append(body[:cut])
                tails.append(tail)
            elif mtype in (MSG_PARSE, MSG_CLOSE):
                break
            else:
                key.append(mtype)
                key.append(body)
        else:
            shape = tuple(key)
            found = self._shapes.get(shape)
            if found is None:
                plan = self.plan(batch)
                found = (plan, plan.pieces)
                if len(self._shapes) >= MAX_SHAPES:
                    self._shapes.clear()
                self._shapes[shape] = found
            plan, pieces = found
            parts: list[bytes] = []
            values = iter(tails)
            for piece in pieces:
                parts.append(next(values) if piece is None else piece)
            return plan, hashlib.blake2b(b"".join(parts), digest_size=32).digest()
        plan = self.plan(batch)
        return plan, plan.material

    def plan(self, batch: list[tuple[int, bytes]]) -> BatchPlan:
        plan = BatchPlan()
        local: dict[str, Statement] = {}
        portals: dict[str, tuple[Statement, bytes]] = {}
        # The key material in pieces, a Bind's values as None (plan_shaped puts others there).
        pieces: list[bytes | None] = []
        tables: set[str] = set()
        writes: set[str] = set()
        shadowable: set[str] = set()
        settings: set[str] = set()

        closed: set[str] = set()
        tails: list[bytes] = []

        def resolve(name: str) -> Statement | None:
            if name in closed and name not in local:
                return None  # closed earlier in this batch: the server will say it does not exist
            stmt = local.get(name) or self.statements.get(name)
            if stmt is not None and name not in local and name not in plan.needs:
                plan.needs.append(name)
            return stmt

        def refuse(status: Status, reason: str) -> None:
            if plan.status is None:
                plan.status, plan.reason = status, reason

        for mtype, body in batch:
            # The tags fed to `material` (b"P", b"B" ...) are part of every stored key.
            if mtype == MSG_PARSE:
                parse = pgwire.parse_parse(body)
                stmt = Statement(parse, classify(parse.query), at_origin=False)
                local[parse.name] = stmt
                plan.parses.append(parse)
                plan.ops.append(parse)
                plan.changes_session = plan.changes_session or stmt.info.changes_session
                pieces.append(b"P" + parse.query.encode() + b"\x00" + parse.param_types)
                if not stmt.info.cacheable:
                    refuse(stmt.info.status or Status.UNCACHEABLE, stmt.info.reason)
            elif mtype == MSG_BIND:
                bind = pgwire.parse_bind(body)
                bound = resolve(bind.statement)
                if bound is None:
                    refuse(Status.UNCACHEABLE, "binds a statement neonpoly has not seen")
                    continue
                portals[bind.portal] = (bound, bind.tail)
                self._note(bound.info, tables, writes, plan, refuse)
                shadowable |= bound.info.shadowable
                settings |= bound.info.settings_read
                if _CLOCK_WORDS.search(bind.tail):
                    refuse(Status.VOLATILE, "a parameter value reads the clock ('now', 'today' ...)")
                plan.executed.append(bound.info)
                pieces.append(b"B" + bound.sql)
                pieces.append(None)
                tails.append(bind.tail)
            elif mtype == MSG_DESCRIBE:
                target = pgwire.parse_target(body)
                if target.kind == TARGET_STATEMENT:
                    described = resolve(target.name)
                    if described is None:
                        refuse(Status.UNCACHEABLE, "describes an unknown statement")
                        continue
                    pieces.append(b"DS" + described.sql)
                    tables.update(described.info.tables_read)
                    shadowable |= described.info.shadowable
                    plan.primary = plan.primary or described.info
                else:
                    if target.name not in portals:
                        refuse(Status.UNCACHEABLE, "describes a portal from an earlier batch")
                        continue
                    pieces.append(b"DP")
            elif mtype == MSG_EXECUTE:
                execute = pgwire.parse_execute(body)
                if execute.portal not in portals:
                    refuse(Status.UNCACHEABLE, "executes a portal from an earlier batch")
                    continue
                stmt, _ = portals[execute.portal]
                plan.executes += 1
                plan.primary = stmt.info if plan.executes == 1 else plan.primary
                # A row limit (asyncpg's fetchrow/fetchval send 1) is part of the key.
                pieces.append(b"E" + execute.max_rows.to_bytes(4, "big", signed=True))
            elif mtype == MSG_CLOSE:
                target = pgwire.parse_target(body)
                if target.kind == TARGET_STATEMENT:
                    resolve(target.name)
                    local.pop(target.name, None)
                    closed.add(target.name)
                    plan.ops.append(target.name)
                pieces.append(b"C" + target.kind + target.name.encode() + b"\x00")
            else:
                refuse(Status.UNCACHEABLE, f"message {chr(mtype)!r} in batch")
        values = iter(tails)
        plan.material = hashlib.blake2b(
            b"".join(next(values) if p is None else p for p in pieces), digest_size=32
        ).digest()
        plan.pieces = tuple(pieces)
        plan.tables = frozenset(tables)
        plan.writes = frozenset(writes)
        plan.shadowable = frozenset(shadowable)
        plan.settings_read = frozenset(settings)
        return plan

    @staticmethod
    def _note(
        info: Classification,
        tables: set[str],
        writes: set[str],
        plan: BatchPlan,
        refuse: Callable[[Status, str], None],
    ) -> None:
        tables.update(info.tables_read)
        if info.is_write or info.invalidate_all:
            writes.update(info.tables_written)
            plan.writes_everything = plan.writes_everything or info.invalidate_all
        plan.changes_session = plan.changes_session or info.changes_session
        plan.commits = plan.commits or info.transaction_control == "commit"
        plan.cursor_writes = plan.cursor_writes or info.cursor_writes
        plan.fetches = plan.fetches or info.fetches
        plan.cluster_wide = plan.cluster_wide or info.cluster_wide
        if info.deallocates is not None:
            plan.deallocates.append(info.deallocates)
        if not info.cacheable:
            refuse(info.status or Status.UNCACHEABLE, info.reason)

    def _changed(self) -> None:
        self.version += 1
        self.copies = {name for name, st in self.statements.items() if st.info.copy}

    def after_local(self, plan: BatchPlan) -> None:
        """The batch was answered by the cache: the origin never saw its Parses or Closes."""
        self._apply(plan, at_origin=False)

    def after_forward(self, plan: BatchPlan) -> None:
        self._apply(plan, at_origin=True)

    def _apply(self, plan: BatchPlan, *, at_origin: bool) -> None:
        # In batch order, as the server applies them: Close S1 then Parse S1 leaves the new S1.
        for op in plan.ops:
            if isinstance(op, str):
                self.statements.pop(op, None)
                if at_origin:
                    self.origin_has.discard(op)
            else:
                self.statements[op.name] = Statement(op, classify(op.query), at_origin=at_origin)
                if at_origin and op.name:
                    self.origin_has.add(op.name)
        if plan.ops:
            self._changed()

    def deferred_parses(self, plan: BatchPlan) -> list[bytes]:
        """Messages to send ahead of a forwarded batch: a Close for every named statement the
        origin holds in a form the client has since closed or replaced (its Parse would
        fail), and a Parse for each statement the batch uses that the origin lacks. Each
        answers with one ParseComplete or CloseComplete, which the session swallows."""
        out: list[bytes] = []
        for parse in plan.parses:
            current = self.statements.get(parse.name)
            if parse.name in self.origin_has and (current is None or not current.at_origin):
                out.append(pgwire.close_statement(parse.name))
                self.origin_has.discard(parse.name)
        for name in plan.needs:
            stmt = self.statements.get(name)
            if stmt is not None and not stmt.at_origin:
                if name in self.origin_has:
                    out.append(pgwire.close_statement(name))
                out.append(pgwire.build_parse(stmt.parse))
                stmt.at_origin = True
                if name:
                    self.origin_has.add(name)
        return out

    def deallocated(self, name: str) -> None:
        """SQL-level DEALLOCATE/DISCARD ALL also drops protocol-level statements at the origin."""
        if name == "*":
            self.statements.clear()
            self.origin_has.clear()
        else:
            self.statements.pop(name, None)
            self.origin_has.discard(name)
        self._changed()


class BatchBuffer:
    """The extended-protocol messages a session received since the last Sync.

    It also tells, message by message, whether an Execute runs COPY: a client running COPY
    through the extended protocol waits for CopyInResponse before it sends Sync, so such a
    batch must go to the origin at once. Tracked as messages arrive, not by scanning the
    batch (a 50,000-row pipelined executemany is one batch).
    """

    __slots__ = ("_book", "_bound", "_copies", "_may_copy", "messages")

    def __init__(self, book: StatementBook) -> None:
        self.messages: list[tuple[int, bytes]] = []  # (type, body)
        self._book = book  # the session's statements, for those parsed in earlier batches
        self._copies: dict[str, bool] = {}  # statements Parsed in the batch: do they COPY?
        self._may_copy = False
        self._bound: str | None = None  # the statement of the batch's latest Bind

    def add(self, mtype: int, body: bytes) -> bool:
        """Keep one message; True when it is an Execute that runs COPY."""
        self.messages.append((mtype, body))
        if mtype == MSG_PARSE:
            parse = pgwire.parse_parse(body)
            copy = classify(parse.query).copy
            self._copies[parse.name] = copy
            self._may_copy = self._may_copy or copy
        elif mtype == MSG_BIND and (self._may_copy or self._book.copies):
            self._bound = pgwire.parse_bind(body).statement
        elif mtype == MSG_EXECUTE and self._bound is not None:
            name = self._bound
            if name in self._copies:
                return self._copies[name]
            return name in self._book.copies
        return False

    def take(self) -> list[tuple[int, bytes]]:
        """The batch so far, leaving the buffer empty for the next one."""
        messages, self.messages = self.messages, []
        self._copies.clear()
        self._may_copy = False
        self._bound = None
        return messages

    def expected_answers(self) -> int | None:
        """How many messages the origin answers the batch with when a Flush ends it; None if
        unknowable.

        Parse, Bind and Close answer once; Describe of a statement twice (parameters, then row
        description or NoData), of a portal once. Execute streams rows, so it is not counted.
        """
        total = 0
        for mtype, body in self.messages:
            if mtype == MSG_EXECUTE:
                return None
            total += 2 if mtype == MSG_DESCRIBE and body[:1] == TARGET_STATEMENT else 1
        return total

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
CLOCK_WORDS = re.compile(rb"(?i)(?<![a-z])(now|today|tomorrow|yesterday)(?![a-z])")


# The bytes every clock word holds one of (o, O, y, Y), as ints: `111 in values` is one
# memchr, while `b"o" in values` on 3.11 first tries the bytes as an int and formats the
# TypeError it swallows (~1.8k instructions a search; four a lone batch).
_O, _O_UPPER, _Y, _Y_UPPER = b"oOyY"
_QUOTE, _BACKSLASH = b'"\\'


def reads_clock(values: bytes) -> bool:
    """`CLOCK_WORDS` in a Bind's values. Every such word holds an o or a y: values without
    either (most: numbers, ids) are told so by four byte searches, not the pattern (asked
    for every execution of a prepared statement, where the pattern costs as much as the
    rest of a lone batch's planning). Array, range and record input drop the quotes and
    backslashes inside an element (`{n"o"w}`, `{"n\\ow"}` hold the word): searched again
    without them."""
    if not (_O in values or _O_UPPER in values or _Y in values or _Y_UPPER in values):
        return False
    if CLOCK_WORDS.search(values) is not None:
        return True
    return (_QUOTE in values or _BACKSLASH in values) and (
        CLOCK_WORDS.search(values.replace(b'"', b"").replace(b"\\", b"")) is not None
    )

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


@dataclass(slots=True, eq=False)
class BookOp:
    """A change to the book sent to the origin, believed only once the origin answers it.

    kind: b"P" a Parse, b"C" a statement Close, b"c" a portal Close (answered like one, no
    change to the book), b"D" a DEALLOCATE (or DISCARD ALL: name "*"), answered by its
    CommandComplete rather than a ParseComplete/CloseComplete."""

    kind: bytes
    name: str
    parse: pgwire.ParseMsg | None = None


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
    # Parses and Closes in batch order: a name may be closed and parsed again. A statement
    # Close is its name; a portal Close is None (it changes no statement, but the origin
    # answers it with a CloseComplete all the same, which the confirmations count).
    ops: list[pgwire.ParseMsg | str | None] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # statement names the batch uses but did not Parse
    changes_session: bool = False
    drops_temp: bool = False  # DISCARD TEMP/ALL (see Classification.drops_temp)
    commits: bool = False
    prepared: tuple[tuple[str, str], ...] = ()  # two-phase commit (Classification.prepared)
    cursor_writes: bool = False
    fetches: bool = False
    cluster_wide: bool = False
    shadowable: frozenset[str] = frozenset()
    settings_read: frozenset[str] = frozenset()
    deallocates: list[str] = field(default_factory=list)
    # Nothing in it writes, fetches, commits or changes the session (see `plan`).
    quiet: bool = False
    # It parses a name whose statement at the origin is unknown or not confirmed yet: only the
    # origin can say whether that Parse succeeds, so the batch is never answered locally.
    forward: bool = False


class StatementBook:
    """The prepared statements of one session, and whether the origin has each of them.

    A Parse, Close or DEALLOCATE sent to the origin changes `statements` when sent (what the
    client believes), but is not believed by the plans until the origin confirms it (a
    ParseComplete/CloseComplete in order, a DEALLOCATE's CommandComplete): until then its
    name is in `inflight`, and a Bind of it is judged like one of a name the book does not
    know (SQL PREPARE shares the namespace): it may run anything, so it is never cached and
    evicts the whole database. One the origin refused or skipped (after an error it skips
    everything up to Sync) leaves the name's statement unknown: dropped from `statements`,
    and in `unknown` until a Parse or Close of it is confirmed. neonpoly never closes an
    unknown name on the client's behalf (it may be the client's SQL PREPARE), and a batch
    that parses it always goes to the origin, which decides."""

    def __init__(self) -> None:
        self.statements: dict[str, Statement] = {}
        # Names whose latest change the origin has not confirmed yet: that change, by identity.
        self.inflight: dict[str, BookOp] = {}
        self.unknown: set[str] = set()  # names the origin may hold anything under
        # Parses and Closes sent since the client's last Sync: a later message before that
        # Sync runs only if they succeeded (after an error the origin skips to Sync), so a
        # Bind of one in a streamed batch or after a Flush may believe it (`known`).
        self.unsynced: set[BookOp] = set()
        self.version = 0  # bumped whenever a statement is added or closed
        self.copies: set[str] = set()  # names of statements that run COPY
        # Named statements the origin holds, whatever the client did with them since: one
        # closed or parsed again in a batch the cache answered is still there in its old form.
        self.origin_has: set[str] = set()
        # Plans by batch shape: (version, the messages with every Bind's values cut off) ->
        # (plan, the key material around the values, joined between them). See plan_shaped.
        self._shapes: dict[tuple[object, ...], tuple[BatchPlan, tuple[bytes, ...]]] = {}

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
                if reads_clock(tail):
                    break
                key.append(body[:cut])
                tails.append(tail)
            elif mtype in (MSG_PARSE, MSG_CLOSE):
                break
            else:
                key += (mtype, body)
        else:
            shape = tuple(key)
            found = self._shapes.get(shape)
            if found is None:
                plan = self.plan(batch)
                found = (plan, segments_of(plan.pieces))
                if len(self._shapes) >= MAX_SHAPES:
                    self._shapes.clear()
                self._shapes[shape] = found
            plan, segments = found
            if len(segments) == 2 and len(tails) == 1:  # one Bind: the common case
                material = segments[0] + tails[0] + segments[1]
            else:
                # A Bind the plan refused has no place in the material (the plan is refused).
                parts = [segments[0]]
                for value, segment in zip(tails, segments[1:], strict=False):
                    parts += (value, segment)
                material = b"".join(parts)
            return plan, hashlib.blake2b(material, digest_size=32).digest()
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
            stmt = local.get(name) or self.known(name)
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
                if parse.name and (parse.name in self.unknown or parse.name in self.inflight):
                    plan.forward = True
                pieces.append(b"P" + parse.query.encode() + b"\x00" + parse.param_types)
                if not stmt.info.cacheable:
                    refuse(stmt.info.status or Status.UNCACHEABLE, stmt.info.reason)
            elif mtype == MSG_BIND:
                bind = pgwire.parse_bind(body)
                bound = resolve(bind.statement)
                if bound is None:
                    if bind.statement not in closed or bind.statement in local:
                        # PREPAREd in SQL, or its Parse refused or not confirmed yet: the
                        # origin may run anything under that name (as for code of the user's).
                        plan.writes_everything = True
                        plan.changes_session = True
                    refuse(Status.UNCACHEABLE, "binds a statement neonpoly does not know (SQL PREPARE, "
                           "or a Parse the origin has not confirmed)")
                    continue
                portals[bind.portal] = (bound, bind.tail)
                self._note(bound.info, tables, writes, plan, refuse)
                shadowable |= bound.info.shadowable
                settings |= bound.info.settings_read
                if reads_clock(bind.tail):
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
                else:
                    plan.ops.append(None)
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
        plan.quiet = not (
            plan.writes or plan.writes_everything or plan.changes_session or plan.commits
            or plan.cursor_writes or plan.fetches or bool(plan.prepared)
        )  # fmt: skip
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
        plan.drops_temp = plan.drops_temp or info.drops_temp
        plan.commits = plan.commits or info.transaction_control == "commit"
        plan.prepared += info.prepared
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

    def known(self, name: str) -> Statement | None:
        """The statement under `name` as the origin confirmed it (or as a batch the cache
        answered left it); None when unknown, absent, or changed and not yet confirmed."""
        op = self.inflight.get(name)
        if op is not None and op not in self.unsynced:
            return None
        return self.statements.get(name)

    def synced(self) -> None:
        """A Sync went to the origin: what was sent before it may have failed on its own."""
        if self.unsynced:
            self.unsynced.clear()
            self._changed()

    def after_local(self, plan: BatchPlan) -> None:
        """The batch was answered by the cache: the origin never saw its Parses or Closes."""
        for op in plan.ops:
            if isinstance(op, str):
                self.statements.pop(op, None)
                self.inflight.pop(op, None)
                if op in self.unknown:  # closed for the client: whatever the origin holds goes
                    self.unknown.discard(op)
                    self.origin_has.add(op)
            elif op is not None:
                self.statements[op.name] = Statement(op, classify(op.query), at_origin=False)
                self.inflight.pop(op.name, None)
        if plan.ops:
            self._changed()

    def after_forward(self, plan: BatchPlan) -> list[BookOp]:
        """The batch goes to the origin: its Parses and Closes, in order, to be confirmed
        (`confirm`) or found refused (`settle`) as the origin answers."""
        sent: list[BookOp] = []
        for op in plan.ops:
            if op is None:
                sent.append(BookOp(b"c", ""))
            elif isinstance(op, str):
                self.statements.pop(op, None)
                sent.append(self._send(BookOp(b"C", op)))
            else:
                self.statements[op.name] = Statement(op, classify(op.query), at_origin=True)
                if op.name:
                    self.origin_has.add(op.name)
                sent.append(self._send(BookOp(b"P", op.name, op)))
        if plan.ops:
            self._changed()
        return sent

    def _send(self, op: BookOp) -> BookOp:
        self.inflight[op.name] = op
        self.unsynced.add(op)
        return op

    def confirm(self, op: BookOp) -> None:
        """The origin did what `op` asked (ParseComplete, CloseComplete, a DEALLOCATE's
        CommandComplete): the name's statement is what was sent, unless changed since."""
        if op.kind == b"c":
            return
        if op.kind == b"D" and op.name == "*":
            for name in [n for n, o in self.inflight.items() if o is op]:
                del self.inflight[name]
            # Gone at the origin, but for names changed again since (their answers will say).
            self.origin_has = {name for name in self.origin_has if name in self.inflight}
            self.unknown = {name for name in self.unknown if name in self.inflight}
            self._changed()
            return
        if op.kind == b"P":
            if op.name:
                self.origin_has.add(op.name)
        elif self.inflight.get(op.name) is op or op.name not in self.inflight:
            self.origin_has.discard(op.name)
        if self.inflight.get(op.name) is op:
            del self.inflight[op.name]
            self.unknown.discard(op.name)
            self._changed()

    def settle(self, op: BookOp) -> None:
        """The origin refused `op` or skipped it (an error earlier in its batch): what the
        name holds is unknown from now on, unless changed again since."""
        if op.kind == b"c":
            return
        names = [n for n, o in self.inflight.items() if o is op] if op.name == "*" else [op.name]
        for name in names:
            if self.inflight.get(name) is op:
                del self.inflight[name]
                self.statements.pop(name, None)
                if name:
                    self.unknown.add(name)
        self._changed()

    def deferred_parses(self, plan: BatchPlan, sent: list[BookOp] | None = None) -> list[bytes]:
        """Messages to send ahead of a forwarded batch: a Close for every named statement the
        origin holds in a form the client has since closed or replaced (its Parse would
        fail), and a Parse for each statement the batch uses that the origin lacks. Each
        answers with one ParseComplete or CloseComplete, which the session swallows; each
        is added to `sent`, to be confirmed like the client's."""
        out: list[bytes] = []
        ops: list[BookOp] = []
        for parse in plan.parses:
            current = self.statements.get(parse.name)
            if (
                parse.name in self.origin_has
                and (current is None or not current.at_origin)
                and parse.name not in self.unknown
                and parse.name not in self.inflight
            ):
                out.append(pgwire.close_statement(parse.name))
                ops.append(BookOp(b"c", parse.name))  # the client's Parse replaces it anyway
                self.origin_has.discard(parse.name)
        for name in plan.needs:
            stmt = self.statements.get(name)
            if stmt is not None and not stmt.at_origin:
                if name in self.origin_has:
                    out.append(pgwire.close_statement(name))
                    ops.append(BookOp(b"c", name))
                out.append(pgwire.build_parse(stmt.parse))
                ops.append(self._send(BookOp(b"P", name, stmt.parse)))
                stmt.at_origin = True
                if name:
                    self.origin_has.add(name)
        if sent is not None:
            sent.extend(ops)
        if ops:
            self._changed()
        return out

    def simple_query(self) -> None:
        """A simple Query was sent: PostgreSQL drops the unnamed statement before it runs one
        (exec_simple_query), so a Bind of "" after it fails there and is never answered here."""
        if "" in self.statements or "" in self.inflight:
            self.statements.pop("", None)
            self.inflight.pop("", None)  # its ParseComplete, if still to come, confirms nothing
            self._changed()

    def prepared_in_sql(self, names: list[str]) -> None:
        """SQL PREPARE, sent: whatever it leaves under these names (its statement, or one
        the book knew if it fails) is not vouched for: unknown (a Bind of it may run anything,
        a Parse of it goes to the origin)."""
        for name in names:
            if name:
                self.statements.pop(name, None)
                self.inflight.pop(name, None)  # an earlier Parse's answer no longer vouches for it
                self.unknown.add(name)
        if names:
            self._changed()

    def deallocating(self, name: str) -> BookOp:
        """SQL-level DEALLOCATE/DISCARD ALL, sent: it also drops protocol-level statements at
        the origin, if it succeeds. Until it is confirmed the names are not known (no plan
        believes them); confirmed, they are gone; refused, they stay unknown."""
        op = BookOp(b"D", name)
        names = list(self.statements) if name == "*" else [name]
        for each in names:
            self.statements.pop(each, None)
            self.inflight[each] = op
        self._changed()
        return op


def segments_of(pieces: tuple[bytes | None, ...]) -> tuple[bytes, ...]:
    """Key material pieces joined between the Binds' values (None): one more than values."""
    segments: list[bytes] = []
    current: list[bytes] = []
    for piece in pieces:
        if piece is None:
            segments.append(b"".join(current))
            current = []
        else:
            current.append(piece)
    segments.append(b"".join(current))
    return tuple(segments)


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

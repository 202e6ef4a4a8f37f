"""One change feed: the origin's logical replication stream for one database, turned into
table-generation bumps of the caches in front of it.

Each committed transaction's relations are bumped, in commit order, through the sinks (the
caches, and later an invalidation plane); TRUNCATE arrives in the stream like rows do; DDL
does not, and is caught by an event trigger's logical message or by a catalog poll
(`origin_sql`).

**Key precision.** A transaction's tables come with the key values its rows had, where the
stream proves them (`rowkeys.py`; for test_decoding UPDATEs, `replica_identity.py` proves
the identity held when the row was written). The sinks bump `T@bucket(v)` + `T#rows` for a
table whose key column (the relay's own catalog answer) is among them, and `T` otherwise,
as a write through neonpoly does. Why that cannot outlive a DDL: the values are the rows'
own (read `WHERE k = v` reads exactly the rows whose `k` is `v` before and after); what says
*which* column point reads are keyed on is the relay's relation book, which every DDL the
feed catches makes forget (with the eviction of the database); and the one catalog fact the
feed itself relies on (test_decoding's replica identity) is proven per change by two reads
around it, never assumed from one.

**Which output plugin.** pgoutput needs a publication, and a publication that publishes
UPDATE and DELETE of a table makes PostgreSQL *refuse* UPDATE and DELETE on that table unless
it has a replica identity (a primary key, or REPLICA IDENTITY FULL): creating
`FOR ALL TABLES` on a user's database would break their writes to every table without a
primary key, today's and tomorrow's. So neonpoly never creates one. When the user has made
the publication themselves (`CREATE PUBLICATION neonpoly FOR ALL TABLES`: they accepted that
rule) the feed reads pgoutput; otherwise it reads test_decoding, the plugin shipped with
PostgreSQL, which needs no publication and restricts nothing. Both say which relations each
committed transaction changed, which is all invalidation needs.

**Slots are temporary.** A temporary slot belongs to the feed's connection: the server drops
it when that connection ends, however it ends (neonpoly killed, network lost, the compute
suspended), so it can never hold WAL back for a consumer that is gone; a persistent slot
held 127 MB of WAL after six 100k-row UPDATEs while its consumer was away, and grows until
the disk fills. What a persistent slot would buy, resuming without a gap, is worth little
here: the gap costs a purge of one database's entries (they refill at the speed of misses),
and neonpoly cannot prove from a resumed slot that nothing was missed anyway after its own
restart (entries on disk outlived the process that knew the stream). So every (re)connection
is a gap.

**Gaps.** The feed is trusted only while it is live. When it starts (or reconnects) the
entries of its database are evicted once the server streams from a point after the slot's
creation: every commit from then on will be seen, and anything cached before may be stale.
When it stops (lost, idle, shut down) they are evicted again, so nothing cached under the
feed's protection outlives it; until it is live again the cache behaves as without a feed
(writes through neonpoly evict, TTLs bound the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from psycopg.conninfo import make_conninfo

from neonpoly.defaults import (
    DEFAULT_CHANGE_FEED,
    DEFAULT_FEED_DDL,
    DEFAULT_FEED_DDL_POLL,
    DEFAULT_FEED_IDLE,
    DEFAULT_FEED_TTL,
    FEED_APPLICATION_NAME,
)
from neonpoly.freshness import origin_sql, pgoutput, textdecoding
from neonpoly.freshness.libpq import LibpqConnection, LibpqError, python_encoding
from neonpoly.freshness.replica_identity import IdentityBook, Known, identity_sql, parse_rows, wanted
from neonpoly.freshness.rowkeys import RowKeys
from neonpoly.freshness.stream import (
    Change,
    Decoded,
    Keepalive,
    ProtocolError,
    QualifiedName,
    RowChange,
    TransactionAssembler,
    XLogData,
    decode_copy,
    format_lsn,
    parse_lsn,
    pg_time_to_unix,
    standby_status,
    unix_to_pg_time,
)

log = logging.getLogger("neonpoly.changefeed")

_XLOGDATA_HEADER = 25  # 'w', start, WAL end, clock: the plugin's message follows

FEED_MODES = ("auto", "on", "off")
DDL_MODES = ("poll", "install")


class ChangeSink(Protocol):
    """Who hears of the origin's changes: the caches, and whatever shares them further (an
    invalidation plane would publish these as table-generation bumps).

    `database` None: every database of the origin (roles, memberships). `everything`: the
    whole database (DDL, or a gap in the feed) rather than `tables`. `rows`: of `tables`,
    those whose changed rows' key values are known (column -> values, rowkeys.py); a sink
    may bump only those keys when the column is the one its point reads are keyed on, and
    must bump the table otherwise (a sink ignoring `rows` stays correct).
    """

    def on_change(
        self,
        origin_key: str,
        database: str | None,
        tables: frozenset[str],
        everything: bool,
        rows: Mapping[str, RowKeys],
    ) -> None: ...


class FeedUnavailable(Exception):
    """The origin does not allow a change feed (the message says why, for one line)."""


@dataclass(slots=True)
class FeedSettings:
    mode: str = DEFAULT_CHANGE_FEED  # auto | on | off
    ddl: str = DEFAULT_FEED_DDL  # poll | install (an event trigger, with the user's consent)
    idle: float = DEFAULT_FEED_IDLE  # close the feed after this long without clients
    publication: str = origin_sql.PUBLICATION
    ddl_poll: float = DEFAULT_FEED_DDL_POLL  # seconds between catalog checks (ddl=poll)
    ttl: float = DEFAULT_FEED_TTL  # the TTL cap (auto mode) of reads a live feed follows
    connect_timeout: float = 10.0
    status_every: float = 10.0  # standby status updates, each asking the server to answer
    silence: float = 30.0  # no word from the server for this long: the feed is lost
    retry_max: float = 10.0  # the longest wait between reconnection attempts

    def __post_init__(self) -> None:
        if self.mode not in FEED_MODES:
            raise ValueError(f"change feed mode {self.mode!r} is not one of {', '.join(FEED_MODES)}")
        if self.ddl not in DDL_MODES:
            raise ValueError(f"change feed DDL mode {self.ddl!r} is not one of {', '.join(DDL_MODES)}")


@dataclass(frozen=True, slots=True)
class FeedTarget:
    """Where a feed connects, with what credentials; `key` names the origin in reports."""

    key: str
    host: str  # the name TLS checks and sends as SNI
    port: int
    dial_host: str
    dial_port: int
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """One feed as reports show it."""

    origin: str
    database: str
    state: str  # starting | live | reconnecting | idle | off | stopped
    reason: str  # why it is not live (empty when it is)
    lag_ms: float | None  # commit on the origin to applied here, for the last change
    position: int  # every commit before this WAL position has been applied
    last_change: float | None  # Unix time of the last change applied
    changes: int  # committed transactions that changed tables
    tables: int  # table bumps they caused
    truncates: int
    ddl: int  # catalog changes caught (event trigger or poll)
    gaps: int  # evictions of the database for a gap in the feed
    ddl_mode: str  # "stream" (event trigger), "poll" (+ why not stream)
    decoder: str  # the output plugin: pgoutput (the user's publication) or test_decoding
    slot: str
    live_since: float | None  # monotonic
    keyed: int = 0  # of `tables`, bumps that came with their rows' key values (rowkeys.py)

    def summary(self) -> str:
        if self.state == "live":
            return "on" if self.lag_ms is None else f"on (lag {self.lag_ms:.0f} ms)"
        if self.reason:
            return f"{self.state}: {self.reason}"
        return self.state


class ChangeFeed:
    """The stream of one (origin, database), reconnecting until stopped or refused."""

    def __init__(
        self,
        target: FeedTarget,
        database: str,
        settings: FeedSettings,
        sinks: Sequence[ChangeSink],
        *,
        on_refused: Callable[[ChangeFeed, str], None] | None = None,
    ) -> None:
        self.target = target
        self.database = database
        self.settings = settings
        self.sinks = sinks
        self.on_refused = on_refused
        self.state = "starting"
        self.reason = ""
        self.lag_ms: float | None = None
        self.position = 0
        self.last_change: float | None = None
        self.changes = self.tables = self.truncates = self.ddl = self.gaps = self.keyed = 0
        self.ddl_mode = "stream" if settings.ddl == "install" else "poll"
        self.slot = ""
        self.decoder = ""
        self.live_since: float | None = None
        self.ddl_checked = 0.0  # monotonic time the last completed catalog check was sent
        self.connects = 0  # times the feed went live
        self.backend_pid: int | None = None  # the walsender's pid on the origin
        self._first: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._conns: list[LibpqConnection] = []
        self._catalog: LibpqConnection | None = None  # for replica identity reads
        self._identities = IdentityBook()
        self._identity_retry = 0.0  # monotonic: no replica identity read before this

    # --- life -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.state = "starting"
            self.reason = ""
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"change feed {self.database}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, state: str = "stopped", reason: str = "") -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.state, self.reason = state, reason

    async def first_attempt(self) -> str | None:
        """None once live; else why the first attempt failed."""
        return await asyncio.shield(self._first)

    def status(self) -> FeedStatus:
        return FeedStatus(
            self.target.key, self.database, self.state, self.reason, self.lag_ms, self.position,
            self.last_change, self.changes, self.tables, self.truncates, self.ddl, self.gaps,
            self.ddl_mode, self.decoder, self.slot, self.live_since, self.keyed,
        )

    def caught_up(self, lsn: int) -> bool:
        """True when the feed is live and has applied every commit before `lsn`."""
        return self.state == "live" and self.position >= lsn

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._once()
            except FeedUnavailable as exc:
                self.state, self.reason = "off", str(exc)
                self._settle(str(exc))
                if self.on_refused is not None:
                    self.on_refused(self, str(exc))
                return
            except (LibpqError, ProtocolError, OSError) as exc:
                why = _one_line(str(exc))
                if self.state == "live":
                    log.warning("change feed %s/%s lost: %s; reconnecting", self.target.key, self.database, why)
                    delay = 0.1
                else:
                    log.debug("change feed %s/%s: %s", self.target.key, self.database, why)
                self.state, self.reason = "reconnecting", why
                self._settle(why)
            finally:
                self._end_gap()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_max)

    def _settle(self, outcome: str | None) -> None:
        if not self._first.done():
            self._first.set_result(outcome)

    def _end_gap(self) -> None:
        """The connection ended: close it, and if it was live, evict (see the docstring)."""
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._catalog = None
        self._identities.forget()
        self.backend_pid = None
        if self.live_since is not None:
            self.live_since = None
            self._evict_database()

    def _evict_database(self) -> None:
        self.gaps += 1
        self._publish(self.database, frozenset(), True)

    def _publish(
        self, database: str | None, tables: frozenset[str], everything: bool, rows: Mapping[str, RowKeys] | None = None
    ) -> None:
        for sink in self.sinks:
            try:
                sink.on_change(self.target.key, database, tables, everything, rows or {})
            except Exception:  # a sink must not stop the feed (the caches would trust a dead one)
                log.exception("change feed sink %r failed", sink)

    # --- one connection ---------------------------------------------------------------

    async def _conninfo(self, replication: bool) -> str:
        t = self.target
        params: dict[str, str | int] = {
            "host": t.host,
            "port": t.dial_port,
            "dbname": self.database,
            "sslmode": t.sslmode,
            "application_name": FEED_APPLICATION_NAME,
            "connect_timeout": max(1, int(self.settings.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            # Query results (the catalog reads) and pgoutput's names come converted to it;
            # test_decoding's are not (see textdecoding.decode).
            "client_encoding": "UTF8",
        }
        if replication:
            params["replication"] = "database"
        if t.sslrootcert:
            params["sslrootcert"] = t.sslrootcert
        if t.user:
            params["user"] = t.user
        if t.password is not None:
            params["password"] = t.password
        # libpq resolves names inside PQconnectPoll, which blocks: resolve on the loop.
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(t.dial_host, t.dial_port, type=socket.SOCK_STREAM)
        if not infos:
            raise LibpqError(f"cannot resolve {t.dial_host}")
        params["hostaddr"] = str(infos[0][4][0])
        return make_conninfo("", **params)

    async def _connect(self, replication: bool) -> LibpqConnection:
        try:
            conn = await LibpqConnection.connect(await self._conninfo(replication), self.settings.connect_timeout)
        except LibpqError as exc:
            _refuse_if_permanent(str(exc), self.target.user)
            raise
        self._conns.append(conn)
        return conn

    async def _once(self) -> None:
        settings = self.settings
        conn = await self._connect(replication=True)
        self.backend_pid = conn.backend_pid
        [(wal_level, publication, trigger)] = await conn.query(origin_sql.preflight_sql(settings.publication))
        if wal_level != "logical":
            raise FeedUnavailable(f"wal_level is {wal_level} (a change feed needs wal_level=logical)")
        # The user's own publication of everything: pgoutput; else test_decoding (see above).
        self.decoder = "pgoutput" if publication == "all" else "test_decoding"
        messages = conn.server_version >= 140000 or self.decoder == "test_decoding"
        ddl_stream = trigger == "true"
        why_poll = ""
        if settings.ddl == "install" and not ddl_stream:
            try:
                await conn.query(origin_sql.install_ddl_trigger_sql())
                ddl_stream = True
                log.info("change feed %s/%s: installed event trigger %s", self.target.key, self.database,
                         origin_sql.DDL_TRIGGER)
            except LibpqError as exc:
                why_poll = f"cannot install the DDL event trigger: {_one_line(str(exc))}"
        if ddl_stream and not messages:
            ddl_stream, why_poll = False, "the origin is older than PostgreSQL 14 (no logical messages)"
        self.ddl_mode = "stream" if ddl_stream else ("poll" + (f" ({why_poll})" if why_poll else ""))
        # Before the slot: DDL after this check is seen by the next one, DDL before it by the
        # eviction when the feed goes live. With the event trigger the poll still runs:
        # PostgreSQL fires none for roles, memberships, databases (shared), nor for VACUUM
        # FULL and CLUSTER (a new file: every ctid moved), a configuration reload, ….
        poll = await self._connect(replication=False)
        [baseline] = await poll.query(origin_sql.fingerprint_sql())
        self.slot = f"neonpoly_{secrets.token_hex(6)}"
        try:
            [created] = await conn.query(
                f"CREATE_REPLICATION_SLOT {self.slot} TEMPORARY LOGICAL {self.decoder} NOEXPORT_SNAPSHOT"
            )
        except LibpqError as exc:
            if self.decoder == "test_decoding" and "test_decoding" in str(exc):
                raise FeedUnavailable(
                    f"the origin has no test_decoding plugin; to use pgoutput, create the publication "
                    f"(CREATE PUBLICATION {settings.publication} FOR ALL TABLES: UPDATE and DELETE then "
                    f"need a primary key or REPLICA IDENTITY on every table)"
                ) from exc
            raise
        # Commits before the slot's consistent point are not streamed: the eviction below
        # answers for them.
        self.position = max(self.position, parse_lsn(created[1] or "0/0"))
        if self.decoder == "pgoutput":
            names = origin_sql.literal(origin_sql.ident(settings.publication))
            options = f"proto_version '1', publication_names {names}"
            if messages:
                options += ", messages 'true'"
        else:
            options = textdecoding.START_OPTIONS
        await conn.start_copy_both(f"START_REPLICATION SLOT {self.slot} LOGICAL 0/0 ({options})")
        # Live: every commit from here on will arrive; whatever was cached before may be stale.
        self._evict_database()
        self.live_since = time.monotonic()
        self.state, self.reason = "live", ""
        self.connects += 1
        self._settle(None)
        log.info(
            "change feed %s/%s on (%s, slot %s from %s, DDL by %s)",
            self.target.key, self.database, self.decoder, self.slot, format_lsn(self.position), self.ddl_mode,
        )
        stream = asyncio.ensure_future(self._stream(conn, python_encoding(conn.parameter("server_encoding"))))
        tasks: list[asyncio.Future[None]] = [stream, asyncio.ensure_future(self._poll(poll, baseline))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, conn: LibpqConnection, encoding: str) -> None:
        assembler = TransactionAssembler(ddl_prefix=origin_sql.DDL_PREFIX)
        text = self.decoder == "test_decoding"
        codec = textdecoding if text else pgoutput
        settings = self.settings
        loop = asyncio.get_running_loop()
        heard = loop.time()
        next_status = heard + settings.status_every
        # Inside a transaction, the rows of a bulk write to one relation all start alike:
        # once that relation is counted, skip them undecoded (one message per row otherwise
        # costs the relay's event loop seconds for a million-row write).
        same: bytes | None = None
        while True:
            wait = max(0.0, min(next_status - loop.time(), settings.silence))
            batch = await conn.read_copy(wait)
            now = loop.time()
            reply = False
            if batch:
                heard = now
            ready: list[Change] = []
            passed = 0  # a keepalive's WAL end, once the changes before it are applied
            for raw in batch:
                if same is not None and raw.startswith(same, _XLOGDATA_HEADER):
                    continue
                frame = decode_copy(raw)
                if isinstance(frame, XLogData):
                    decoded: Decoded = (
                        textdecoding.decode(frame.data, frame.start, encoding) if text
                        else pgoutput.decode(frame.data)
                    )
                    change = assembler.feed(decoded)
                    # Skip the relation's next rows only once they cannot add key values.
                    whole = isinstance(decoded, RowChange) and assembler.whole(decoded)
                    same = codec.row_prefix(frame.data) if whole else None
                    if change is not None:
                        ready.append(change)
                elif isinstance(frame, Keepalive):
                    if not assembler.in_transaction:
                        passed = max(passed, frame.wal_end)  # every commit before it was sent
                    reply = reply or frame.reply_requested
            if ready:
                await self._apply_batch(ready)
            if passed > self.position:
                self.position = passed
            if len(batch) > 1:
                await asyncio.sleep(0)  # a burst: let the relay run between batches
            if now - heard > settings.silence:
                raise LibpqError(f"no word from the origin for {settings.silence:g} s")
            if reply or now >= next_status:
                # Confirm what was applied (the server may recycle WAL before it) and ask for
                # an answer, which proves the connection alive.
                pos = self.position
                await conn.write_copy(standby_status(pos, pos, pos, unix_to_pg_time(time.time()), reply=True))
                next_status = now + settings.status_every

    async def _apply_batch(self, changes: list[Change]) -> None:
        """Apply changes in commit order, after one replica identity read for those that
        need it (replica_identity.py; the read comes after they committed)."""
        asked = wanted(changes)
        now = await self._read_identities(asked) if asked else {}
        for change in self._identities.settle(changes, now, asked):
            self._apply(change)

    async def _read_identities(self, relations: frozenset[QualifiedName]) -> dict[QualifiedName, Known]:
        """The catalog's answer now ({} when it cannot be had: those changes go whole, and
        the feed goes on; another try after `retry_max`)."""
        if time.monotonic() < self._identity_retry:
            return {}
        try:
            if self._catalog is None:
                self._catalog = await self._connect(replication=False)
            sql = identity_sql(relations)
            async with asyncio.timeout(self.settings.connect_timeout):
                return parse_rows(await self._catalog.query(sql))
        except (LibpqError, FeedUnavailable, OSError, TimeoutError) as exc:
            log.warning("change feed %s/%s: cannot read replica identities (%s); whole tables for %g s",
                        self.target.key, self.database, _one_line(str(exc)) or "timeout", self.settings.retry_max)
            if self._catalog is not None:
                self._conns.remove(self._catalog)
                self._catalog.close()
                self._catalog = None
            self._identity_retry = time.monotonic() + self.settings.retry_max
            return {}

    def _apply(self, change: Change) -> None:
        if change.tables or change.everything:
            self.last_change = time.time()
            if change.commit_time:
                self.lag_ms = max(0.0, (self.last_change - pg_time_to_unix(change.commit_time)) * 1000)
            if change.tables:
                self.changes += 1
                self.tables += len(change.tables)
                self.keyed += len(change.rows)
                self.truncates += change.truncated
            if change.everything:
                self.ddl += 1
                log.info("change feed %s/%s: %s", self.target.key, self.database, "; ".join(change.reasons))
            self._publish(self.database, change.tables, change.everything, change.rows)
        if change.end_lsn > self.position:
            self.position = change.end_lsn

    async def _poll(self, conn: LibpqConnection, baseline: tuple[str | None, ...]) -> None:
        """Catalog checks, also beside the event trigger (a DDL it streamed is evicted again
        here, up to a poll later: DDL is rare, and what no trigger reports is not)."""
        local, shared = baseline
        while True:
            await asyncio.sleep(self.settings.ddl_poll)
            sent = time.monotonic()
            [(now_local, now_shared)] = await conn.query(origin_sql.fingerprint_sql())
            if now_local != local:
                local = now_local
                self.ddl += 1
                self.last_change = time.time()
                log.info("change feed %s/%s: the catalog changed (DDL)", self.target.key, self.database)
                self._identities.forget()
                self._publish(self.database, frozenset(), True)
            if now_shared != shared:
                shared = now_shared
                self.ddl += 1
                self.last_change = time.time()
                log.info("change feed %s: roles or databases changed", self.target.key)
                self._publish(None, frozenset(), True)
            self.ddl_checked = sent

    async def remove_from_origin(self) -> None:
        """Drop what neonpoly created in this database: the DDL event trigger (installed with
        the user's consent). The slot needs nothing (it was temporary); a publication is
        never neonpoly's (it creates none)."""
        conn = await LibpqConnection.connect(await self._conninfo(False), self.settings.connect_timeout)
        try:
            await conn.query(origin_sql.drop_ddl_trigger_sql())
        finally:
            conn.close()


# Server answers that no retry will change: the feed is off (auto) or refused (on).
_PERMANENT = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "pg_hba.conf",
    "permission denied",
)


def _refuse_if_permanent(message: str, user: str | None) -> None:
    low = message.lower()
    if "walsender" in low or "wal sender" in low or "replication role" in low:
        raise FeedUnavailable(f"role {user or '(default)'} may not replicate (it needs the REPLICATION attribute)")
    if any(marker in low for marker in _PERMANENT):
        raise FeedUnavailable(_one_line(message))


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else message
    for prefix in ("FATAL:", "ERROR:"):
        if prefix in text:
            text = text.split(prefix, 1)[1]
    return " ".join(text.split())

"""The shared invalidation plane's logic, without I/O: what is published, when a node may
serve hits, when a gap forces a purge, and when a held write reply may go out.
(`redis_plane.py` carries it over Redis.)

**The guarantee.** Once a write through node A has returned to its client, no other node
serves a hit that the write made stale. Three rules give it without a Redis round trip per
hit:

1. Node A bumps its own generations, publishes the bump (XADD, one stream per origin) and
   holds the write's reply until every live node following that origin acknowledged applying
   it, or until `hold` seconds after the XADD's reply, whichever comes first.
2. A node serves hits of an origin only while its reader is *provably caught up*: every
   blocking XREAD records the monotonic time it was sent; one that returns (entries applied,
   or empty after its BLOCK) proves that everything XADDed before it was sent has been
   applied. Hits are allowed while `now - proven < limit` (`Gate`).
3. `hold > limit`: a node that has not acknowledged within `hold` has not proven anything
   since before the XADD executed, so its gate is closed by then. Acknowledgements only let
   the reply go sooner. Nodes register with a heartbeat that expires after `heartbeat`
   (>= `check + limit + margin`: rounds register every `check` and a round proves the gate
   only within `check` of the last registration, for `limit`), so a writer stops waiting for
   nodes that died: their gates closed before their heartbeat expired.

4. A node cut off from Redis cannot publish, and the others may not know it: it stops
   registering. Its registration expires `heartbeat` after the last one (rounds register it
   every `check` seconds), and the next check by any node moves it to the origin's `lost`
   set; no node serves hits of an origin whose `lost` set is not empty (a node that left
   with its goodbye is not lost), and a round proves a gate only within `check` of the last
   check. So the cut off node holds its write replies until `fence` after its last
   registration (heartbeat + check + limit: every gate proven before the others saw it lost
   has closed), then lets them go: nobody serves hits they could have made stale. On its
   return it publishes a purge and leaves `lost` in one step. A node that never joined
   holds them until it does. A node that never returns (crashed, renamed) keeps the others
   passing through until it does, or until `neonpoly plane forget` says it is gone; its
   name is stable (`--node-id`, by default host:port) for that reason.
5. Redis that lost its data has lost `lost` too: a cut off node is unknown to it. Every node
   passes through until `fence` after the epoch was made (nodes retry at least every 2 s, so
   one that was merely waiting has rejoined, and published its purge, by then). A write's
   reply waits until `limit` after the epoch was made: in that Redis nobody is registered
   yet, and a slow node's gate proven before the loss may still be open (a publish checks
   the epoch it joined, so a node that has not noticed the loss holds its replies too).

**Siblings.** The workers of one `serve --workers N` share their table generations in memory
(cache/siblings.py): a table bump is in that memory before the write goes to the origin, and a
sibling's hit check counts it, so it can serve no hit the write made stale, with no message.
Rule 1 then waits for the acknowledgements of the other nodes only (a batch of table names
alone; database-wide and global bumps, purges and admin purges by table name also make the
receiving node learn its catalog again, so every node's acknowledgement is awaited as before),
and a sibling does not apply the table names of a sibling's entry again. On the workers'
private redis-server every node is a sibling: table bumps are not published at all
(`siblings_only`). Rules 2 to 5 are unchanged.

**Gaps.** Each entry carries a per-origin sequence number (INCR in the same script as the
XADD): a number that does not follow the last one applied means entries were trimmed or
Redis lost its data; a random epoch key read after every XREAD tells a restart or a flush.
On any gap, and whenever the node (re)connects, the origin's entries are purged locally
before the next hit (a global-epoch bump of its caches' generations).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from neonpoly.cache.invalidation import TableGenerations
    from neonpoly.cache.query_cache import QueryCache

_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class PlaneSettings:
    url: str
    prefix: str = "neonpoly"  # every key neonpoly writes starts with it (several planes share a Redis)
    limit: float = 1.0  # L: hits only while the last proven XREAD was sent less than this ago
    block: float = 0.2  # the XREAD's BLOCK: well below `limit`, so an idle plane stays proven
    hold: float = 1.5  # T (> limit): the longest a write's reply waits for acknowledgements
    heartbeat: float = 3.0  # a node is live this long after its last registration (>= check + limit + margin)
    check: float = 0.5  # rounds register the node and read the lost nodes this often (< heartbeat)
    lease: float = 5.0  # the change feed lease's expiry, renewed every third of it
    maxlen: int = 10_000  # entries kept per stream (trimmed approximately; a reader behind it has a gap)
    count: int = 1000  # entries read per stream per round
    connect_timeout: float = 2.0
    io_timeout: float = 5.0  # a Redis that answers nothing for this long is down
    margin: float = 0.25  # added to `fence` for the clocks' disagreement (Redis's TTLs, our monotonic)
    grace: float | None = None  # after Redis lost its data, hits wait this long (None: `fence`);
    # 0 for a plane whose Redis cannot outlive its nodes (the workers' private redis-server)
    node: str | None = None  # this node's stable name (None: host:pid:random, fine while it never crashes)
    # Every node of this Redis shares this process's sibling board (the workers' private
    # redis-server): table bumps go through the board alone, not through Redis.
    siblings_only: bool = False

    @property
    def fence(self) -> float:
        """How long after its last heartbeat a node cut off from Redis holds write replies:
        by then its registration expired and every gate proven before that has closed."""
        return self.heartbeat + self.check + self.limit + self.margin

    @property
    def rejoin_grace(self) -> float:
        return self.fence if self.grace is None else self.grace

    def __post_init__(self) -> None:
        if not self.block < self.limit < self.hold:
            raise ValueError("the plane needs block < limit < hold")
        # A round proves the gate up to `check` after the last registration, for `limit` more:
        # the registration must outlast both, or writers stop waiting for a node whose gate is open.
        if self.heartbeat < self.check + self.limit + self.margin:
            raise ValueError("the plane's heartbeat must outlast its check, its limit and the margin together")
        if not 0 < self.check < self.heartbeat:
            raise ValueError("the plane must check its nodes more often than their heartbeat expires")


def public_url(url: str) -> str:
    """The Redis URL without its password (for reports and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Gate:
    """May this node serve hits of an origin now? The check a cache makes on every lookup:
    one clock read and one compare."""

    __slots__ = ("limit", "proven", "refused")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.proven = -math.inf  # monotonic send time of the last XREAD that returned
        self.refused = 0  # lookups refused while not proven caught up

    def __call__(self) -> bool:
        if _monotonic() - self.proven < self.limit:
            return True
        self.refused += 1
        return False

    @property
    def open(self) -> bool:
        return _monotonic() - self.proven < self.limit

    def prove(self, sent: float) -> None:
        if sent > self.proven:
            self.proven = sent

    def close(self) -> None:
        self.proven = -math.inf


@dataclass(slots=True)
class Cursor:
    """Where a node's reading of one origin's stream stands."""

    last_id: str = "0-0"
    last_n: int = 0

    def take(self, n: int, entry_id: str) -> bool:
        """Record entry `n`; False when it does not follow the last one (a gap)."""
        follows = n == self.last_n + 1
        self.last_n, self.last_id = n, entry_id
        return follows


@dataclass(slots=True)
class Bump:
    """What one origin's generations were bumped by, merged over a batch. Names are opaque:
    whatever `TableGenerations` was told (tables, or finer names other parts derive)."""

    tables: dict[str, set[str]] = field(default_factory=dict)  # database -> names
    databases: set[str] = field(default_factory=set)
    everywhere: set[str] = field(default_factory=set)  # names bumped in every database
    all: bool = False  # the global epoch (roles and grants, a purge of the cache)
    purge: bool = False  # a gap or a feed takeover: forget everything of the origin

    def __bool__(self) -> bool:
        return bool(self.tables or self.databases or self.everywhere or self.all or self.purge)

    @property
    def tables_only(self) -> bool:
        """Only table names: what a sibling worker sees through the board (cache/siblings.py)."""
        return not (self.databases or self.everywhere or self.all or self.purge)

    def without_tables(self) -> Bump:
        """This bump less its table names (a sibling's: the board carried them already)."""
        return Bump({}, set(self.databases), set(self.everywhere), self.all, self.purge)

    def add(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "t":
            self.tables.setdefault(op[1], set()).update(op[2])
        elif kind == "d":
            self.databases.add(op[1])
        elif kind == "e":
            self.everywhere.update(op[1])
        elif kind == "g":
            self.all = True
        elif kind == "p":
            self.purge = True
        else:
            raise ValueError(f"unknown bump {kind!r}")

    def encode(self) -> str:
        data: dict[str, Any] = {}
        if self.tables:
            data["t"] = {db: sorted(names) for db, names in self.tables.items()}
        if self.databases:
            data["d"] = sorted(self.databases)
        if self.everywhere:
            data["e"] = sorted(self.everywhere)
        if self.all:
            data["g"] = 1
        if self.purge:
            data["p"] = 1
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> Bump:
        """Raises ValueError on anything this version did not write (the reader treats it as a gap)."""
        try:
            data = json.loads(text)
            bump = cls(
                {str(db): {str(n) for n in names} for db, names in dict(data.get("t", {})).items()},
                {str(db) for db in data.get("d", ())},
                {str(n) for n in data.get("e", ())},
                bool(data.get("g")),
                bool(data.get("p")),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed bump: {exc}") from exc
        return bump

    def apply(self, caches: Iterable[QueryCache]) -> None:
        """Bump these caches' generations as the publisher's were. Database-wide and global
        bumps are taken as DDL (the catalog may have changed: the relations and session
        identities learned are learned again), since the publisher's reason is not sent."""
        for cache in caches:
            gens = generations(cache)
            if self.purge or self.all:
                gens.bump_all()
                cache.ddl_epoch += 1
                cache.relations.forget()
                continue
            for db in self.databases:
                gens.bump_database(db)
                cache.ddl_epoch += 1
                cache.relations.forget(db)
            for db, names in self.tables.items():
                if db not in self.databases:
                    gens.bump_tables(db, names)
            if self.everywhere:
                gens.bump_tables_everywhere(self.everywhere)


def generations(cache: QueryCache) -> TableGenerations:
    return cache.store.generations


class Batch:
    """Bumps waiting to be published together, and the future the held replies wait on."""

    __slots__ = ("bumps", "future", "opened")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.bumps: dict[str, Bump] = {}  # origin key -> what to publish on its stream
        self.future: asyncio.Future[None] = loop.create_future()
        self.opened = _monotonic()

    def add(self, origin: str, op: tuple[Any, ...]) -> None:
        bump = self.bumps.get(origin)
        if bump is None:
            bump = self.bumps[origin] = Bump()
        bump.add(op)

    def __bool__(self) -> bool:
        return bool(self.bumps)


@dataclass(slots=True)
class _Hold:
    future: asyncio.Future[None]
    needs: dict[str, dict[str, int]]  # node -> origin -> the entry position it must ack


class HoldBook:
    """Held write replies and the acknowledgements that release them."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.acked: dict[str, dict[str, int]] = {}  # node -> origin -> highest applied (entry_position)
        self._holds: list[_Hold] = []
        self.released_by_acks = 0
        self.timed_out = 0

    @property
    def waiting(self) -> int:
        return len(self._holds)

    def add(
        self, future: asyncio.Future[None], published: Mapping[str, int], live: Mapping[str, Iterable[str]]
    ) -> None:
        """`published`: origin -> the position of this batch's entry; `live`: origin ->
        the nodes following it (self excluded here)."""
        needs: dict[str, dict[str, int]] = {}
        for origin, n in published.items():
            for node in live.get(origin, ()):
                if node != self.me and self.acked.get(node, {}).get(origin, 0) < n:
                    needs.setdefault(node, {})[origin] = n
        if not needs:
            self.released_by_acks += 1
            _resolve(future)
            return
        self._holds.append(_Hold(future, needs))

    def ack(self, node: str, positions: Mapping[str, int]) -> None:
        mine = self.acked.setdefault(node, {})
        for origin, n in positions.items():
            if n > mine.get(origin, 0):
                mine[origin] = n
        kept: list[_Hold] = []
        for hold in self._holds:
            if hold.future.done():
                continue
            wants = hold.needs.get(node)
            if wants is not None and all(mine.get(o, 0) >= n for o, n in wants.items()):
                del hold.needs[node]
            if hold.needs:
                kept.append(hold)
            else:
                self.released_by_acks += 1
                _resolve(hold.future)
        self._holds = kept

    def expire(self, future: asyncio.Future[None]) -> None:
        """The hold's time is up: release it whoever has not acknowledged (their gates are
        closed by now)."""
        if not future.done():
            self.timed_out += 1
            _resolve(future)
        self._holds = [h for h in self._holds if not h.future.done()]

    def forget_node(self, node: str) -> None:
        """`node` stopped (its heartbeat is gone): do not wait for it."""
        self.acked.pop(node, None)
        for hold in self._holds:
            hold.needs.pop(node, None)
            if not hold.needs:
                self.released_by_acks += 1
                _resolve(hold.future)
        self._holds = [h for h in self._holds if not h.future.done()]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Fence:
    """Write replies this node made while it could not publish (rule 4): each waits until no
    other node can still serve hits unaware of it, or until this node rejoined and its purge
    was acknowledged, whichever comes first."""

    def __init__(self, span: float) -> None:
        self.span = span  # PlaneSettings.fence
        self.beat = -math.inf  # monotonic: the reply of the last round that registered this node
        # Rounds that may register this node and have not answered: one whose reply is lost
        # (a link that drops replies, a blackholed one) registered it when it executed, up to
        # the reader's io timeout; nothing is released until it answers or fails.
        self.pending = 0
        self._held: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.released_by_time = 0

    @property
    def held(self) -> int:
        return sum(1 for f in self._held if not f.done())

    def until(self) -> float:
        """When every other node knows this one lost (never, before it first registered)."""
        return math.inf if self.beat == -math.inf or self.pending else self.beat + self.span

    def hold(self) -> asyncio.Future[None] | None:
        """A future for a reply made now, or None when it may go at once."""
        if _monotonic() >= self.until():
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.add(future)
        return future

    def add(self, future: asyncio.Future[None]) -> None:
        self._held.append(future)
        self._arm()

    def settle(self, beat: float | None) -> None:
        """A round that may have registered this node answered (or failed): `beat` is when,
        None when it did not count (it did not register every origin, or never did)."""
        self.pending = max(0, self.pending - 1)
        if beat is not None:
            self.beat = beat
        if self._held:
            self._arm()

    def _arm(self) -> None:
        if self._timer is None and self.until() < math.inf:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, self.until() - _monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        if _monotonic() < self.until():  # a round registered this node meanwhile
            self._arm()
            return
        self.released_by_time += sum(1 for f in self._held if not f.done())
        self._release()

    def after(self, future: asyncio.Future[None] | None) -> None:
        """This node rejoined: release what it held once `future` (its purge, published and
        acknowledged) resolves; at once when nothing needed publishing."""
        held, self._held = self._held, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if future is None:
            for f in held:
                _resolve(f)
            return

        def release_held(_: object) -> None:
            for f in held:
                _resolve(f)

        future.add_done_callback(release_held)

    def _release(self) -> None:
        held, self._held = self._held, []
        for f in held:
            _resolve(f)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for f in self._held:
            f.cancel()
        self._held = []


def epoch_made(value: str) -> int | None:
    """When an epoch (MAKE_EPOCH's `token@ms`) was made, by Redis's clock; None if unsaid."""
    _, at, ms = value.rpartition("@")
    return int(ms) if at and ms.isdigit() else None


def decode_positions(text: str | bytes) -> dict[str, int]:
    """An acknowledgement's body: origin -> the last sequence number applied."""
    try:
        data = json.loads(text)
        return {str(o): int(n) for o, n in dict(data).items()}
    except (TypeError, ValueError, AttributeError):
        return {}


def entry_position(entry_id: str) -> int:
    """A stream entry's id (`ms-seq`) as one comparable number. Acknowledgements and holds
    count these, not the sequence numbers: a seq key deleted (or evicted) while the epoch stays
    starts over at 1, and an acknowledgement of an old entry would pass for one of a new entry;
    ids only grow within a stream (and one made again starts at Redis's clock)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) * 2**32 + int(seq or 0)


def encode_positions(positions: Mapping[str, int]) -> str:
    return json.dumps(dict(positions), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True, slots=True)
class OriginPlaneStatus:
    """One origin's stream as this node follows it."""

    origin: str
    stream: str
    caught_up: bool  # the gate is open: hits of this origin are served
    last_id: str
    last_n: int
    lag_ms: float | None  # XADD (by the entry's id) to applied here, for the last entry from another node
    published: int  # entries this node published
    applied: int  # entries from other nodes applied
    gaps: int  # purges for a gap (trimmed stream, Redis restarted or flushed, this node reconnected)
    refused_hits: int  # lookups passed through because the gate was closed
    feed_lease: str  # the node that runs the change feed of this origin ("" none, "me" when it is this node)
    lost: tuple[str, ...] = ()  # nodes gone without a goodbye: hits pause until they rejoin (or FORGET NODE)


@dataclass(frozen=True, slots=True)
class PlaneStatus:
    url: str  # never a password
    node: str
    state: str  # connecting | up | down
    reason: str  # why it is down ("" when up)
    since: float  # Unix time of the last transition
    nodes: tuple[str, ...]  # live nodes seen on the last heartbeat (this one included)
    published: int
    applied: int
    gaps: int
    holds: int  # batches of bumps published (the write replies among them waited for acknowledgements)
    hold_timeouts: int  # of them, released by the timeout
    hold_ms: tuple[float, float] | None  # p50, p99 of the last holds: first bump to released
    downs: int  # transitions to down
    origins: tuple[OriginPlaneStatus, ...]
    fenced: int = 0  # write replies held now because this node cannot publish
    siblings: tuple[str, ...] = ()  # nodes sharing this node's memory (`serve --workers N`)
    spared: int = 0  # acknowledgements not waited for: the node shares memory with this one
    board_only: int = 0  # table bumps not published: every node of the plane shares the memory

    def origin(self, key: str) -> OriginPlaneStatus | None:
        return next((o for o in self.origins if o.origin == key), None)

    def summary(self, origin: str | None = None) -> str:
        """One line for SHOW CACHES."""
        if self.state != "up":
            why = f": {self.reason}" if self.reason else ""
            return f"{self.state}{why} (passing through)"
        nodes = f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"
        o = self.origin(origin) if origin is not None else None
        if o is None:
            return f"up, {nodes}"
        if o.lost:
            return f"up, {nodes}, paused: node {', '.join(o.lost)} lost without a goodbye (passing through)"
        if not o.caught_up:
            return f"up, {nodes}, catching up (passing through)"
        lag = "" if o.lag_ms is None else f", lag {o.lag_ms:.0f} ms"
        return f"up, {nodes}{lag}"


def entry_lag_ms(entry_id: str, now: Callable[[], float] = time.time) -> float | None:
    """Milliseconds from the entry's XADD (Redis's clock, in its id) to now (ours)."""
    try:
        ms = int(entry_id.split("-", 1)[0])
    except ValueError:
        return None
    return max(0.0, now() * 1000 - ms)

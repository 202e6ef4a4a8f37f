"""The shared invalidation plane on Redis (`neonpoly serve --redis redis://…`): the I/O that
carries `plane.py`'s rules between nodes.

Keys (all under the prefix): `epoch` (a random token and when it was made: a different one,
or none, means Redis lost its data), `nodes` and `o:<origin>:nodes` (sorted sets of node ids
scored by their heartbeat's expiry, Redis's clock), `o:<origin>:lost` (nodes whose heartbeat
expired without a goodbye), `o:<origin>:bumps` (the stream of bumps), `o:<origin>:seq` (its
entries' sequence numbers), `o:<origin>:lease` (which node runs the origin's change feed),
`acks` (one stream where nodes say how far they applied).

Three tasks on two connections: the reader (one pipeline per round: the ROUND script, the
previous round's acknowledgement, a blocking XREAD of every followed stream and of the acks,
then the epoch), the publisher (one script call per origin and batch: INCR + XADD + the live
nodes), and the lease keeper. Streams, not pub/sub: a reader that was away reads what it
missed, or learns from the sequence numbers that it cannot. RESP2 is asked for explicitly
(redis-py 8 defaults to RESP3, whose XREAD reply is a map); `streams` reads either shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from neonpoly.freshness.plane import (
    Batch,
    Bump,
    Cursor,
    Fence,
    Gate,
    HoldBook,
    PlaneSettings,
    PlaneStatus,
    decode_positions,
    encode_positions,
    entry_lag_ms,
    entry_position,
    epoch_made,
    generations,
    public_url,
)
from neonpoly.freshness.redis_origin import FollowedOrigin
from neonpoly.freshness.redis_wire import (
    MAKE_EPOCH,
    PUBLISH,
    RELEASE_LEASE,
    ROUND,
    Regap,
    Twin,
    not_before,
    p50_p99,
    stop_tasks,
    why,
    within,
)
from neonpoly.freshness.redis_wire import streams as read_streams
from neonpoly.freshness.siblings import SiblingNodes

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.cache.siblings import SiblingBoard

log = logging.getLogger("neonpoly.plane")

_FAILURES = (RedisError, OSError, TimeoutError)


class RedisPlane:
    """One node of the plane: the caches it is attached to publish their bumps and apply the
    other nodes'. `lease_listener(origin, held)` is told when this node gains or loses the
    right to run an origin's change feed (set `wants_leases` for it to compete)."""

    def __init__(self, settings: PlaneSettings, *, node: str | None = None, board: SiblingBoard | None = None) -> None:
        self.settings = settings
        self.node = node or settings.node or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.url = public_url(settings.url)
        # The workers of one `serve --workers N` share their generations in memory (plane.py).
        self.siblings = SiblingNodes(board, settings.siblings_only, self.node) if board is not None else None
        self.token = secrets.token_hex(8)  # this process: entries and the name's holder carry it
        self.holds = HoldBook(self.node)
        self.fence = Fence(settings.fence)
        self._grace_until = 0.0  # monotonic: no hits before it (Redis lost its data, rule 5)
        self._young_until = 0.0  # monotonic: no write reply before it (gates proven before the loss)
        self.state, self.reason = "connecting", ""
        self.since = time.time()
        self.downs = 0
        self.nodes: tuple[str, ...] = ()
        self.wants_leases = False
        self.lease_listener: Callable[[str, bool], None] | None = None
        self._origins: dict[str, FollowedOrigin] = {}
        self._epoch: str | None = None
        self._acks_id = "0-0"
        self._ack_due: dict[str, int] = {}  # origin -> sequence number (what older versions read)
        self._ack_at: dict[str, int] = {}  # origin -> entry position (what holds count)
        self._lost: set[str] = set()  # origins whose bumps could not be published
        self._open: Batch | None = None
        self._applying = False
        self._was_up = self._named = False  # _named: a round registered this process under its name
        self._batches = 0
        self._hold_times: deque[float] = deque(maxlen=1000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._goodbyes: set[asyncio.Task[None]] = set()
        self._check_sent = -math.inf  # monotonic send time of the last round that ran ROUND
        self._check_keys: list[str] = []
        self._leaving: dict[str, FollowedOrigin] = {}  # detached, saying goodbye
        self._reader: Redis | None = None
        self._cmd: Redis | None = None

    # --- keys --------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.settings.prefix}:{name}"

    # --- attaching caches (the service) -----------------------------------------------------

    def attach(self, cache: QueryCache, origin_key: str) -> None:
        origin = self._origins.get(origin_key)
        if origin is None:
            gate = Gate(self.settings.limit)
            origin = self._origins[origin_key] = FollowedOrigin(origin_key, self.settings.prefix, gate)
            # Other nodes do not know this node follows it until a round registers it there:
            # cut off before that, its writes must wait for its return (rule 4).
            self.fence.beat = -math.inf
        origin.caches.append(cache)
        if self.siblings is not None:
            self.siblings.share(cache, origin_key)
        generations(cache).observe(lambda op: self._observed(origin_key, op))
        cache.serve_gate = origin.gate
        cache.reply_barrier = self.barrier

    def detach(self, cache: QueryCache) -> None:
        for key, origin in list(self._origins.items()):
            if cache in origin.caches:
                origin.caches.remove(cache)
                generations(cache).observe(None)
                cache.serve_gate = cache.reply_barrier = None
                if not origin.caches:
                    del self._origins[key]
                    self._leaving[key] = origin  # its last bumps still go out
                    self._goodbye(origin)

    def _goodbye(self, origin: FollowedOrigin) -> None:
        """Its integration was removed: leave the origin's nodes, once its bumps are out (else
        it is lost to the others, rightly)."""
        if self.state != "up" or origin.key in self._lost or self._cmd is None or self._loop is None:
            return
        open_batch = self._open
        if open_batch is not None and origin.key in open_batch.bumps:
            open_batch.future.add_done_callback(lambda _: self._goodbye(origin))
            return
        cmd, node = self._cmd, self.node

        async def leave() -> None:
            if origin.key in self._origins:  # followed again meanwhile: it stays registered
                return
            with contextlib.suppress(*_FAILURES):
                await cmd.zrem(origin.nodes, node)
                self._leaving.pop(origin.key, None)

        task = self._loop.create_task(leave(), name="plane goodbye")
        self._goodbyes.add(task)
        task.add_done_callback(self._goodbyes.discard)

    def _observed(self, origin: str, op: tuple[Any, ...]) -> None:
        """A bump of a local cache's generations: publish it, unless it came from the plane."""
        if self._applying or (self.siblings is not None and self.siblings.carried(origin, op)):
            return
        if self.state != "up" or self._loop is None:
            self._lost.add(origin)  # published as a purge once Redis is back
            return
        if self._open is None:
            self._open = Batch(self._loop)
        self._open.add(origin, op)
        if self._wake is not None:
            self._wake.set()

    def barrier(self) -> asyncio.Future[None] | None:
        """What a write's reply waits for: the batch holding its bumps, acknowledged by every
        live node (or timed out). While this node cannot publish: the fence (rule 4)."""
        if self.state == "up":
            return not_before(self._open.future, self._young_until) if self._open else None
        return self.fence.hold()

    # --- life --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and take the leases it can; if Redis is not there, say so and keep trying
        (the caches pass through meanwhile)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        s = self.settings
        common: dict[str, Any] = {
            "protocol": 2,
            "decode_responses": True,
            "socket_connect_timeout": s.connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        self._reader = Redis.from_url(s.url, socket_timeout=s.block + s.io_timeout, **common)
        self._cmd = Redis.from_url(s.url, socket_timeout=s.io_timeout, **common)
        try:
            await within(s.io_timeout, self._recover())
            await self._keep_leases()
        except _FAILURES as exc:
            self._went_down(why(exc))
        loop = self._loop
        self._tasks = [
            loop.create_task(self._read_loop(), name="plane reader"),
            loop.create_task(self._publish_loop(), name="plane publisher"),
            loop.create_task(self._lease_loop(), name="plane leases"),
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks)
        if self._cmd is not None and self.state == "up" and self._named:  # a twin's goodbye would be the holder's
            with contextlib.suppress(*_FAILURES):
                await within(self.settings.io_timeout, self._leave())
        for origin in self._origins.values():
            origin.gate.close()
            if origin.lease_mine:
                self._lease_lost(origin, "neonpoly is stopping")
        if self._open is not None:
            self._open.future.cancel()
        self.fence.close()
        for client in (self._reader, self._cmd):
            if client is not None:
                with contextlib.suppress(*_FAILURES):
                    await client.aclose()

    async def _leave(self) -> None:
        assert self._cmd is not None
        pipe = self._cmd.pipeline(transaction=False)
        pipe.zrem(self._key("nodes"), self.node)
        pipe.eval(RELEASE_LEASE, 1, self._key(f"name:{self.node}"), self.token)  # the name is free at once
        for origin in self._origins.values():
            pipe.zrem(origin.nodes, self.node)
            if origin.lease_mine:
                pipe.eval(RELEASE_LEASE, 1, origin.lease, self.node)
        await pipe.execute()

    # --- Redis down, back, or lost its data -------------------------------------------------

    def _went_down(self, why: str) -> None:
        for origin in self._origins.values():
            origin.gate.close()
        if self.siblings is not None:  # a twin, or cut off: the board names it again once registered
            self.siblings.lost_name()
        if self.state == "down":
            self.reason = why
            return
        log.warning("invalidation plane %s down: %s; serving without hits (passing through) until it is back",
                    self.url, why)
        self.state, self.reason, self.since = "down", why, time.time()
        self.downs += 1
        if self._open is not None:
            self._lost |= set(self._open.bumps)

    async def _recover(self) -> None:
        """(Re)join: learn the epoch, where each stream ends, then purge what this node has
        (anything may have been missed before now), and publish a purge for the origins whose
        bumps this node could not publish."""
        assert self._reader is not None
        r = self._reader
        epoch, now_ms = await r.eval(MAKE_EPOCH, 1, self._key("epoch"), secrets.token_hex(8))
        made = epoch_made(str(epoch))
        if made is not None:  # rule 5: nodes cut off when Redis lost its data have had time to return
            age, s = (int(now_ms) - made) / 1000, self.settings
            wait, young = s.rejoin_grace - age, (s.limit + s.margin - age) if s.grace != 0 else 0.0
            self._grace_until = time.monotonic() + wait if wait > 0 else 0.0
            self._young_until = time.monotonic() + young if young > 0 else 0.0
        last_ack = await r.xrevrange(self._key("acks"), count=1)
        self._acks_id = str(last_ack[0][0]) if last_ack else "0-0"
        origins = list(self._origins.values())
        # Acknowledgements count entry ids, which may start over if Redis lost its data.
        self.holds.acked.clear()
        await self._bootstrap(origins)
        self._epoch = None if epoch is None else str(epoch)
        was_up, self._was_up = self._was_up, True
        for origin in origins:
            self._purge_local(origin, counted=was_up)
        if self.state != "up":
            if was_up or self.state == "down":
                log.warning("invalidation plane %s up again (node %s); the caches were purged: a gap",
                            self.url, self.node)
            else:
                log.info("invalidation plane %s up (node %s)", self.url, self.node)
        self.state, self.reason, self.since = "up", "", time.time()
        lost, self._lost = self._lost, set()
        for key in lost:
            self._observed(key, ("p",))
        # What was held while cut off goes once that purge is acknowledged (or at once).
        self.fence.after(not_before(self._open.future, self._young_until) if lost and self._open else None)

    async def _bootstrap(self, origins: list[FollowedOrigin]) -> None:
        """Read where these streams end (atomically with their counters)."""
        if not origins:
            return
        assert self._reader is not None
        pipe = self._reader.pipeline(transaction=True)
        for origin in origins:
            pipe.xrevrange(origin.stream, count=1)
            pipe.get(origin.seq)
        replies = await pipe.execute()
        for i, origin in enumerate(origins):
            last, seq = replies[2 * i], replies[2 * i + 1]
            if last:
                entry_id, fields = last[0]
                origin.cursor = Cursor(entry_id, int(fields.get("n", 0)))
            else:
                origin.cursor = Cursor("0-0", int(seq or 0))

    def _purge_local(self, origin: FollowedOrigin, *, counted: bool = True) -> None:
        if counted:
            origin.gaps += 1
        self._applying = True
        try:
            Bump(purge=True).apply(origin.caches)
        finally:
            self._applying = False

    # --- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = 0.05
        while True:
            try:
                if self.state != "up":
                    await within(self.settings.io_timeout, self._recover())  # (a cancel is never lost)
                    delay = 0.05
                await self._round()
            except Regap as exc:
                for origin in self._origins.values():
                    origin.gate.close()
                log.warning("invalidation plane %s: %s; purging (a gap)", self.url, exc)
                self.state, self.reason, self.since = "connecting", str(exc), time.time()
                self.fence.beat = -math.inf  # that Redis does not know this node: hold until it does
            except (*_FAILURES, Twin) as exc:
                if isinstance(exc, Twin) and self.reason != str(exc):
                    log.error("invalidation plane %s: %s; passing through, writes held, until it is gone",
                              self.url, exc)
                self._went_down(why(exc))
                with contextlib.suppress(*_FAILURES):
                    assert self._reader is not None
                    await self._reader.connection_pool.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _round(self) -> None:
        assert self._reader is not None
        s = self.settings
        fresh = [o for o in self._origins.values() if o.cursor is None]
        if fresh:
            await self._bootstrap(fresh)
            for origin in fresh:
                self._purge_local(origin, counted=False)
        origins = [o for o in self._origins.values() if o.cursor is not None]
        streams: dict[Any, Any] = {o.stream: o.cursor.last_id for o in origins if o.cursor is not None}
        acks_key = self._key("acks")
        streams[acks_key] = self._acks_id
        pipe = self._reader.pipeline(transaction=False)
        # Every `check` seconds a round registers the node (rule 3) and reads each origin's
        # lost nodes (rule 4); a round proves the gate only within `check` of the last one that
        # did (the fence counts it). Not every round: a script per round costs the busy loop.
        round_keys = [self._key("nodes"), self._key(f"name:{self.node}")]
        for o in origins:
            round_keys += [o.nodes, o.lost_key, o.seq, o.stream]
        check = round_keys != self._check_keys or time.monotonic() - self._check_sent >= s.check
        if check:
            purge = Bump(purge=True).encode()
            pipe.eval(ROUND, len(round_keys), *round_keys, self.node, int(s.heartbeat * 1000), s.maxlen, purge,
                      self.token)
        ack, self._ack_due = self._ack_due, {}
        at, self._ack_at = self._ack_at, {}
        if ack:
            body: dict[Any, Any] = {"node": self.node, "pos": encode_positions(ack), "at": encode_positions(at)}
            pipe.xadd(acks_key, body, maxlen=s.maxlen, approximate=True)
        pipe.xread(streams, count=s.count, block=max(1, int(s.block * 1000)))
        pipe.get(self._key("epoch"))
        sent = time.monotonic()
        if check:  # until it answers, it may have registered this node at any moment
            self.fence.pending += 1
        try:
            replies = await pipe.execute()
        except BaseException:
            if check:
                self.fence.settle(time.monotonic() if self.fence.beat > -math.inf else None)
            elif self.fence.beat > -math.inf:
                self.fence.beat = time.monotonic()
            raise
        if check and replies[0] and replies[0][0] == "twin":
            self.fence.settle(None)
            self._named = False
            raise Twin(f"another process holds the name {self.node!r} (give each node its own --node-id)")
        if check:
            self._named = True
            if self.siblings is not None:  # registered under its name: the board may say so (not a twin's)
                self.siblings.holds_name()
            self._check_sent, self._check_keys = sent, round_keys
            self.fence.settle(time.monotonic() if len(origins) == len(self._origins) else None)  # all registered
        if self.state != "up":
            return  # the publisher found Redis down meanwhile: recover before proving anything
        read, epoch = replies[-2], replies[-1]
        if check:
            live, fresh, *lost = replies[0]
            if fresh:  # a node list made again (deleted, evicted) says nothing of who left
                self.nodes = tuple(live)
            else:
                self._seen(tuple(live))
            for origin, (members, rejoined) in zip(origins, lost, strict=True):
                origin.see_lost(tuple(str(m) for m in members), bool(rejoined), self.node)
        if epoch != self._epoch:
            raise Regap("Redis lost its data (restarted or flushed)")
        by_stream = read_streams(read)
        full = False
        for origin in origins:
            entries = by_stream.get(origin.stream, ())
            full = full or len(entries) >= s.count
            self._apply(origin, entries)
        for entry_id, fields in by_stream.get(acks_key, ()):
            self._acks_id = entry_id
            node = fields.get("node", "")
            if node and node != self.node and "at" in fields:  # without it (older versions): holds time out
                self.holds.ack(node, decode_positions(fields["at"]))
        # With `count` entries there may be more; in the grace (rule 5) nothing is proven.
        if not full and sent >= self._grace_until and sent - self._check_sent < s.check:
            for origin in origins:
                if not origin.lost:
                    origin.gate.prove(sent)

    def _seen(self, live: tuple[str, ...]) -> None:
        for gone in set(self.nodes) - set(live):
            self.holds.forget_node(gone)
        self.nodes = live

    def _apply(self, origin: FollowedOrigin, entries: Any) -> None:
        cursor = origin.cursor
        assert cursor is not None
        for entry_id, fields in entries:
            try:
                n = int(fields["n"])
                own = fields["i"] == self.token if "i" in fields else fields.get("node") == self.node
                bump = None if own else Bump.decode(fields["b"])
            except (KeyError, ValueError) as exc:
                log.warning("invalidation plane %s: unreadable entry %s on %s (%s): purging",
                            self.url, entry_id, origin.stream, exc)
                cursor.take(cursor.last_n + 1, entry_id)
                self._purge_local(origin)
                continue
            if not cursor.take(n, entry_id):
                log.warning("invalidation plane %s: %s skipped from %d to %d (trimmed or lost): purging",
                            self.url, origin.stream, n - 1 if n else 0, n)
                self._purge_local(origin)
            if bump is None:
                continue  # this node's own, applied when it was made
            bump = bump if self.siblings is None else self.siblings.received(bump, fields.get("node"))
            self._applying = True
            try:
                bump.apply(origin.caches)
            finally:
                self._applying = False
            origin.applied += 1
            origin.lag_ms = entry_lag_ms(entry_id)
            self._ack_due[origin.key] = n
            self._ack_at[origin.key] = entry_position(entry_id)

    # --- publishing ---------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        """Publish what was bumped since the last turn of the loop; several batches may be
        in flight (a write's commit-time bump need not wait for its send-time one), a few."""
        assert self._wake is not None and self._loop is not None
        slots = asyncio.Semaphore(4)
        inflight: set[asyncio.Task[None]] = set()

        async def publish(batch: Batch) -> None:
            async with slots:
                await self._publish(batch)

        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._open = self._open, None
                if batch:
                    task = self._loop.create_task(publish(batch))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
        finally:
            for task in inflight:
                task.cancel()

    async def _publish(self, batch: Batch) -> None:
        assert self._cmd is not None and self._loop is not None
        s = self.settings
        found = ((self._origins.get(k) or self._leaving.get(k), bump) for k, bump in batch.bumps.items())
        order = [(origin, bump) for origin, bump in found if origin is not None]
        try:
            pipe = self._cmd.pipeline(transaction=False)
            for origin, bump in order:
                pipe.eval(PUBLISH, 4, origin.seq, origin.stream, origin.nodes, self._key("epoch"), s.maxlen,
                          self.node, bump.encode(), self.token, self._epoch or "")
            replies = await pipe.execute()  # bounded by the client's socket timeout
            if any(len(reply) == 1 for reply in replies):  # a Redis that lost its data since we joined
                self.fence.beat = -math.inf  # held until this node joined again (and `_young`)
                raise Regap("Redis lost its data (restarted or flushed)")
        except (*_FAILURES, Regap) as exc:
            # Whether the entries made it is unknown: publish a purge on the way back, and
            # hold the replies behind the fence (rule 4).
            self._lost |= set(batch.bumps)
            self._went_down(why(exc))
            self.fence.add(batch.future)
            return
        self._batches += 1
        published: dict[str, int] = {}
        live: dict[str, list[str]] = {}
        for (origin, bump), (_n, entry_id, nodes) in zip(order, replies, strict=True):
            origin.published += 1
            published[origin.key] = entry_position(str(entry_id))
            live[origin.key] = list(nodes) if self.siblings is None else self.siblings.waited_for(bump, nodes)
        opened, times = batch.opened, self._hold_times
        batch.future.add_done_callback(lambda _: times.append(time.monotonic() - opened))
        self.holds.add(batch.future, published, live)
        if not batch.future.done():
            self._loop.call_later(s.hold, self.holds.expire, batch.future)

    # --- the change feed's lease ------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease / 3)
            with contextlib.suppress(*_FAILURES):
                await self._keep_leases()

    async def _keep_leases(self) -> None:
        if not self.wants_leases:
            return
        for origin in list(self._origins.values()):
            if self.state != "up" or self._cmd is None:
                if origin.lease_mine and time.monotonic() > origin.lease_until:
                    self._lease_lost(origin, "Redis is down")
                continue
            try:
                taken = await origin.keep_lease(self._cmd, self.node, self.settings.lease)
            except _FAILURES:
                if origin.lease_mine and time.monotonic() > origin.lease_until:
                    self._lease_lost(origin, "cannot renew it")
                raise
            if taken is False:
                self._lease_lost(origin, "another node holds it now")
            elif taken:
                log.info("invalidation plane: this node (%s) runs the change feed of %s", self.node, origin.key)
                # Taking over is a gap: changes between the last holder's end and this
                # feed's start were seen by no feed. Purge here and on every node.
                self._purge_local(origin, counted=False)
                self._observed(origin.key, ("p",))
                if self.lease_listener is not None:
                    self.lease_listener(origin.key, True)

    def _lease_lost(self, origin: FollowedOrigin, why: str) -> None:
        origin.lease_mine = False
        origin.lease_holder = ""
        log.warning("invalidation plane: this node no longer runs the change feed of %s: %s", origin.key, why)
        if self.lease_listener is not None:
            self.lease_listener(origin.key, False)

    def holds_lease(self, origin_key: str) -> bool:
        return (origin := self._origins.get(origin_key)) is not None and origin.lease_mine

    def lease_holder(self, origin_key: str) -> str:
        return origin.lease_holder if (origin := self._origins.get(origin_key)) is not None else ""

    # --- reading the state ------------------------------------------------------------------

    def status(self) -> PlaneStatus:
        names, spared, unpublished = self.siblings.figures() if self.siblings is not None else ((), 0, 0)
        origins = tuple(o.status(self.state == "up") for o in sorted(self._origins.values(), key=lambda o: o.key))
        return PlaneStatus(
            url=self.url, node=self.node, state=self.state, reason=self.reason, since=self.since, nodes=self.nodes,
            published=sum(o.published for o in origins), applied=sum(o.applied for o in origins),
            gaps=sum(o.gaps for o in origins), holds=self._batches, hold_timeouts=self.holds.timed_out,
            hold_ms=p50_p99(self._hold_times), downs=self.downs, origins=origins, fenced=self.fence.held,
            siblings=names, spared=spared, board_only=unpublished,
        )  # fmt: skip

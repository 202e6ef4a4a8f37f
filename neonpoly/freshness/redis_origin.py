"""One origin as a node of the invalidation plane follows it: its keys in Redis, where the
node's reading stands, and what it counted (redis_plane.py keeps one per origin)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from neonpoly.freshness.plane import Cursor, Gate, OriginPlaneStatus
from neonpoly.freshness.redis_wire import RENEW

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from neonpoly.cache.query_cache import QueryCache

log = logging.getLogger("neonpoly.plane")


@dataclass(slots=True)
class FollowedOrigin:
    key: str
    prefix: str
    gate: Gate
    caches: list[QueryCache] = field(default_factory=list)
    cursor: Cursor | None = None  # None until read from Redis (then a purge: joining is a gap)
    published: int = 0
    applied: int = 0
    gaps: int = 0
    lag_ms: float | None = None
    lease_holder: str = ""
    lease_mine: bool = False
    lease_until: float = 0.0  # monotonic: past it, a lease not renewed is given up
    lost: tuple[str, ...] = ()  # nodes gone without a goodbye (rule 4): no hits until they rejoin

    @property
    def stream(self) -> str:
        return f"{self.prefix}:o:{self.key}:bumps"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:o:{self.key}:seq"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:o:{self.key}:nodes"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:o:{self.key}:lease"

    @property
    def lost_key(self) -> str:
        return f"{self.prefix}:o:{self.key}:lost"

    async def keep_lease(self, cmd: Redis, node: str, lease: float) -> bool | None:
        """Renew `node`'s lease of the origin's change feed, or take it if free: True when just
        taken, False when just lost to another node, None otherwise (another's holder is read).
        Raises what the client raises."""
        now, ms = time.monotonic(), int(lease * 1000)
        if self.lease_mine:
            if await cmd.eval(RENEW, 1, self.lease, node, ms):
                self.lease_until = now + lease * 0.8
                return None
            return False
        if await cmd.set(self.lease, node, nx=True, px=ms):
            self.lease_mine, self.lease_holder = True, node
            self.lease_until = now + lease * 0.8
            return True
        self.lease_holder = str(await cmd.get(self.lease) or "")
        return None

    def see_lost(self, members: tuple[str, ...], rejoined: bool, node: str) -> None:
        """A round read the origin's lost nodes (`rejoined`: this node, `node`, was one of them)."""
        if rejoined:
            log.warning("invalidation plane: this node (%s) was lost on %s (heartbeat expired); it purged it",
                        node, self.key)
        if members != self.lost:
            if members:
                log.warning("invalidation plane: %s: node %s left without a goodbye (cut off from Redis, or "
                            "crashed): passing through until it comes back, or `neonpoly plane forget`", self.key,
                            ", ".join(members))
            elif self.lost:
                log.info("invalidation plane: %s: no node lost any more; hits resume", self.key)
            self.lost = members
        if members:
            self.gate.close()

    def status(self, up: bool) -> OriginPlaneStatus:
        return OriginPlaneStatus(
            origin=self.key,
            stream=self.stream,
            caught_up=up and self.gate.open,
            last_id=self.cursor.last_id if self.cursor else "",
            last_n=self.cursor.last_n if self.cursor else 0,
            lag_ms=self.lag_ms,
            published=self.published,
            applied=self.applied,
            gaps=self.gaps,
            refused_hits=self.gate.refused,
            feed_lease="me" if self.lease_mine else self.lease_holder,
            lost=self.lost,
        )

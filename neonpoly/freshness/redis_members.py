"""Who is on an invalidation plane, read straight from Redis (`neonpoly plane`): the nodes
following each origin, and the ones lost without a goodbye that keep every node passing
through; and the operator's word that a lost node is gone for good (`plane forget`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from neonpoly.freshness.plane import Bump
from neonpoly.freshness.redis_wire import FORGET

MAXLEN = 10_000  # PlaneSettings.maxlen's default: the purge's XADD trims alike


@dataclass(frozen=True, slots=True)
class OriginMembers:
    origin: str
    live: tuple[str, ...]  # heartbeat not expired
    expired: tuple[str, ...]  # heartbeat expired, not yet moved to lost by a node's round
    lost: tuple[str, ...]  # gone without a goodbye: the origin's hits pause until they return


def _client(url: str) -> Redis:
    return Redis.from_url(url, protocol=2, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0)


def _origins(keys: list[str], prefix: str) -> list[str]:
    """Origin labels from their `…:o:<origin>:nodes|lost` keys (labels may hold colons)."""
    head, found = f"{prefix}:o:", set()
    for key in keys:
        for tail in (":nodes", ":lost"):
            if key.startswith(head) and key.endswith(tail):
                found.add(key[len(head) : -len(tail)])
    return sorted(found)


async def members(url: str, prefix: str = "neonpoly") -> list[OriginMembers]:
    client = _client(url)
    try:
        keys = [str(k) async for k in client.scan_iter(match=f"{prefix}:o:*", count=500)]
        clock: tuple[int, int] = tuple(await client.time())  # type: ignore[assignment]
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        out = []
        for origin in _origins(keys, prefix):
            scored: list[Any] = await client.zrange(f"{prefix}:o:{origin}:nodes", 0, -1, withscores=True)
            nodes = [(str(pair[0]), float(pair[1])) for pair in scored]
            lost = await client.zrange(f"{prefix}:o:{origin}:lost", 0, -1)
            out.append(
                OriginMembers(
                    origin,
                    tuple(n for n, score in nodes if score > now_ms),
                    tuple(n for n, score in nodes if score <= now_ms),
                    tuple(str(n) for n in lost),
                )
            )
        return out
    finally:
        await client.aclose()


async def forget(url: str, node: str, prefix: str = "neonpoly") -> list[str]:
    """Purge, on every node, each origin `node` followed, and stop waiting for it. Returns those
    origins. Only for a node that is really gone: one still running and cut off from Redis may
    keep writing unpublished, and nothing would pause the others' hits any more."""
    client = _client(url)
    purge = Bump(purge=True).encode()
    done = []
    try:
        keys = [str(k) async for k in client.scan_iter(match=f"{prefix}:o:*", count=500)]
        for origin in _origins(keys, prefix):
            base = f"{prefix}:o:{origin}"
            keys4 = (f"{base}:nodes", f"{base}:lost", f"{base}:seq", f"{base}:bumps")
            if await client.eval(FORGET, 4, *keys4, node, "operator", MAXLEN, purge):
                done.append(origin)
        return done
    finally:
        await client.aclose()

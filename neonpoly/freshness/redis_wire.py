"""What the invalidation plane sends Redis and reads back: its scripts and reply shapes
(redis_plane.py does the talking)."""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from typing import Any

# INCR + XADD in one step, so sequence numbers and stream order agree; and who to wait for.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('INCR', KEYS[1])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'n', n, 'node', ARGV[2], 'b', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
return {n, id, redis.call('ZRANGE', KEYS[3], 0, -1)}
"""
# Registers the node on every key given (the plane's, each followed origin's); the live nodes.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('PEXPIRE', key, ttl * 20)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def p50_p99(values: deque[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    cuts = statistics.quantiles(values, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


def release(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def streams(reply: Any) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """XREAD's reply in either protocol's shape: stream -> [(id, fields)]."""
    if not reply:
        return {}
    pairs = reply.items() if isinstance(reply, dict) else reply
    out: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for stream, entries in pairs:
        out[str(stream)] = [(str(i), f if isinstance(f, dict) else dict(zip(f[::2], f[1::2], strict=True)))
                            for i, f in entries]
    return out


def why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__

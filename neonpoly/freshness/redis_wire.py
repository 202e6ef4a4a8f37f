"""What the invalidation plane sends Redis and reads back: its scripts and reply shapes
(redis_plane.py does the talking)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# INCR + XADD in one step, so sequence numbers and stream order agree; and who to wait for
# (the nodes whose heartbeat has not expired; expired ones are moved to `lost` by ROUND).
# Refused ({0}) when the epoch (KEYS[4]) is not the one the node joined: Redis lost its data.
PUBLISH = """
if (redis.call('GET', KEYS[4]) or '') ~= ARGV[5] then return {0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('INCR', KEYS[1])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'n', n, 'node', ARGV[2], 'b', ARGV[3], 'i', ARGV[4])
return {n, id, redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf')}
"""
# Every reader round: the node's heartbeat on the plane's key (KEYS[1]) and on each followed
# origin's (KEYS[3..], four keys per origin: nodes, lost, seq, stream). KEYS[2] says which
# process holds the node's name (ARGV[5], a random token): a name held by another process
# whose registration has not expired is refused ({'twin', ms left}) and nothing is written;
# two live nodes under one name would take each other's bumps for their own. A node whose heartbeat
# expired without its goodbye (ZREM on a clean stop) moves to the origin's `lost` set: it may
# be cut off from Redis and still writing through its origin, unpublished, so no node serves
# hits of that origin while the set is not empty. A node that finds itself there publishes a
# purge of the origin (so whatever it wrote meanwhile is forgotten everywhere) and leaves it,
# in this one step. Returns the live nodes, 1 if this node was not among them (its first round,
# or the key was deleted or evicted: then who is missing from it proves nothing), then per
# origin {lost nodes, 1 if it rejoined}.
ROUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, maxlen, purge, token = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= token then
  return {'twin', redis.call('PTTL', KEYS[2])}
end
redis.call('SET', KEYS[2], token, 'PX', ttl)
local fresh = redis.call('ZADD', KEYS[1], now + ttl, me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 20)
local out = {redis.call('ZRANGE', KEYS[1], 0, -1), fresh}
for i = 3, #KEYS, 4 do
  local nodes, lost, seq, stream = KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3]
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now)) do
    redis.call('ZADD', lost, 'NX', now, m)
    redis.call('ZREM', nodes, m)
  end
  redis.call('ZADD', nodes, now + ttl, me)
  local rejoined = 0
  if redis.call('ZSCORE', lost, me) then
    local n = redis.call('INCR', seq)
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'n', n, 'node', me, 'b', purge, 'i', token)
    redis.call('ZREM', lost, me)
    rejoined = 1
  end
  table.insert(out, {redis.call('ZRANGE', lost, 0, -1), rejoined})
end
return out
"""
# An operator's word that a lost node is gone for good (`FORGET NODE`): purge the origin
# everywhere, then stop waiting for it. KEYS: nodes, lost, seq, stream; ARGV: the node,
# this node (the purge's author), maxlen, the purge. Returns 1 when it was known.
FORGET = """
local known = redis.call('ZREM', KEYS[1], ARGV[1]) + redis.call('ZREM', KEYS[2], ARGV[1])
if known > 0 then
  local n = redis.call('INCR', KEYS[3])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'n', n, 'node', ARGV[2], 'b', ARGV[4])
  return 1
end
return 0
"""
# The epoch: a random token and when it was made (Redis's clock, ms), so a node joining
# later knows how long ago Redis lost its data.
MAKE_EPOCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1] .. '@' .. now, 'NX')
return {redis.call('GET', KEYS[1]), now}
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Twin(Exception):
    """Another live process holds this node's name."""


class Regap(Exception):
    """Redis lost its data under a live connection: start over as after a reconnection."""


def p50_p99(values: deque[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    cuts = statistics.quantiles(values, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


def not_before(future: asyncio.Future[None], until: float) -> asyncio.Future[None]:
    """`future`, but not done before `until` (monotonic): after Redis lost its data, a write's
    reply waits until every gate proven before the loss closed, since in the Redis that lost
    it nobody is registered yet and so nobody is waited for."""
    if time.monotonic() >= until:
        return future
    loop = asyncio.get_running_loop()
    out: asyncio.Future[None] = loop.create_future()
    future.add_done_callback(lambda _: loop.call_later(max(0.0, until - time.monotonic()), release, out))
    return out


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


async def within(seconds: float, call: Awaitable[T]) -> T:
    """`asyncio.wait_for` without its flaw in Python 3.11: a cancel that lands as `call`
    ends is swallowed there, and a loop cancelled by close() runs on. asyncio.timeout
    counts cancels and passes them on."""
    async with asyncio.timeout(seconds):
        return await call


async def stop_tasks(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel until they end: a cancel may still be swallowed inside redis-py, which bounds
    its sends with 3.11's `wait_for`; the task then runs on to its next await."""
    ended = list(tasks)
    left = set(ended)
    while left:
        for task in left:
            task.cancel()
        _, left = await asyncio.wait(left, timeout=0.5)
    await asyncio.gather(*ended, return_exceptions=True)  # their outcomes read (none logged at exit)

"""What test_33 (the hostile review of the prepared-batch memo) builds on: raw frames, a pair
of sessions (through neonpoly and straight to the origin) that sends both the same bytes and
compares, and a watch on the session's `_lone_batch` that proves the shortcut answered."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from neonpoly import pgwire
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, hits
from tests.proxy.caching import CachingProxy

FLUSH = pgwire.frame(b"H")
Msgs = list[tuple[bytes, bytes]]


def bind(
    statement: str,
    values: tuple[bytes | None, ...],
    *,
    portal: str = "",
    formats: tuple[int, ...] = (),
    results: tuple[int, ...] = (),
) -> bytes:
    """A Bind with parameter formats, raw values (text or binary) and result formats."""
    body = pgwire.cstr(portal) + pgwire.cstr(statement)
    body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    body += struct.pack("!h", len(results)) + b"".join(struct.pack("!h", f) for f in results)
    return pgwire.frame(b"B", body)


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = pgwire.cstr(name) + pgwire.cstr(sql) + struct.pack("!h", len(types))
    return pgwire.frame(b"P", body + b"".join(struct.pack("!I", t) for t in types))


def lone(statement: str, *values: bytes, **kw: Any) -> bytes:
    """The lone batch a driver sends per execution: Bind, Describe portal, Execute, Sync."""
    portal = kw.get("portal", "")
    rows = kw.pop("rows", 0)
    return bind(statement, values, **kw) + rawpg.describe_portal(portal) + rawpg.execute(portal, rows) + rawpg.SYNC


def normal(msgs: Msgs) -> Msgs:
    """The answer as a client sees it; an error by its SQLSTATE (its text names positions)."""
    out: Msgs = []
    for kind, body in msgs:
        if kind in (b"N", b"S"):
            continue
        if kind == b"E":
            fields = dict((f[:1], f[1:]) for f in body.split(b"\x00") if f)
            body = fields.get(b"C", b"")
        out.append((kind, body))
    return out


def watch(proxy: CachingProxy, taken: list[int]) -> None:
    """Count in `taken[0]` the reads every session's shortcut (`_lone_batch`) decided."""
    for session in proxy.service.server.sessions:
        real = session._lone_batch
        if getattr(real, "watched", False):
            continue

        def counted(data: bytes, real: Callable[[bytes], bool] = real) -> bool:
            done = real(data)
            taken[0] += done
            return done

        counted.watched = True  # type: ignore[attr-defined]
        session._lone_batch = counted  # type: ignore[method-assign]


def memos(proxy: CachingProxy) -> int:
    return sum(len(getattr(s, "batch_memos", {})) for s in proxy.service.server.sessions)


class Pair:
    """One raw session through neonpoly and its double straight to the origin, with the
    shortcut's answers counted (the session's `_lone_batch` wrapped)."""

    def __init__(self, env: Env, via: rawpg.Raw, direct: rawpg.Raw) -> None:
        self.env, self.via, self.direct = env, via, direct
        proxy = env.proxy
        assert isinstance(proxy, CachingProxy)
        self.proxy = proxy
        self.taken = [0]
        watch(proxy, self.taken)

    @classmethod
    async def open(cls, env: Env) -> Pair:
        via = await rawpg.Raw.connect(env.proxy.port)
        direct = await rawpg.Raw.connect(env.pg.port)
        env.stack.push_async_callback(via.close)
        env.stack.push_async_callback(direct.close)
        return cls(env, via, direct)

    def forget_hit_memos(self) -> None:
        for session in self.proxy.service.server.sessions:
            getattr(session, "hit_memos", {}).clear()

    def memos(self) -> int:
        return memos(self.proxy)

    async def both(self, *frames: bytes, readies: int = 1, split: int | None = None, why: str = "") -> Msgs:
        """Send to both; the proxy's answer (up to `readies` ReadyForQuery) must be the origin's."""
        data = b"".join(frames)
        self.forget_hit_memos()
        if split is None:
            self.via.send(data)
        else:  # two reads at the proxy
            self.via.send(data[:split])
            await self.via.writer.drain()
            await asyncio.sleep(0.005)
            self.via.send(data[split:])
        self.direct.send(data)
        got: Msgs = []
        want: Msgs = []
        for _ in range(readies):
            got += await self.via.until_ready()
            want += await self.direct.until_ready()
        assert normal(got) == normal(want), f"{why}: proxy {normal(got)!r} != direct {normal(want)!r}"
        return got

    async def shortcut_hit(self, frames: bytes, *, why: str = "", tries: int = 6) -> Msgs:
        """Send `frames` until the shortcut answers them from the cache (each answer compared)."""
        for _ in range(tries):
            before, taken = hits(self.proxy), self.taken[0]
            got = await self.both(frames, why=f"warming {why}")
            if hits(self.proxy) > before and self.taken[0] > taken:
                assert self.memos() >= 1
                return got
        raise AssertionError(f"the shortcut never answered {why}: {self.proxy.totals()}")

    async def warm(self, *frames: bytes) -> None:
        """Each stored (two runs: a miss, a miss stored) without being served yet."""
        for f in frames:
            for _ in range(2):
                await self.both(f, why="storing")


async def bm_table(env: Env, prefix: str = "adv_bm") -> str:
    return await env.table(prefix, "id int PRIMARY KEY, v text", "(1, 'one')", "(2, 'two')", "(3, 'three')")


async def prepared(pair: Pair, *parses: bytes) -> None:
    await pair.both(*parses, rawpg.SYNC, why="parse")


async def hit_by_shortcut(env: Env) -> tuple[str, Pair, bytes]:
    """A table, a pair of sessions with statement s on it, and s(1) proven a shortcut hit."""
    t = await bm_table(env)
    pair = await Pair.open(env)
    await prepared(pair, parse("s", f"SELECT v FROM {t} WHERE id = $1", (23,)))
    await pair.warm(lone("s", b"2"))
    one = lone("s", b"1")
    await pair.shortcut_hit(one, why="s(1)")
    return t, pair, one

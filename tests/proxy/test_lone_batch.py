"""A prepared statement's lone batch (a read that is one Bind, Describe/Execute, Sync: what
drivers send per execution, and the shortcut `BatchHandling._lone_batch` takes for a shape
it remembers) is decided exactly as the same batch followed by another frame in its read
(the frame loop and `_sync`): the same answers, hits and misses, stored and evicted alike,
whatever the batch holds (Describe of either kind, named portals, row limits, several
Executes, Flush, Close, errors, values that read the clock, writes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from neonpoly import pgwire
from tests.adversarial.rawpg import (
    SYNC,
    Raw,
    bind,
    close_statement,
    describe_portal,
    describe_statement,
    execute,
    kinds,
    parse,
    query,
    rows,
)
from tests.pgharness import PgServer
from tests.proxy.caching import CachingProxy, caching_proxy
from tests.proxy.test_cache_hits import make_table

FLUSH = pgwire.frame(b"H")
Batch = Callable[[str], list[bytes]]  # the value bound -> the batch's frames, up to Sync or Flush

# Each sent three times with the same value (a miss, a miss stored, a hit), every batch with
# the same value: a key that left something out (a row limit, a portal) would be served another's answer.
BATCHES: dict[str, Batch] = {
    "bind execute": lambda v: [bind("", "s", (v,)), execute(), SYNC],
    "describe portal": lambda v: [bind("", "s", (v,)), describe_portal(), execute(), SYNC],
    "describe statement": lambda v: [bind("", "s", (v,)), describe_statement("s"), execute(), SYNC],
    "describe another statement": lambda v: [bind("", "s", (v,)), describe_statement("t"), execute(), SYNC],
    "describe an unknown statement": lambda v: [bind("", "s", (v,)), describe_statement("nope"), execute(), SYNC],
    "named portal": lambda v: [bind("p", "s", (v,)), describe_portal("p"), execute("p"), SYNC],
    "a portal of an earlier batch": lambda v: [bind("p", "s", (v,)), describe_portal(), execute(), SYNC],
    "row limit": lambda v: [bind("", "s", (v,)), describe_portal(), execute("", 1), SYNC],
    "two executes": lambda v: [bind("", "s", (v,)), execute("", 1), execute("", 1), SYNC],
    "no execute": lambda v: [bind("", "s", (v,)), describe_portal(), SYNC],
    "unnamed statement": lambda v: [bind("", "", (v,)), describe_portal(), execute(), SYNC],
    "text values": lambda v: [bind("", "t", (f"name {v}",)), describe_portal(), execute(), SYNC],
    "a value that reads the clock": lambda v: [bind("", "t", ("now",)), describe_portal(), execute(), SYNC],
    "a value the statement refuses": lambda v: [bind("", "s", ("x",)), describe_portal(), execute(), SYNC],
    "an unknown statement": lambda v: [bind("", "nope", (v,)), execute(), SYNC],
    "flush": lambda v: [bind("", "s", (v,)), describe_portal(), execute(), FLUSH],
    "close in the batch": lambda v: [bind("", "s", (v,)), execute(), close_statement("s"), SYNC],
    "a write": lambda v: [bind("", "w", (v,)), execute(), SYNC],
    "a read after the write": lambda v: [bind("", "s", (v,)), describe_portal(), execute(), SYNC],
}
Seen = list[tuple[str, bytes, list[list[bytes | None]], dict[str, int]]]


async def _script(proxy: CachingProxy, table: str, alone: bool) -> tuple[Seen, int]:
    """Every batch alone in its read, or (not `alone`) followed by a Sync of nothing, which
    makes the frame loop take it: what each answer was and what the cache counted; and how
    many shapes the session remembered for the shortcut."""
    seen: Seen = []
    raw = await Raw.connect(proxy.port)
    statements = (
        parse("s", f"SELECT name FROM {table} WHERE id = $1")
        + parse("t", f"SELECT id FROM {table} WHERE name = $1")
        + parse("", f"SELECT name FROM {table} WHERE id = $1::int + 1")
        + parse("w", f"UPDATE {table} SET name = name || '!' WHERE id = $1")
    )
    try:
        raw.send(statements, SYNC)
        await raw.until_ready()
        for name, batch in BATCHES.items():
            for value in ("2", "2", "2", "3"):
                before = proxy.totals()
                frames = batch(value)
                if frames[-1] is FLUSH:  # never the shortcut's: the full path, either way
                    raw.send(*frames)
                    msgs: list[tuple[bytes, bytes]] = []
                    while not msgs or msgs[-1][0] not in (b"C", b"E", b"s"):
                        msgs.append(await raw.message())
                    raw.send(SYNC)
                    msgs += await raw.until_ready()
                else:
                    msgs = await _ask(raw, frames, alone)
                after = proxy.totals()
                counted = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
                seen.append((name, kinds(msgs), rows(msgs), counted))
            if name == "close in the batch":
                raw.send(parse("s", f"SELECT name FROM {table} WHERE id = $1"), SYNC)
                await raw.until_ready()
        # A simple query drops the unnamed statement: a Bind of it fails, alone or not.
        raw.send(query("SELECT 1"))
        await raw.until_ready()
        for value in ("2", "2"):
            msgs = await _ask(raw, BATCHES["unnamed statement"](value), alone)
            seen.append(("unnamed, dropped", kinds(msgs), rows(msgs), {}))
        memos = sum(len(s.batch_memos) for s in proxy.service.server.sessions if hasattr(s, "batch_memos"))
    finally:
        await raw.close()
    return seen, memos


async def _ask(raw: Raw, frames: list[bytes], alone: bool) -> list[tuple[bytes, bytes]]:
    raw.send(*frames, *(() if alone else (SYNC,)))
    msgs = await raw.until_ready()
    if not alone:
        assert kinds(await raw.until_ready()) == b"Z"  # the Sync of nothing
    return msgs


async def test_a_lone_batch_is_decided_as_among_other_frames(pg: PgServer, tmp_path: Path) -> None:
    # One table per proxy: the writes of one run do not reach the other's.
    tables = [await make_table(pg), await make_table(pg)]
    transcripts = []
    taken = []
    for alone, table in zip((True, False), tables, strict=True):
        async with caching_proxy(pg, tmp_path / f"cache-{alone}") as proxy:
            seen, memos = await _script(proxy, table, alone)
            transcripts.append(seen)
            taken.append(memos)
    got_alone, got_among = transcripts
    for one, other in zip(got_alone, got_among, strict=True):
        assert one == other
    # The shortcut was there to be taken, and only for whole lone batches.
    assert taken[0] >= 5
    assert taken[1] == 0

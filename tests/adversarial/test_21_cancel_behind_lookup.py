"""A cancel while neonpoly's relation lookup runs ahead of the client's statement must wait for
the lookup and then cancel the statement (57014, as directly); the session stays usable."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.adversarial import rawpg
from tests.adversarial.harness import Env, eventually
from tests.adversarial.test_19_cancel_while_identity_held import (
    _cancel,
    _const,
    _login_held,
    _query,
    _session,
    _sqlstate,
    gated_proxy,
)


async def test_cancel_waits_for_relation_lookup_then_cancels(env: Env, tmp_path: Path) -> None:
    name = await env.table("adv_cxl", "v int", "(1)")
    async with gated_proxy(env.pg, tmp_path / "lcache") as (service, gate, port):
        raw, key = await _login_held(port)
        try:
            session = _session(service, key)
            await eventually(lambda: _const(session.identity_inflight), lambda b: not b)
            assert rawpg.rows(await _query(raw, "SELECT 1")) == [[b"1"]]
            gate.marker = b"neonpoly_lookup_"
            gate.armed = True
            gate.release.clear()
            raw.send(rawpg.query(f"SELECT pg_sleep(30), v FROM {name}"))
            await raw.writer.drain()
            await asyncio.wait_for(gate.seen.wait(), 10)
            creader, cwriter = await _cancel(port, key)
            await eventually(lambda: _const(len(session.cancels)), lambda n: n > 0)
            gate.release.set()
            answer = await asyncio.wait_for(raw.until_ready(), 15)
            await asyncio.wait_for(creader.read(), 10)
            cwriter.close()
            assert await _sqlstate(answer) == "57014", answer
            assert rawpg.rows(await _query(raw, f"SELECT v FROM {name}")) == [[b"1"]]
        finally:
            await raw.close()

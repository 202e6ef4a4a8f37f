"""A pipeline that waits for answers before it syncs (libpq pipeline mode without Sync; psycopg's
`test_pipeline_communicate_uniqviol`): PostgreSQL runs each message as it arrives, so the
answers must come back without a Sync, and the batch must still end cleanly at its Sync."""

from __future__ import annotations

from tests.adversarial import rawpg
from tests.adversarial.harness import Env


async def test_messages_without_sync_are_answered(env: Env) -> None:
    table = await env.table("adv_nosync", "id int PRIMARY KEY", "(1)")
    await env.admin(f"GRANT INSERT, SELECT ON {table} TO PUBLIC")
    raw = await rawpg.Raw.connect(env.proxy.port)
    try:
        raw.send(rawpg.parse("", f"INSERT INTO {table} VALUES (1)"), rawpg.bind("", ""), rawpg.execute())
        # No Sync: the unique violation must still arrive.
        kind, body = await raw.message(timeout=10)
        while kind not in (b"E", b"C"):
            kind, body = await raw.message(timeout=10)
        assert kind == b"E" and b"23505" in body
        raw.send(rawpg.SYNC)
        assert rawpg.kinds(await raw.until_ready())[-1:] == b"Z"
        raw.send(rawpg.query(f"SELECT count(*) FROM {table}"))
        assert rawpg.rows(await raw.until_ready()) == [[b"1"]]
    finally:
        await raw.close()

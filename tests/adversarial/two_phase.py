"""What the two-phase commit cases share (test_42, test_45): an origin that allows prepared
transactions (the suite's runs with max_prepared_transactions = 0, where PREPARE TRANSACTION
fails), and their sessions: against `serve --workers N` (NEONPOLY_TEST_WORKERS) the sessions
that prepare run on the first worker and the reads go through the second, so a case holds
only if the hold is shared between workers (cache/siblings.py `BoardHolds`)."""

from __future__ import annotations

from collections.abc import Iterator

from tests.adversarial.conftest import WORKERS
from tests.adversarial.harness import Client, Env, Twin
from tests.adversarial.placement import session_on
from tests.pgharness import PgServer, start_pg_server

WRITING_WORKER, READING_WORKER = 0, 1


def prepared_transactions_origin() -> Iterator[PgServer]:
    """A module's origin with prepared transactions allowed (its `pg` fixture: the `env`
    fixture runs neonpoly in front of it)."""
    server = start_pg_server(small=True, extra_settings={"max_prepared_transactions": 5})
    try:
        yield server
    finally:
        server.destroy()


async def session(env: Env, *known: str, worker: int = WRITING_WORKER) -> Client:
    """A session through neonpoly (on `worker` against `serve --workers N`, any otherwise)
    that has read `known` through it: its worker then knows their relations. (A write to a
    table its worker has not looked up holds every table, and a direct COMMIT PREPARED leaves
    that hold until neonpoly restarts: the rest of the module would store nothing.)"""
    client = await session_on(env, worker) if WORKERS > 1 else await env.client()
    for table in known:
        await client.rows(f"SELECT count(*) FROM {table}")
    return client


async def reading_twin(env: Env) -> Twin:
    """A twin whose session through neonpoly is on the reading worker (not the writing one)."""
    login = env.login()
    via = await session_on(env, READING_WORKER, login) if WORKERS > 1 else await env.client(login)
    return Twin(env, via, await env.client(login, via=False), login)

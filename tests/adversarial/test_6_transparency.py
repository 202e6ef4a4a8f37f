"""Class 6: the backend a client believes it talks to must be the one it does talk to."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.adversarial.harness import Env, eventually, unique


async def test_asyncpg_server_pid_is_the_real_backend(env: Env) -> None:
    conn = await asyncpg.connect(**env.proxy.dsn())
    try:
        real = await conn.fetchval("SELECT pg_backend_pid()")
        assert conn.get_server_pid() == real, f"client sees pid {conn.get_server_pid()}, backend is {real}"
    finally:
        await conn.close()


async def test_psycopg_backend_pid_is_in_pg_stat_activity(env: Env) -> None:
    name = unique("adv_app")
    conn = await psycopg.AsyncConnection.connect(
        env.login(application_name=name).url("127.0.0.1", env.proxy.port), autocommit=True
    )
    try:
        seen = conn.info.backend_pid
        real = await env.admin_val("SELECT pid FROM pg_stat_activity WHERE application_name = $1", name)
        assert seen == real, f"client sees pid {seen}, pg_stat_activity says {real}"
    finally:
        await conn.close()


async def test_pg_terminate_backend_of_the_pid_the_client_sees(env: Env) -> None:
    victim = await psycopg.AsyncConnection.connect(env.login().url("127.0.0.1", env.proxy.port), autocommit=True)
    try:
        ok = await env.admin_val("SELECT pg_terminate_backend($1)", victim.info.backend_pid)
        assert ok is True, f"pg_terminate_backend({victim.info.backend_pid}) found no such backend"
        with pytest.raises(psycopg.OperationalError):
            await victim.execute("SELECT 1")
    finally:
        await victim.close()


async def test_pg_cancel_backend_of_the_pid_the_client_sees(env: Env) -> None:
    victim = await psycopg.AsyncConnection.connect(env.login().url("127.0.0.1", env.proxy.port), autocommit=True)
    try:
        running = asyncio.ensure_future(victim.execute("SELECT pg_sleep(3)"))
        pid = victim.info.backend_pid
        # The server's own word that the statement runs in that backend (a cancel that
        # arrives before it starts cancels nothing, on a direct connection too).
        waiting = await eventually(
            lambda: env.admin_val(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query = 'SELECT pg_sleep(3)' "
                "AND state = 'active'",
                pid,
            ),
            lambda n: n == 1,
        )
        ok = await env.admin_val("SELECT pg_cancel_backend($1)", pid)
        cancelled = False
        try:
            await running
        except psycopg.errors.QueryCanceled:
            cancelled = True
        assert ok is True and cancelled, f"pg_cancel_backend({pid}) -> {ok}, cancelled={cancelled}, active={waiting}"
    finally:
        await victim.close()


async def test_client_cancel_request_still_works(env: Env) -> None:
    """Control: the driver's own cancel (CancelRequest with the key it was given)."""
    conn = await asyncpg.connect(**env.proxy.dsn())
    try:
        task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(3)"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("compare_with", ["pg_backend_pid", "client_pid"])
async def test_notify_sender_pid(env: Env, compare_with: str) -> None:
    channel = unique("adv_ch")
    listener = await psycopg.AsyncConnection.connect(env.login().url("127.0.0.1", env.proxy.port), autocommit=True)
    sender = await psycopg.AsyncConnection.connect(env.login().url("127.0.0.1", env.proxy.port), autocommit=True)
    try:
        await listener.execute(f"LISTEN {channel}")
        await sender.execute(f"NOTIFY {channel}, 'hello'")
        real = (await (await sender.execute("SELECT pg_backend_pid()")).fetchone() or (0,))[0]
        gen = listener.notifies(timeout=5, stop_after=1)
        notes = [n async for n in gen]
        assert notes, "no notification arrived"
        expected = real if compare_with == "pg_backend_pid" else sender.info.backend_pid
        assert notes[0].pid == expected, (
            f"notification pid {notes[0].pid}; sender's pg_backend_pid() {real}, "
            f"sender's client-side pid {sender.info.backend_pid}"
        )
    finally:
        await listener.close()
        await sender.close()

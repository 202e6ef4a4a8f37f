"""Helpers for the third round of adversarial cases (test_13_… onwards)."""

from __future__ import annotations

from typing import Any

import asyncpg
import psycopg

from tests.adversarial.harness import Client, Rows, Twin, hits

Outcome = tuple[str, Any]  # ("ok", rows) or ("error", sqlstate)


async def attempt(client: Client, sql: str, params: tuple[Any, ...] = ()) -> Outcome:
    """Rows, or the SQLSTATE of the error the statement raised (errors are answers too)."""
    try:
        return ("ok", await client.rows(sql, params))
    except (asyncpg.PostgresError, psycopg.Error) as exc:
        state = getattr(exc, "sqlstate", None)
        return ("error", state or type(exc).__name__)


async def attempt_run(client: Client, sql: str) -> Outcome:
    try:
        await client.run(sql)
        return ("ok", [])
    except (asyncpg.PostgresError, psycopg.Error) as exc:
        state = getattr(exc, "sqlstate", None)
        return ("error", state or type(exc).__name__)


async def compare(twin: Twin, sql: str, params: tuple[Any, ...] = ()) -> tuple[Outcome, Outcome, bool]:
    """Through neonpoly, then directly: (proxy's outcome, direct outcome, was it a hit)."""
    before = hits(twin.env.proxy)
    got = await attempt(twin.via, sql, params)
    hit = hits(twin.env.proxy) > before
    expected = await attempt(twin.direct, sql, params)
    return got, expected, hit


def sorted_rows(rows: Rows) -> Rows:
    return sorted(rows, key=repr)

"""Fixtures for the Neon API client: a real loopback stand-in and a client aimed at it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from neonpoly._testing.neon_standin import NeonStandin
from neonpoly.integrations.neon_api import NeonAPI, RetryPolicy

# Tiny delays keep retry tests fast; the recorded values still show what the client chose.
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.004)


class RecordingSleep:
    """The client's injected sleep: remembers each delay, yields to the loop, never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def standin() -> AsyncIterator[NeonStandin]:
    async with NeonStandin() as server:
        yield server


def make_api(
    server: NeonStandin,
    sleep: RecordingSleep,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    page_limit: int = 100,
    retry: RetryPolicy = FAST_RETRY,
) -> NeonAPI:
    return NeonAPI(
        server.api_key if api_key is None else api_key,
        base_url=base_url or server.base_url,
        sleep=sleep,
        retry=retry,
        rng=random.Random(0),
        page_limit=page_limit,
    )


@pytest.fixture
async def api(standin: NeonStandin, sleeps: RecordingSleep) -> AsyncIterator[NeonAPI]:
    async with make_api(standin, sleeps) as client:
        yield client

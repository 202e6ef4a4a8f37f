"""A caching neonpoly in front of the test origin, for the cache tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neonpoly.cache.adaptive import AdaptiveTTL
from neonpoly.control.serving import Serving, start_serving
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.pgharness import PgServer


@dataclass
class CachingProxy:
    service: ProxyService
    pg: PgServer
    port: int
    cache_dir: Path
    serving: Serving

    def url(self, role: str = "postgres", database: str = "app", **params: str) -> str:
        return self.pg.url(role, database, "disable", host="127.0.0.1", port=self.port, params=params)

    def dsn(self, role: str = "postgres", database: str = "app") -> dict[str, object]:
        return {**self.pg.dsn(role, database), "port": self.port, "host": "127.0.0.1"}

    def totals(self) -> dict[str, int]:
        return dict(self.service.stats.snapshot().totals.by_status)

    def flush(self) -> None:
        for route in self.service.routes.by_id.values():
            if route.cache is not None:
                route.cache.store.flush()


@asynccontextmanager
async def caching_proxy(
    pg: PgServer,
    cache_dir: Path,
    *,
    serving: dict[str, Any] | None = None,
    adaptive: AdaptiveTTL | None = None,
    listen: tuple[str, int] = ("127.0.0.1", 0),
    **cache: object,
) -> AsyncIterator[CachingProxy]:
    """What `neonpoly serve --upstream <pg>` runs (start_serving: rules, adaptive TTL, the
    admin database), with the cache settings given; `serving` passes start_serving options."""
    settings = ProxySettings(
        listen=listen,
        cache_dir=cache_dir,
        cache=CacheSettings(**cache),  # type: ignore[arg-type]
        rules_dir=cache_dir.parent,
    )
    service = ProxyService(settings, adaptive=adaptive)
    running = await start_serving(
        service,
        cache_dir.parent,
        upstream=pg.url("postgres", "app", sslmode="require"),
        **(serving or {}),
    )
    try:
        yield CachingProxy(service, pg, running.address[1], cache_dir, running)
    finally:
        await running.close(grace=0.5)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def psql(url: str, *sql: str) -> list[str]:
    """Run each statement with the real psql binary (one connection); return stdout lines."""
    args = ["psql", url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    for statement in sql:
        args += ["-c", statement]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()

"""The origin neonpoly starts itself when nothing else is configured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from neonpoly.integrations.embedded import LocalPostgres
from neonpoly.proxy.origin import Origin

EMBEDDED_USER = "neon"
EMBEDDED_DATABASE = "neondb"


@dataclass(slots=True)
class EmbeddedOrigin:
    cluster: LocalPostgres

    @property
    def password(self) -> str:
        return self.cluster.password

    def client_url(self, host: str, port: int, cache_id: str | None = None) -> str:
        """The connection string a client uses to reach the embedded origin through neonpoly."""
        url = (
            f"postgres://{EMBEDDED_USER}:{quote(self.password, safe='')}@{host}:{port}/"
            f"{EMBEDDED_DATABASE}?sslmode=disable"
        )
        return url + (f"&application_name={cache_id}" if cache_id else "")

    def stop(self) -> None:
        self.cluster.stop()


def start_embedded_origin(root: Path, timeout: float = 60) -> tuple[EmbeddedOrigin, Origin]:
    """Start (initialising on first use) the embedded cluster under `root/embedded`."""
    # Not die_with_parent: Linux ties that to the starting *thread*, and we start it from a
    # worker thread; `serve` stops the cluster itself on shutdown.
    cluster = LocalPostgres(root / "embedded", superuser=EMBEDDED_USER, settings={"max_connections": 200})
    fresh = not cluster.initialized
    cluster.start(timeout=timeout)
    if fresh:
        _create_database(cluster)
    origin = Origin(host=cluster.host, port=cluster.port, sslmode="disable")
    return EmbeddedOrigin(cluster), origin


def _create_database(cluster: LocalPostgres) -> None:
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(cluster.url(database="postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
        finally:
            await conn.close()

    asyncio.run(create())

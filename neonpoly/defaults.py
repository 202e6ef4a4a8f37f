"""Defaults and environment variables, in one place.

Every module that needs a default address or an environment variable asks here, so a reader
finds in one file what neonpoly reads from its surroundings. The environment is read when
asked (not at import), so a test or a shell that sets a variable afterwards is honoured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

LOCALHOST = "127.0.0.1"
DEFAULT_PORT = 6543
DEFAULT_LISTEN = (LOCALHOST, DEFAULT_PORT)
DEFAULT_LISTEN_TEXT = f"{LOCALHOST}:{DEFAULT_PORT}"
DEFAULT_MAX_CACHE_BYTES = 1 << 30
DEFAULT_L1_BYTES = 128 << 20
ADMIN_DATABASE = "neonpoly"
ORIGIN_CHECK_TIMEOUT = 5.0  # `integrations add` and the Manage drawer's lists: one login to the origin
REMOVE_CONFIRM_TIMEOUT = 5.0  # `integrations remove` waits this long for a running serve to let go
# As root, where the embedded origin keeps its data when the user PostgreSQL runs as cannot
# reach the state dir (see integrations/embedded_origin.cluster_dir); /var/tmp survives reboots.
ROOT_CLUSTER_BASE = "/var/tmp"
TEXT_WIDTH = 100  # the admin commands' tables fit this many columns unless --wide

ENV_STATE_DIR = "NEONPOLY_STATE_DIR"
ENV_ADMIN_USER = "NEONPOLY_ADMIN_USER"
ENV_ADMIN_PASSWORD = "NEONPOLY_ADMIN_PASSWORD"
ENV_PG_BINDIR = "NEONPOLY_PG_BINDIR"
ENV_NEON_API_KEY = "NEON_API_KEY"
ENV_NEON_API_HOST = "NEON_API_HOST"
# `serve --redis`'s default: the invalidation plane's Redis, which holds a password as often
# as not (kept out of shell history and `ps`).
ENV_REDIS_URL = "NEONPOLY_REDIS_URL"
# Set by `serve --workers N` for each worker it starts (JSON: its index, the count, the Redis
# they share, …); not for people.
ENV_WORKER = "NEONPOLY_WORKER"


@dataclass(frozen=True, slots=True)
class Environment:
    """What neonpoly reads from the environment; empty values count as unset."""

    state_dir: str | None = None
    admin_user: str | None = None
    admin_password: str | None = None
    pg_bindir: str | None = None
    neon_api_key: str | None = None
    neon_api_host: str | None = None
    redis_url: str | None = None
    worker: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        source = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return source.get(name) or None

        return cls(
            state_dir=get(ENV_STATE_DIR),
            admin_user=get(ENV_ADMIN_USER),
            admin_password=get(ENV_ADMIN_PASSWORD),
            pg_bindir=get(ENV_PG_BINDIR),
            neon_api_key=get(ENV_NEON_API_KEY),
            neon_api_host=get(ENV_NEON_API_HOST),
            redis_url=get(ENV_REDIS_URL),
            worker=get(ENV_WORKER),
        )


def environment() -> Environment:
    return Environment.read()


def child_environment() -> dict[str, str]:
    """The environment for a PostgreSQL program neonpoly starts: ours without libpq's PG*
    variables, which would point the child at the user's own server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

# The origin's change feed (neonpoly/freshness): `serve --change-feed`, `--change-feed-ddl`,
# `--change-feed-idle`; the catalog check's period when DDL is polled.
DEFAULT_CHANGE_FEED = "auto"
DEFAULT_FEED_DDL = "poll"
DEFAULT_FEED_IDLE = 300.0
DEFAULT_FEED_DDL_POLL = 1.0
# While the feed follows every table a query reads, each commit evicts what it changed: the
# TTL (auto mode) is a safety net, and may be this long.
DEFAULT_FEED_TTL = 3600.0
FEED_APPLICATION_NAME = "neonpoly change feed"

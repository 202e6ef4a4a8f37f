"""The origin neonpoly starts itself when nothing else is configured."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from neonpoly.defaults import ROOT_CLUSTER_BASE
from neonpoly.integrations.embedded import LocalPostgres, SettingValue, unreachable_parent
from neonpoly.integrations.pgbin import PostgresError, RunAs, run_as
from neonpoly.proxy.origin import Origin

log = logging.getLogger("neonpoly.embedded")

EMBEDDED_USER = "neon"
EMBEDDED_DATABASE = "neondb"
EMBEDDED_DIR = "embedded"  # in the state dir: the cluster's data, or a symlink to it


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

    @property
    def adopted(self) -> bool:
        """The cluster was already running (started by a serve, or left by one) when found."""
        return self.cluster.adopted

    @property
    def pid(self) -> int | None:
        return self.cluster.pid

    def stop(self) -> None:
        self.cluster.stop()


def cluster_dir(root: Path, shared_base: Path | None = None) -> Path:
    """Where the embedded cluster of the state dir `root` keeps its data.

    Normally `<state dir>/embedded`. Run as root, PostgreSQL runs as another user (initdb and
    postgres refuse root), who must be able to reach its data. When that user cannot reach the
    state dir (the default one sits under root's home, mode 0700), neonpoly does not open up
    anyone's directories: the data goes to a directory of that user's own,
    `/var/tmp/neonpoly-<user>/<digest of the state dir's path>` (created mode 0700 and owned by
    that user; /var/tmp survives reboots, unlike /tmp), and `<state dir>/embedded` becomes a
    symlink to it, so the state dir still says where its cluster is.
    """
    link = root / EMBEDDED_DIR
    user = run_as()
    if user is None:
        return link  # PostgreSQL runs as us: the state dir is ours
    if link.is_symlink():
        target = Path(os.readlink(link))
        _private_dir(target.parent, user)  # made again if /var/tmp was cleaned
        return target
    if link.exists() or unreachable_parent(link, user) is None:
        return link  # reachable; or a cluster made earlier, which stays (LocalPostgres explains)
    own = Path(shared_base or ROOT_CLUSTER_BASE) / f"neonpoly-{user.name}"
    blocker = unreachable_parent(own, user)
    if blocker is not None:
        raise PostgresError(
            f"PostgreSQL runs as {user.name!r} (it refuses root), which can reach neither {link} nor "
            f"{own} ({blocker} is not searchable for it); use --state-dir somewhere {user.name} can reach"
        )
    _private_dir(own, user)
    target = own / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    link.symlink_to(target)
    log.warning(
        "the embedded PostgreSQL runs as %s, which cannot reach %s: its data goes to %s (linked from %s); "
        "no permissions were changed",
        user.name, root, target, link,
    )  # fmt: skip
    return target


def _private_dir(path: Path, user: RunAs) -> None:
    """A directory only `user` may enter (mode 0700, owned by it): made so, or checked."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        os.chown(path, user.uid, user.gid)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != user.uid or st.st_mode & 0o077:
        raise PostgresError(
            f"{path} is not a directory of {user.name} with mode 0700 (made by someone else?); "
            "remove it, or use --state-dir somewhere that user can reach"
        )


# wal_level=logical so the change feed (on by default, `--change-feed auto`) sees writes made
# around neonpoly too (psql on the embedded socket, a migration tool). It costs a little more
# WAL per write and nothing else: the feed's slots are temporary, so no WAL is retained once
# it disconnects. A cluster made before this setting picks it up on its next start.
EMBEDDED_SETTINGS: dict[str, SettingValue] = {
    "max_connections": 200,
    "wal_level": "logical",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
}


def start_embedded_origin(
    root: Path, timeout: float = 60, *, shared_base: Path | None = None
) -> tuple[EmbeddedOrigin, Origin]:
    """Start (initialising on first use) the embedded cluster of the state dir `root` (its data
    where `cluster_dir` says)."""
    # Not die_with_parent: Linux ties that to the starting *thread*, and we start it from a
    # worker thread; `serve` stops the cluster itself on shutdown.
    data = cluster_dir(root, shared_base)
    cluster = LocalPostgres(data, superuser=EMBEDDED_USER, settings=EMBEDDED_SETTINGS)
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

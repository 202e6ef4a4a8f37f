"""Run as root, the embedded origin never changes a permission outside the state dir: its
data goes where the user PostgreSQL runs as can reach it (issue 12, point 10)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from neonpoly.integrations.embedded import LocalPostgres, PostgresError
from neonpoly.integrations.embedded_origin import cluster_dir, start_embedded_origin
from neonpoly.integrations.pgbin import run_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="as another user, PostgreSQL runs as that user")


def _modes(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """Mode and owner of each path and of every directory above it."""
    seen: dict[Path, tuple[int, int]] = {}
    for path in paths:
        for p in [path, *path.parents]:
            if p.exists():
                st = p.stat()
                seen[p] = (stat.S_IMODE(st.st_mode), st.st_uid)
    return seen


@pytest.fixture
def private_base() -> Iterator[Path]:
    """A 0700 directory of root's, like /root: the server user cannot pass it."""
    base = Path(tempfile.mkdtemp(prefix="neonpoly-test-private-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """Stands in for /var/tmp: searchable by everyone, removed after the test."""
    base = Path(tempfile.mkdtemp(prefix="neonpoly-test-shared-"))
    os.chmod(base, 0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_local_postgres_refuses_an_unreachable_data_dir_and_changes_nothing(private_base: Path) -> None:
    data = private_base / "deeper" / "data"
    data.parent.mkdir(mode=0o755)
    before = _modes([data.parent])
    with pytest.raises(PostgresError) as info:
        LocalPostgres(data).start(timeout=10)
    message = str(info.value)
    assert f"chmod o+x {private_base}" in message and "\n" not in message, message
    assert _modes([data.parent]) == before
    assert not data.exists()


def test_embedded_origin_keeps_its_data_where_the_server_user_can_reach_it(
    private_base: Path, shared_base: Path
) -> None:
    user = run_as()
    assert user is not None
    state = private_base / "state"
    state.mkdir()
    before = _modes([state, shared_base])

    handle, origin = start_embedded_origin(state, shared_base=shared_base)
    try:
        data = handle.cluster.data_dir
        own = shared_base / f"neonpoly-{user.name}"
        assert data.parent == own, data
        st = own.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, user.uid)
        assert (state / "embedded").is_symlink() and (state / "embedded").resolve() == data
        password = handle.password

        async def query() -> object:
            conn = await asyncpg.connect(
                host=origin.host, port=origin.port, user="neon", password=password, database="neondb"
            )
            try:
                return await conn.fetchval("SELECT current_user")
            finally:
                await conn.close()

        assert asyncio.run(query()) == "neon"
    finally:
        handle.stop()
    # Nothing that existed before changed mode or owner: not the 0700 parent, not the base.
    assert {p: m for p, m in _modes([state, shared_base]).items() if p in before} == before

    # The next start finds the same cluster through the state dir's link.
    assert cluster_dir(state, shared_base) == data
    again, _ = start_embedded_origin(state, shared_base=shared_base)
    try:
        assert again.cluster.data_dir == data and again.password == password
    finally:
        again.stop()


def test_a_reachable_state_dir_keeps_the_data_inside(shared_base: Path) -> None:
    state = shared_base / "state"
    state.mkdir()
    assert cluster_dir(state, shared_base) == state / "embedded"
    assert not (state / "embedded").exists()


def test_a_foreign_directory_in_the_shared_place_is_refused(private_base: Path, shared_base: Path) -> None:
    user = run_as()
    assert user is not None
    (shared_base / f"neonpoly-{user.name}").mkdir(mode=0o755)  # root's, open: not the server user's own
    state = private_base / "state"
    state.mkdir()
    with pytest.raises(PostgresError, match="not a directory of"):
        cluster_dir(state, shared_base)

"""The Add flow for a Neon origin: discover the project's primary branch through the API,
fetch the passwords the Manage drawer may need, and record the integration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from neonpoly.integrations.discovery import discover
from neonpoly.integrations.neon_api import NeonAPI, NeonAPIError, RetryPolicy
from neonpoly.integrations.store import DEFAULT_WORKSPACE, Integration, IntegrationStore, record_neon


def _noop(step: str) -> None:
    return None


async def add_neon(
    store: IntegrationStore,
    *,
    api_key: str | None = None,
    api_host: str | None = None,
    project_id: str | None = None,
    branch: str | None = None,
    endpoint: str | None = None,
    database: str | None = None,
    role: str | None = None,
    password: str | None = None,
    workspace: str = DEFAULT_WORKSPACE,
    name: str | None = None,
    connect_to: str | None = None,
    retry: RetryPolicy | None = None,
    progress: Callable[[str], None] = _noop,
) -> Integration:
    """Discovery (project → primary branch → read_write endpoint → db/role → password), then
    record the integration. Raises DiscoveryError / NeonAPIError with user-facing text."""
    async with NeonAPI(api_key, base_url=api_host, retry=retry) as api:
        found = await discover(api, project_id, branch, endpoint, database, role, password,
                               progress)
        others: dict[str, str] = {}
        if password is None:
            # The Manage drawer's Role drop-down changes the string: fetch the other roles'
            # passwords now (best effort) so a revealed string works for any of them.
            async def reveal(name: str) -> tuple[str, str | None]:
                try:
                    return name, await api.reveal_password(found.project.id, found.branch.id, name)
                except NeonAPIError:
                    return name, None

            pairs = await asyncio.gather(*(reveal(r) for r in found.roles if r != found.role))
            others = {n: pw for n, pw in pairs if pw}
    progress("Creating cache")
    return record_neon(store, found, workspace=workspace, name=name, connect_to=connect_to,
                       extra_passwords=others)

"""The Neon API client against the loopback stand-in: shapes, paging, errors, retries."""

from __future__ import annotations

import socket

import pytest

from neonpoly import __version__
from neonpoly._testing.neon_standin import NeonStandin, demo_project
from neonpoly.integrations.neon_api import (
    DEFAULT_BASE_URL,
    NeonAPI,
    NeonAPIError,
    RetryPolicy,
    parse_retry_after,
    resolve_base_url,
)
from tests.neon.conftest import FAST_RETRY, RecordingSleep, make_api


async def test_sends_auth_accept_and_user_agent(api: NeonAPI, standin: NeonStandin) -> None:
    await api.list_projects()
    headers = {k.lower(): v for k, v in standin.last_headers.items()}
    assert headers["authorization"] == f"Bearer {standin.api_key}"
    assert headers["accept"] == "application/json"
    assert headers["user-agent"] == f"neonpoly/{__version__}"


async def test_models_parse_the_real_shapes(api: NeonAPI, standin: NeonStandin) -> None:
    seeded = standin.projects[0]
    [project] = await api.list_projects()
    assert project.id == seeded.id
    assert project.region_id == "aws-us-east-2"
    assert project.pg_version == 16 and project.store_passwords
    assert project == await api.get_project(seeded.id)

    branches = await api.list_branches(seeded.id)
    [main] = [b for b in branches if b.default]
    assert main.name == "main" and main.id.startswith("br-") and main.current_state == "ready"
    endpoints = await api.list_endpoints(seeded.id, main.id)
    assert {e.type for e in endpoints} == {"read_write", "read_only"}
    for endpoint in endpoints:
        assert endpoint.id.startswith("ep-")
        assert endpoint.host == f"{endpoint.id}.us-east-2.aws.neon.tech"
        assert endpoint.branch_id == main.id

    databases = await api.list_databases(seeded.id, main.id)
    assert [(d.name, d.owner_name) for d in databases] == [
        ("neondb", "neondb_owner"),
        ("analytics", "app user"),
    ]
    roles = await api.list_roles(seeded.id, main.id)
    assert [r.name for r in roles] == ["neondb_owner", "app user"]
    assert await api.reveal_password(seeded.id, main.id, "app user") == "p@ss:w/rd %1"


async def test_connection_uri_plain_and_pooled(api: NeonAPI, standin: NeonStandin) -> None:
    seeded = standin.projects[0]
    rw = next(e for e in seeded.default_branch.endpoints if e.type == "read_write")
    uri = await api.connection_uri(seeded.id, "neondb", "neondb_owner")
    assert uri == (
        f"postgresql://neondb_owner:npg_Owner1pw@{rw.host}/neondb"
        "?sslmode=require&channel_binding=require"
    )
    pooled = await api.connection_uri(seeded.id, "neondb", "neondb_owner", pooled=True)
    assert f"@{rw.id}-pooler.us-east-2.aws.neon.tech/" in pooled


async def test_project_listing_spans_pages(sleeps: RecordingSleep) -> None:
    projects = [demo_project(f"project-{n}") for n in range(5)]
    async with NeonStandin(projects) as server, make_api(server, sleeps, page_limit=2) as api:
        listed = await api.list_projects()
        assert [p.name for p in listed] == [f"project-{n}" for n in range(5)]
        # 2 + 2 + 1: the short third page ends it although it still carries a cursor.
        assert server.count("projects") == 3


async def test_project_listing_ends_on_an_empty_page(sleeps: RecordingSleep) -> None:
    projects = [demo_project(f"project-{n}") for n in range(4)]
    async with NeonStandin(projects) as server, make_api(server, sleeps, page_limit=2) as api:
        assert len(await api.list_projects()) == 4
        assert server.count("projects") == 3


async def test_branch_listing_spans_pages(sleeps: RecordingSleep) -> None:
    async with (
        NeonStandin([demo_project(extra_branches=5)]) as server,
        make_api(server, sleeps, page_limit=3) as api,
    ):
        branches = await api.list_branches(server.projects[0].id)
        assert [b.name for b in branches] == ["dev", "main"] + [f"feature-{n}" for n in range(1, 6)]
        assert len({b.id for b in branches}) == 7
        assert server.count("branches") == 3


async def test_rejected_key_is_one_clear_line(standin: NeonStandin, sleeps: RecordingSleep) -> None:
    async with make_api(standin, sleeps, api_key="napi_wrong") as api:
        with pytest.raises(NeonAPIError) as caught:
            await api.list_projects()
    error = caught.value
    assert error.status == 401
    line = str(error)
    assert "\n" not in line
    assert "NEON_API_KEY" in line and "401" in line
    assert standin.count("projects") == 1, "a rejected key is an answer, not a hiccup"


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEON_API_KEY", raising=False)
    with pytest.raises(NeonAPIError, match="NEON_API_KEY"):
        NeonAPI()


async def test_base_url_from_env_and_explicit_wins(
    standin: NeonStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NEON_API_HOST", raising=False)
    assert resolve_base_url() == DEFAULT_BASE_URL
    monkeypatch.setenv("NEON_API_HOST", standin.base_url)
    monkeypatch.setenv("NEON_API_KEY", standin.api_key)
    async with NeonAPI() as api:
        assert api.base_url == standin.base_url
        assert len(await api.list_projects()) == 1
    assert resolve_base_url("https://example.invalid/api/v2/") == "https://example.invalid/api/v2"


async def test_429_with_retry_after_is_honoured(
    api: NeonAPI, standin: NeonStandin, sleeps: RecordingSleep
) -> None:
    standin.fail("branches", 429, retry_after=2)
    branches = await api.list_branches(standin.projects[0].id)
    assert len(branches) == 2
    assert standin.count("branches") == 2
    assert sleeps.delays == [2.0]


async def test_503_and_423_are_retried_with_backoff(
    api: NeonAPI, standin: NeonStandin, sleeps: RecordingSleep
) -> None:
    standin.fail("branches", 503, times=2)
    standin.fail("project", 423)
    project_id = standin.projects[0].id
    assert len(await api.list_branches(project_id)) == 2
    assert (await api.get_project(project_id)).id == project_id
    assert standin.count("branches") == 3
    assert standin.count("project") == 2
    assert len(sleeps.delays) == 3
    assert all(0 < d <= FAST_RETRY.max_delay for d in sleeps.delays)


async def test_exhausted_retries_show_the_request_id(
    api: NeonAPI, standin: NeonStandin, sleeps: RecordingSleep
) -> None:
    standin.fail("project", 503, times=10)
    with pytest.raises(NeonAPIError) as caught:
        await api.get_project(standin.projects[0].id)
    error = caught.value
    assert error.status == 503 and error.attempts == FAST_RETRY.attempts
    assert standin.count("project") == FAST_RETRY.attempts
    assert error.request_id == standin.request_ids[-1]
    line = str(error)
    assert "\n" not in line
    assert error.request_id in line and "gave up after 4 attempts" in line


async def test_not_found_is_not_retried(api: NeonAPI, standin: NeonStandin) -> None:
    with pytest.raises(NeonAPIError) as caught:
        await api.get_project("no-such-project-123")
    assert caught.value.status == 404
    assert standin.count("project") == 1


async def test_html_error_page_still_gives_a_clean_error(
    api: NeonAPI, standin: NeonStandin
) -> None:
    standin.fail("project", 524)
    with pytest.raises(NeonAPIError) as caught:
        await api.get_project(standin.projects[0].id)
    assert caught.value.status == 524
    assert "<" not in str(caught.value)
    assert caught.value.request_id == standin.request_ids[-1]


async def test_overlong_retry_after_fails_fast(
    api: NeonAPI, standin: NeonStandin, sleeps: RecordingSleep
) -> None:
    standin.fail("projects", 429, retry_after=3600)
    with pytest.raises(NeonAPIError) as caught:
        await api.list_projects()
    assert caught.value.status == 429
    assert sleeps.delays == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_network_errors_are_retried_until_the_api_answers(
    sleeps: RecordingSleep,
) -> None:
    port = _free_port()
    server = NeonStandin(port=port)
    started: list[bool] = []

    async def start_server_on_first_retry(seconds: float) -> None:
        await sleeps(seconds)
        if not started:
            await server.start()
            started.append(True)

    try:
        api = NeonAPI(
            server.api_key,
            base_url=f"http://127.0.0.1:{port}/api/v2",
            sleep=start_server_on_first_retry,
            retry=FAST_RETRY,
        )
        async with api:
            assert len(await api.list_projects()) == 1
        assert len(sleeps.delays) == 1
    finally:
        await server.close()


async def test_unreachable_api_gives_up_with_a_clear_error(sleeps: RecordingSleep) -> None:
    port = _free_port()
    retry = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002)
    api = NeonAPI("key", base_url=f"http://127.0.0.1:{port}/api/v2", sleep=sleeps, retry=retry)
    async with api:
        with pytest.raises(NeonAPIError) as caught:
            await api.list_projects()
    assert caught.value.status == 0 and caught.value.attempts == 3
    assert str(caught.value).startswith("Neon API unreachable on GET /projects")
    assert len(sleeps.delays) == 2


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)


def test_standin_runs_on_a_thread_for_sync_code() -> None:
    import httpx

    with NeonStandin() as server:
        response = httpx.get(
            f"{server.base_url}/projects",
            headers={"Authorization": f"Bearer {server.api_key}"},
        )
        assert response.status_code == 200
        assert response.headers["x-neon-ret-request-id"] == server.request_ids[-1]
        body = response.json()
        assert body["pagination"]["cursor"] == body["projects"][0]["id"]
        assert server.count("projects") == 1

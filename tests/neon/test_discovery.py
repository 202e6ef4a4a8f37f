"""Discovery against the loopback stand-in, and the connect-to rule parser."""

from __future__ import annotations

import pytest

from neonpoly._testing.neon_standin import NeonStandin, SeedEndpoint, demo_project
from neonpoly.integrations.discovery import (
    ConnectTo,
    DiscoveryError,
    PasswordUnavailable,
    ProjectChoiceRequired,
    build_origin_url,
    discover,
    parse_connect_to,
)
from neonpoly.integrations.neon_api import NeonAPI
from tests.neon.conftest import RecordingSleep, make_api


def _endpoint(server: NeonStandin, branch: str, kind: str) -> SeedEndpoint:
    seeded = next(b for b in server.projects[0].branches if b.name == branch)
    return next(e for e in seeded.endpoints if e.type == kind)


async def test_picks_the_primary_branch_read_write_endpoint(
    api: NeonAPI, standin: NeonStandin
) -> None:
    # The stand-in lists `dev` before `main` and the read_only endpoint before the read_write
    # one, so taking "the first" of either would be caught here.
    steps: list[str] = []
    origin = await discover(api, progress=steps.append)
    rw = _endpoint(standin, "main", "read_write")
    seeded = standin.projects[0]
    assert origin.project.id == seeded.id and origin.project.name == "neonpoly-demo"
    assert origin.project.region == "aws-us-east-2"
    assert origin.branch.name == "main" and origin.branch.id == seeded.default_branch.id
    assert (origin.endpoint.id, origin.endpoint.type, origin.endpoint.state) == (
        rw.id, "read_write", "idle",
    )
    assert origin.databases == ("neondb", "analytics")
    assert origin.roles == ("neondb_owner", "app user")
    assert (origin.database, origin.role, origin.password) == (
        "neondb", "neondb_owner", "npg_Owner1pw",
    )
    assert origin.origin_url == (
        f"postgresql://neondb_owner:npg_Owner1pw@{rw.host}:5432/neondb?sslmode=require"
    )
    assert steps == [
        "Finding project",
        "Primary branch main",
        f"Endpoint {rw.id} (idle)",
        "Databases and roles",
        "Reading role password",
    ]
    assert "npg_Owner1pw" not in repr(origin)


async def test_origin_url_encodes_role_password_and_database(api: NeonAPI) -> None:
    origin = await discover(api, database="analytics", role="app user")
    assert origin.password == "p@ss:w/rd %1"
    assert origin.origin_url.startswith("postgresql://app%20user:p%40ss%3Aw%2Frd%20%251@ep-")
    assert origin.origin_url.endswith(":5432/analytics?sslmode=require")


async def test_default_role_is_the_database_owner(api: NeonAPI) -> None:
    origin = await discover(api, database="analytics")
    assert origin.role == "app user"


async def test_several_projects_need_a_choice(sleeps: RecordingSleep) -> None:
    projects = [demo_project("shop"), demo_project("blog")]
    async with NeonStandin(projects) as server, make_api(server, sleeps) as api:
        with pytest.raises(ProjectChoiceRequired) as caught:
            await discover(api)
        message = str(caught.value)
        assert "--project" in message
        for seeded in server.projects:
            assert f"{seeded.id} ({seeded.name})" in message
        origin = await discover(api, project_id=server.project("blog").id)
        assert origin.project.name == "blog"


async def test_no_projects_is_a_clear_error(sleeps: RecordingSleep) -> None:
    async with NeonStandin([]) as server, make_api(server, sleeps) as api:
        with pytest.raises(DiscoveryError, match="no projects"):
            await discover(api)


async def test_unstored_password_asks_for_the_flag(sleeps: RecordingSleep) -> None:
    async with (
        NeonStandin([demo_project(store_passwords=False)]) as server,
        make_api(server, sleeps) as api,
    ):
        with pytest.raises(PasswordUnavailable) as caught:
            await discover(api)
        assert "--password" in str(caught.value)
        assert caught.value.role == "neondb_owner"
        assert server.count("reveal_password") == 1

        origin = await discover(api, password="given pw")
        assert origin.password == "given pw"
        assert "given%20pw@" in origin.origin_url
        assert server.count("reveal_password") == 1, "a given password is not fetched"


async def test_manual_setup_for_another_branch(api: NeonAPI, standin: NeonStandin) -> None:
    steps: list[str] = []
    origin = await discover(api, branch="dev", progress=steps.append)
    dev_rw = _endpoint(standin, "dev", "read_write")
    assert origin.branch.name == "dev"
    assert origin.endpoint.id == dev_rw.id
    assert steps[1] == "Branch dev"
    assert origin.password == "npg_DevOwnerpw"


async def test_manual_setup_for_a_read_only_endpoint(api: NeonAPI, standin: NeonStandin) -> None:
    ro = _endpoint(standin, "main", "read_only")
    origin = await discover(api, endpoint=ro.id)
    assert (origin.branch.name, origin.endpoint.type) == ("main", "read_only")
    assert origin.endpoint.host == ro.host
    by_host = await discover(api, branch="main", endpoint=ro.host)
    assert by_host.endpoint.id == ro.id


async def test_an_endpoint_alone_decides_the_branch(api: NeonAPI, standin: NeonStandin) -> None:
    dev_rw = _endpoint(standin, "dev", "read_write")
    origin = await discover(api, endpoint=dev_rw.id)
    assert origin.branch.name == "dev"


async def test_unknown_names_list_what_exists(api: NeonAPI) -> None:
    with pytest.raises(DiscoveryError, match="databases: neondb, analytics"):
        await discover(api, database="nope")
    with pytest.raises(DiscoveryError, match="roles: neondb_owner, app user"):
        await discover(api, role="nope")
    with pytest.raises(DiscoveryError, match="no branch 'nope'"):
        await discover(api, branch="nope")
    with pytest.raises(DiscoveryError, match="no endpoint 'ep-nope'"):
        await discover(api, endpoint="ep-nope")


async def test_discovery_rides_out_transient_faults(
    api: NeonAPI, standin: NeonStandin, sleeps: RecordingSleep
) -> None:
    standin.fail("branches", 503, times=2)
    standin.fail("reveal_password", 429, retry_after=1)
    origin = await discover(api)
    assert origin.branch.name == "main"
    assert standin.count("branches") == 3
    assert 1.0 in sleeps.delays


def test_build_origin_url_with_port() -> None:
    url = build_origin_url("localhost", "u", "p", "d", port=6432)
    assert url == "postgresql://u:p@localhost:6432/d?sslmode=require"


def test_parse_connect_to() -> None:
    rule = parse_connect_to("ep-x.us-east-2.aws.neon.tech:5432:127.0.0.1:15432")
    assert rule == ConnectTo("ep-x.us-east-2.aws.neon.tech", 5432, "127.0.0.1", 15432)
    assert rule.target("EP-X.us-east-2.aws.neon.tech", 5432) == ("127.0.0.1", 15432)
    assert rule.target("other", 5432) == ("other", 5432)

    any_host = parse_connect_to("::localhost:")
    assert any_host == ConnectTo(None, None, "localhost", None)
    assert any_host.target("ep-y.neon.tech", 5432) == ("localhost", 5432)

    v6 = parse_connect_to("[::1]:5432:[fe80::1]:6000")
    assert v6 == ConnectTo("::1", 5432, "fe80::1", 6000)


@pytest.mark.parametrize("spec", ["a:1:b", "a:1:b:2:3", "a:port:b:2", "a:1:b:70000"])
def test_parse_connect_to_rejects_bad_rules(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_connect_to(spec)

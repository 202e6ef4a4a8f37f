"""DDL through neonpoly in one session changes who *other* sessions are: a schema named after
their role on `"$user"`, USAGE granted or revoked on it. Their next answer must be the one the
server gives now."""

from __future__ import annotations

from tests.adversarial.harness import Env, unique


async def _setup(env: Env) -> tuple[str, str]:
    role = await env.role("adv_ep")
    name = unique("adv_ept")
    await env.admin(
        f"CREATE TABLE public.{name} (v text)",
        f"INSERT INTO public.{name} VALUES ('public')",
        f"GRANT SELECT ON public.{name} TO PUBLIC",
        f"CREATE SCHEMA {role}",  # owned by postgres: no USAGE for the role yet
        f"CREATE TABLE {role}.{name} (v text)",
        f"INSERT INTO {role}.{name} VALUES ('own')",
        f"GRANT SELECT ON {role}.{name} TO {role}",
    )
    env.on_cleanup(f"DROP SCHEMA IF EXISTS {role} CASCADE", f"DROP TABLE IF EXISTS public.{name}")
    return role, name


async def test_grant_usage_on_user_schema_through_other_session(env: Env) -> None:
    role, name = await _setup(env)
    reader = await env.twin(env.login(role))
    read = f"SELECT v FROM {name}"
    rows, _ = await reader.probe(read)
    assert rows == [("public",)]
    admin = await env.client()
    await admin.run(f"GRANT USAGE ON SCHEMA {role} TO {role}")
    for _ in range(3):
        await reader.check(read, why="after GRANT USAGE on the role's own schema through neonpoly")
    await admin.run(f"REVOKE USAGE ON SCHEMA {role} FROM {role}")
    for _ in range(3):
        await reader.check(read, why="after REVOKE USAGE through neonpoly")


async def test_alter_role_set_then_reset_through_other_session(env: Env) -> None:
    role, name = await _setup(env)
    await env.admin(f"GRANT USAGE ON SCHEMA {role} TO {role}")
    admin = await env.client()
    await admin.run(f"ALTER ROLE {role} SET search_path = public")
    reader = await env.twin(env.login(role))
    read = f"SELECT v FROM {name}"
    rows, _ = await reader.probe(read)
    assert rows == [("public",)]
    # Role defaults apply at login only: the live session keeps its path.
    await admin.run(f"ALTER ROLE {role} RESET search_path")
    for _ in range(3):
        await reader.check(read, why="after ALTER ROLE RESET (applies to new sessions only)")
    fresh = await env.twin(env.login(role))
    for _ in range(3):
        await fresh.check(read, why="a new session after ALTER ROLE RESET")


async def test_custom_setting_first_read_in_other_session(env: Env) -> None:
    key = f"adv.{unique('k')}"
    plain = await env.twin()
    read = f"SELECT current_setting('{key}', true)"
    await plain.probe(read, require_hit=False)
    setter = await env.twin()
    await setter.both(f"SET {key} = 'x'")
    for _ in range(4):
        await setter.check(read, why="session with the custom setting")
        await plain.check(read, why="session without the custom setting")

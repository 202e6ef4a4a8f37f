"""Hostile review of privileges that change under cached answers, through neonpoly: a role
granted to a session's user while the session is open (then SET ROLE to it), a column's
SELECT revoked from the reader's role, and a row-level-security policy that follows role
membership (`pg_has_role`). Every answer must be the one the server gives now: rows, or the
same error (never the rows of before).
"""

from __future__ import annotations

from tests.adversarial.harness import Env, Twin, unique


async def _answer(twin: Twin, sql: str, *, via: bool) -> object:
    """The rows, or the error's SQLSTATE-bearing class name: what a client would see."""
    client = twin.via if via else twin.direct
    try:
        return await client.rows(sql)
    except Exception as error:
        return type(error).__name__


async def _same(twin: Twin, sql: str, why: str) -> object:
    got, want = await _answer(twin, sql, via=True), await _answer(twin, sql, via=False)
    assert got == want, f"{why}: proxy {got!r} != direct {want!r} for {sql!r}"
    return got


async def test_role_granted_while_the_session_is_open_then_set_role(env: Env) -> None:
    user = await env.role("adv_u")
    boss = unique("adv_boss")
    await env.admin(f"CREATE ROLE {boss} NOLOGIN")
    env.on_cleanup(f"DROP OWNED BY {boss} CASCADE", f"DROP ROLE IF EXISTS {boss}")
    t = await env.table("adv_priv", "id int PRIMARY KEY, owner name, v text", grant=boss)
    await env.admin(
        f"INSERT INTO {t} VALUES (1, '{user}', 'mine'), (2, '{boss}', 'boss')",
        f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY p ON {t} USING (pg_has_role(current_user, owner, 'member'))",
        f"GRANT SELECT ON {t} TO {user}",
    )
    twin = await env.twin(env.login(user))
    read = f"SELECT id, v FROM {t} ORDER BY id"
    rows, _ = await twin.probe(read)
    assert rows == [(1, "mine")]
    admin = await env.client()
    await admin.run(f"GRANT {boss} TO {user}")
    granted = await _same(twin, read, "after GRANT of a role (member now: the policy lets its rows in)")
    assert granted == [(1, "mine"), (2, "boss")]
    for sql in (f"SET ROLE {boss}", read, "RESET ROLE", read):
        await _same(twin, sql, f"{sql} after the GRANT")
    await admin.run(f"REVOKE {boss} FROM {user}")
    revoked = await _same(twin, read, "after REVOKE of the role")
    assert revoked == [(1, "mine")]
    await _same(twin, f"SET ROLE {boss}", "SET ROLE to a role no longer granted")


async def test_column_privilege_revoked_from_the_reader(env: Env) -> None:
    user = await env.role("adv_u")
    t = await env.table("adv_cols", "id int PRIMARY KEY, secret text", "(1, 's')", grant="postgres")
    await env.admin(f"GRANT SELECT (id, secret) ON {t} TO {user}")
    twin = await env.twin(env.login(user))
    reads = [f"SELECT secret FROM {t} WHERE id = 1", f"SELECT has_column_privilege('{t}', 'secret', 'SELECT')"]
    for sql in reads:
        await twin.probe(sql)
    admin = await env.client()
    await admin.run(f"REVOKE SELECT (secret) ON {t} FROM {user}")
    assert await _same(twin, reads[0], "after REVOKE of the column") != [("s",)]
    assert await _same(twin, reads[1], "has_column_privilege after the REVOKE") == [(False,)]
    await admin.run(f"GRANT SELECT (secret) ON {t} TO {user}")
    assert await _same(twin, reads[0], "after GRANT of the column again") == [("s",)]

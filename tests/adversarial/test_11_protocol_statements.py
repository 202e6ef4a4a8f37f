"""Class 11: extended-protocol requests whose key misses part of what the server runs, and
neonpoly's own lookups landing in the middle of a client's unfinished batch."""

from __future__ import annotations

import struct

from neonpoly import pgwire
from tests.adversarial import rawpg
from tests.adversarial.harness import Env, hits, unique
from tests.adversarial.rawpg import SYNC, Raw, bind, execute, parse


def _typed_parse(name: str, sql: str, *oids: int) -> bytes:
    body = pgwire.cstr(name) + pgwire.cstr(sql) + struct.pack("!h", len(oids))
    for oid in oids:
        body += struct.pack("!i", oid)
    return pgwire.frame(b"P", body)


def _describe_statement(name: str) -> bytes:
    return pgwire.frame(b"D", b"S" + pgwire.cstr(name))


def _flush() -> bytes:
    return pgwire.frame(b"H")


INT4, TEXT = 23, 25


async def test_named_statements_same_text_different_parameter_types_bind_only(env: Env) -> None:
    """Two named statements, one text, prepared in their own batches with parameter types
    int4 and text (JDBC's setInt vs setString); later batches are Bind/Execute/Sync only,
    with identical parameter bytes. Each must run as the server prepared it."""
    sql = "SELECT pg_typeof($1)::text"
    as_int, as_text = unique("s_int"), unique("s_text")
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(_typed_parse(as_int, sql, INT4), _typed_parse(as_text, sql, TEXT), SYNC)
        await raw.until_ready()
        for _ in range(3):
            raw.send(bind("", as_int, ("1",)), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"integer"]]
        before = hits(env.proxy)
        raw.send(bind("", as_text, ("1",)), execute(), SYNC)
        got = rawpg.rows(await raw.until_ready())
        hit = hits(env.proxy) > before
        assert got == [[b"text"]], f"statement prepared with a text parameter answered {got!r} (hit={hit})"
    finally:
        await raw.close()


async def test_named_statements_same_text_different_parameter_types_values(env: Env) -> None:
    """The same, where the types change the answer: '10' < '9' as text, not as integers."""
    sql = "SELECT ($1 < '9')::text"
    as_int, as_text = unique("s_int"), unique("s_text")
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(_typed_parse(as_int, sql, INT4), _typed_parse(as_text, sql, TEXT), SYNC)
        await raw.until_ready()
        for _ in range(3):
            raw.send(bind("", as_int, ("10",)), execute(), SYNC)
            assert rawpg.rows(await raw.until_ready()) == [[b"false"]]
        raw.send(bind("", as_text, ("10",)), execute(), SYNC)
        assert rawpg.rows(await raw.until_ready()) == [[b"true"]], "'10' < '9' compared as text is true"
    finally:
        await raw.close()


async def test_describe_statement_same_text_different_parameter_types(env: Env) -> None:
    """Describe (statement) only: ParameterDescription lists the declared types."""
    sql = "SELECT $1 IS NULL"
    as_int, as_text = unique("s_int"), unique("s_text")
    raw = await Raw.connect(env.proxy.port)
    try:
        raw.send(_typed_parse(as_int, sql, INT4), _typed_parse(as_text, sql, TEXT), SYNC)
        await raw.until_ready()
        for _ in range(3):
            raw.send(_describe_statement(as_int), SYNC)
            msgs = await raw.until_ready()
            assert [b for t, b in msgs if t == b"t"] == [struct.pack("!hi", 1, INT4)]
        raw.send(_describe_statement(as_text), SYNC)
        msgs = await raw.until_ready()
        got = [b for t, b in msgs if t == b"t"]
        assert got == [struct.pack("!hi", 1, TEXT)], f"ParameterDescription of the text statement: {got!r}"
    finally:
        await raw.close()


async def test_portal_bound_before_flush_survives_until_execute(env: Env) -> None:
    """Parse/Bind/Describe(portal)/Flush, then Execute/Sync (pg-cursor's shape). The statement
    changes a setting, so neonpoly wants to learn the session again; it must not do so
    between the client's Flush and its Sync (its own Sync would end the portal)."""
    frames = (parse("", "SELECT set_config('search_path', 'public', false)"), bind("", ""),
              rawpg.describe_portal(""), _flush())
    for port, who in ((env.pg.port, "origin"), (env.proxy.port, "proxy")):
        raw = await Raw.connect(port)
        try:
            raw.send(*frames)
            answers = [await raw.message() for _ in range(3)]
            assert rawpg.kinds(answers) == b"12T", f"{who}: {answers!r}"
            raw.send(execute(), SYNC)
            msgs = await raw.until_ready()
            assert rawpg.kinds(msgs) == b"DCZ", f"{who}: Execute of the portal bound before Flush got {msgs!r}"
        finally:
            await raw.close()


async def test_portal_bound_before_flush_plain_read(env: Env) -> None:
    """The same with a plain read of a table neonpoly has not looked up yet, run twice."""
    table = await env.table("adv_p", "id int, v text", "(1, 'one')", "(2, 'two')")
    frames = (parse("", f"SELECT v FROM {table} ORDER BY id"), bind("", ""), rawpg.describe_portal(""), _flush())
    raw = await Raw.connect(env.proxy.port)
    try:
        for n in range(3):
            raw.send(*frames)
            answers = [await raw.message() for _ in range(3)]
            assert rawpg.kinds(answers) == b"12T", f"run {n + 1}: {answers!r}"
            raw.send(execute("", 1), execute("", 1), SYNC)
            msgs = await raw.until_ready()
            assert rawpg.rows(msgs) == [[b"one"], [b"two"]], f"run {n + 1}: {msgs!r}"
    finally:
        await raw.close()

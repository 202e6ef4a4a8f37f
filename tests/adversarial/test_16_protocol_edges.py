"""Class 16: protocol edges of the new mechanisms: neonpoly's own statement names in the
client's namespace, batches split across TCP writes while the identity is being learned,
odd statement names deallocated by SQL and parsed again."""

from __future__ import annotations

from tests.adversarial import rawpg
from tests.adversarial.harness import Env, hits, unique
from tests.adversarial.rawpg import Message, Raw

Answer = tuple[bytes, list[list[bytes | None]], list[bytes]]


def summary(msgs: list[Message]) -> Answer:
    """Message kinds, data rows and error codes (no text holding ids or times)."""
    codes = [f for t, body in msgs if t == b"E" for f in body.split(b"\x00") if f[:1] == b"C"]
    return rawpg.kinds(msgs), rawpg.rows(msgs), codes


async def both_raw(env: Env) -> tuple[Raw, Raw]:
    via = await Raw.connect(env.proxy.port)
    direct = await Raw.connect(env.pg.port)
    return via, direct


async def test_client_statement_named_like_the_identity_lookup(env: Env) -> None:
    """A client's prepared statement `neonpoly_session_identity`: neonpoly's own lookup, sent
    into the client's session after a SET, Closes and re-Parses that name."""
    name = "neonpoly_session_identity"
    via, direct = await both_raw(env)
    try:
        answers: list[list[Answer]] = []
        for raw in (via, direct):
            got: list[Answer] = []
            raw.send(rawpg.parse(name, "SELECT 42"), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.query("SET application_name = 'adv_renamed'"))
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.query("SELECT 1"))  # after the identity was learned again
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.bind("", name), rawpg.execute(), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            answers.append(got)
    finally:
        await via.close()
        await direct.close()
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"


async def test_client_statement_named_like_the_relation_lookup(env: Env) -> None:
    name = "neonpoly_relation_lookup"
    table = await env.table("adv_rl", "v int", "(7)")
    via, direct = await both_raw(env)
    try:
        answers: list[list[Answer]] = []
        for raw in (via, direct):
            got: list[Answer] = []
            raw.send(rawpg.parse(name, "SELECT 42"), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.query(f"SELECT v FROM {table}"))  # a relation never looked up
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.query("SELECT 1"))
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.bind("", name), rawpg.execute(), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            answers.append(got)
    finally:
        await via.close()
        await direct.close()
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"


async def test_batch_split_across_writes_while_identity_is_learned(env: Env) -> None:
    """Right after login (the identity lookup in flight), half a batch, a drained socket, the
    rest; four times, so later runs may be hits. Every answer equals the direct one."""
    table = await env.table("adv_split", "v int", "(1)", "(2)")
    sql = f"SELECT sum(v) FROM {table} WHERE v > $1"
    answers: list[list[Answer]] = []
    for port in (env.proxy.port, env.pg.port):
        got: list[Answer] = []
        for run in range(4):
            raw = await Raw.connect(port)
            try:
                raw.send(rawpg.parse(f"s{run}", sql), rawpg.bind("", f"s{run}", ("0",)))
                await raw.writer.drain()
                raw.send(rawpg.execute(), rawpg.SYNC)
                got.append(summary(await raw.until_ready()))
                raw.send(rawpg.parse("", sql), rawpg.bind("", "", ("1",)))
                await raw.writer.drain()
                raw.send(rawpg.describe_portal(), rawpg.execute(), rawpg.SYNC)
                got.append(summary(await raw.until_ready()))
            finally:
                await raw.close()
        answers.append(got)
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"


async def test_odd_statement_name_deallocated_by_sql_then_parsed_again(env: Env) -> None:
    """A statement named with a space, a quote and non-ASCII text, served from cache, then
    DEALLOCATE "…" by a simple query, then Parse of the same name with other SQL."""
    t1 = await env.table("adv_o1", "v int", "(1)")
    t2 = await env.table("adv_o2", "v int", "(2)")
    name = 'odd "name" ünï ' + unique("x")
    quoted = '"' + name.replace('"', '""') + '"'
    answers: list[list[Answer]] = []
    served = 0
    for port in (env.proxy.port, env.pg.port):
        raw = await Raw.connect(port)
        got: list[Answer] = []
        try:
            raw.send(rawpg.parse(name, f"SELECT v FROM {t1}"), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            before = hits(env.proxy)
            for _ in range(4):
                raw.send(rawpg.bind("", name), rawpg.execute(), rawpg.SYNC)
                got.append(summary(await raw.until_ready()))
            if port == env.proxy.port:
                served = hits(env.proxy) - before
            raw.send(rawpg.query(f"DEALLOCATE {quoted}"))
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.parse(name, f"SELECT v FROM {t2}"), rawpg.bind("", name), rawpg.execute(), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            for _ in range(3):
                raw.send(rawpg.bind("", name), rawpg.execute(), rawpg.SYNC)
                got.append(summary(await raw.until_ready()))
        finally:
            await raw.close()
        answers.append(got)
    assert served > 0, "the statement was never served from cache"
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"


async def test_statement_parsed_and_run_in_one_batch_is_served_under_its_confirmed_text(env: Env) -> None:
    """Parse/Bind/Execute/Sync in one go (unconfirmed until the answer): the rows are stored
    under the parsed text once its ParseComplete came, and later Binds of it are hits."""
    table = await env.table("adv_pb", "k int, v text", "(1, 'a')", "(2, 'b')")
    name = unique("s")
    answers: list[list[Answer]] = []
    served = 0
    for port in (env.proxy.port, env.pg.port):
        raw = await Raw.connect(port)
        got: list[Answer] = []
        try:
            raw.send(rawpg.parse(name, f"SELECT v FROM {table} WHERE k = $1"), rawpg.bind("", name, ("1",)),
                     rawpg.execute(), rawpg.SYNC)  # fmt: skip
            got.append(summary(await raw.until_ready()))
            before = hits(env.proxy)
            for _ in range(4):
                raw.send(rawpg.bind("", name, ("1",)), rawpg.execute(), rawpg.SYNC)
                got.append(summary(await raw.until_ready()))
            if port == env.proxy.port:
                served = hits(env.proxy) - before
        finally:
            await raw.close()
        answers.append(got)
    assert served > 0, "the statement was never served from cache"
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"


async def test_pipelined_binds_behind_a_refused_parse_get_the_origins_statement(env: Env) -> None:
    """A name PREPAREd in SQL, then Parse of it with other text (refused: 42P05) pipelined
    with Binds of it, all sent before any answer: every Bind runs the SQL statement, and the
    Parse's text is never believed, so no later Bind is answered with the refused text's rows."""
    table = await env.table("adv_pp", "k int, v text", "(1, 'a')", "(2, 'b')")
    name = unique("s")
    answers: list[list[Answer]] = []
    for port in (env.proxy.port, env.pg.port):
        raw = await Raw.connect(port)
        got: list[Answer] = []
        try:
            raw.send(rawpg.query(f"PREPARE {name}(int) AS SELECT v FROM {table} WHERE k <> $1"))
            got.append(summary(await raw.until_ready()))
            for _ in range(3):
                raw.send(rawpg.parse(name, f"SELECT v FROM {table} WHERE k = $1"), rawpg.SYNC)
                for _ in range(2):
                    raw.send(rawpg.bind("", name, ("1",)), rawpg.execute(), rawpg.SYNC)
                for _ in range(3):
                    got.append(summary(await raw.until_ready()))
        finally:
            await raw.close()
        answers.append(got)
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"


async def test_parse_of_a_name_prepared_in_sql_is_refused_as_the_origin_refuses_it(env: Env) -> None:
    """Parse/Describe of a text is cached by its text, whatever the name: another session
    PREPAREs the name in SQL first, so its Parse must reach the origin (42P05) rather than
    be answered from the cache, and its Binds run the SQL statement."""
    table = await env.table("adv_ps", "k int, v text", "(1, 'a')", "(2, 'b')")
    text = f"SELECT v FROM {table} WHERE k = $1"
    warm = await Raw.connect(env.proxy.port)
    try:
        for run in range(4):
            warm.send(rawpg.parse(f"w{run}", text), rawpg.describe_statement(f"w{run}"), rawpg.SYNC)
            await warm.until_ready()
    finally:
        await warm.close()
    name = unique("s")
    answers: list[list[Answer]] = []
    for port in (env.proxy.port, env.pg.port):
        raw = await Raw.connect(port)
        got: list[Answer] = []
        try:
            raw.send(rawpg.query(f"PREPARE {name}(int) AS SELECT v FROM {table} WHERE k <> $1"))
            got.append(summary(await raw.until_ready()))
            raw.send(rawpg.parse(name, text), rawpg.describe_statement(name), rawpg.SYNC)
            got.append(summary(await raw.until_ready()))
            for _ in range(3):
                raw.send(rawpg.bind("", name, ("1",)), rawpg.execute(), rawpg.SYNC)
                got.append(summary(await raw.until_ready()))
        finally:
            await raw.close()
        answers.append(got)
    assert answers[0] == answers[1], f"proxy {answers[0]!r}\ndirect {answers[1]!r}"

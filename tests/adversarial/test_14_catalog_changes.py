"""Class 14: catalog shapes and changes not tried before: domains in overload resolution,
partitions attached and inheritance added later, views replaced, BYPASSRLS, two integrations
in front of one origin."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from neonpoly.proxy.origin import Origin
from neonpoly.service import CacheSettings, ProxyService, ProxySettings
from tests.adversarial.harness import Client, Env, unique
from tests.adversarial.harness2 import make_known
from tests.pgharness import PgServer


async def test_immutable_function_over_a_domain_picked_for_an_int_column(env: Env) -> None:
    """`initcap(c)` with c int: the builtin initcap(text) does not take an int, but the user's
    IMMUTABLE public.initcap(dom) does (int → a domain over int is an implicit relabel), so
    PostgreSQL calls the user's function. The shadow check skips IMMUTABLE functions over
    types of their own as "never picked for builtin types"; this one is, and it moves the
    session's search_path. The next cached read must follow the new search_path."""
    schema = unique("adv_s")
    dom = unique("adv_dom")
    name = unique("adv_t")
    src = await env.table("adv_src", "c int", "(1)")
    await env.admin(
        f"CREATE SCHEMA {schema}",
        f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
        f"CREATE TABLE public.{name} (v text)",
        f"INSERT INTO public.{name} VALUES ('public')",
        f"CREATE TABLE {schema}.{name} (v text)",
        f"INSERT INTO {schema}.{name} VALUES ('{schema}')",
        f"GRANT SELECT ON public.{name}, {schema}.{name} TO PUBLIC",
        f"CREATE DOMAIN public.{dom} AS int",
        f"CREATE FUNCTION public.initcap({dom}) RETURNS text IMMUTABLE LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_catalog.set_config('search_path', '{schema}, public', false); "
        f"RETURN $1::text; END $$",
    )
    env.on_cleanup(
        f"DROP FUNCTION IF EXISTS public.initcap({dom})",
        f"DROP DOMAIN IF EXISTS public.{dom} CASCADE",
        f"DROP TABLE IF EXISTS public.{name}",
        f"DROP SCHEMA IF EXISTS {schema} CASCADE",
    )
    twin = await env.twin()
    read = f"SELECT v FROM {name}"
    rows, _ = await twin.probe(read)
    assert rows == [("public",)]
    call = f"SELECT initcap(c) FROM {src}"
    got, _ = await twin.through(call)
    assert got == await twin.origin(call) == [("1",)]
    await twin.check(read, why="after initcap(int) ran the user's function, which moved search_path")


async def test_partition_attached_through_neonpoly_then_written(env: Env) -> None:
    parent = unique("adv_p")
    part1 = unique("adv_p1")
    part2 = unique("adv_p2")
    await env.admin(
        f"CREATE TABLE public.{parent} (k int, v int) PARTITION BY RANGE (k)",
        f"CREATE TABLE public.{part1} PARTITION OF public.{parent} FOR VALUES FROM (0) TO (10)",
        f"INSERT INTO public.{parent} VALUES (1, 1)",
        f"CREATE TABLE public.{part2} (k int, v int)",
        f"INSERT INTO public.{part2} VALUES (15, 10)",
        f"GRANT ALL ON public.{parent}, public.{part1}, public.{part2} TO PUBLIC",
    )
    env.on_cleanup(f"DROP TABLE IF EXISTS public.{part2}", f"DROP TABLE IF EXISTS public.{parent} CASCADE")
    twin = await env.twin()
    writer = await env.client()
    read = f"SELECT count(*), sum(v) FROM {parent}"
    await make_known(env, parent, part2)
    await twin.probe(read)
    await writer.run(f"ALTER TABLE public.{parent} ATTACH PARTITION public.{part2} FOR VALUES FROM (10) TO (20)")
    await twin.check(read, why="after ATTACH PARTITION through neonpoly")
    await twin.probe(read)
    await writer.run(f"UPDATE public.{part2} SET v = v + 1")
    await twin.check(read, why="after a write to the attached partition through neonpoly")
    await twin.probe(read)
    await writer.run(f"ALTER TABLE public.{parent} DETACH PARTITION public.{part2}")
    await twin.check(read, why="after DETACH PARTITION through neonpoly")
    await twin.probe(read)
    await writer.run(f"TRUNCATE public.{part1}")
    await twin.check(read, why="after TRUNCATE of a partition through neonpoly")


async def test_inheritance_added_later_then_child_written(env: Env) -> None:
    parent = await env.table("adv_par", "v int", "(1)")
    child = await env.table("adv_chi", "v int", "(10)")
    twin = await env.twin()
    writer = await env.client()
    read = f"SELECT sum(v) FROM {parent}"
    await make_known(env, parent, child)
    await twin.probe(read)
    await writer.run(f"ALTER TABLE public.{child} INHERIT public.{parent}")
    await twin.check(read, why="after ALTER TABLE … INHERIT through neonpoly")
    await twin.probe(read)
    await writer.run(f"UPDATE public.{child} SET v = v + 1")
    await twin.check(read, why="after a write to the new child through neonpoly")
    await twin.probe(read)
    await writer.run(f"ALTER TABLE public.{child} NO INHERIT public.{parent}")
    await twin.check(read, why="after NO INHERIT through neonpoly")


async def test_view_replaced_then_new_base_written(env: Env) -> None:
    t1 = await env.table("adv_b1", "v int", "(1)")
    t2 = await env.table("adv_b2", "v int", "(100)")
    view = unique("adv_v")
    await env.admin(f"CREATE VIEW public.{view} AS SELECT v FROM public.{t1}", f"GRANT SELECT ON {view} TO PUBLIC")
    env.on_cleanup(f"DROP VIEW IF EXISTS public.{view}")
    twin = await env.twin()
    writer = await env.client()
    read = f"SELECT v FROM {view}"
    await make_known(env, t1, t2, view)
    await twin.probe(read)
    await writer.run(f"CREATE OR REPLACE VIEW public.{view} AS SELECT v FROM public.{t2}")
    await twin.check(read, why="after CREATE OR REPLACE VIEW through neonpoly")
    await twin.probe(read)
    await writer.run(f"UPDATE public.{t2} SET v = v + 1")
    await twin.check(read, why="after a write to the view's new base table")


async def test_bypassrls_granted_through_neonpoly(env: Env) -> None:
    role = await env.role("adv_rls")
    table = await env.table("adv_ten", "tenant text, v int", "('a', 1)", "('b', 2)")
    await env.admin(
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY own ON {table} USING (tenant = 'a')",
    )
    twin = await env.twin(env.login(role))
    writer = await env.client()
    read = f"SELECT sum(v) FROM {table}"
    rows, _ = await twin.probe(read)
    assert rows == [(1,)]
    await writer.run(f"ALTER ROLE {role} BYPASSRLS")
    await twin.check(read, why="after ALTER ROLE … BYPASSRLS through neonpoly")
    await twin.probe(read)
    await writer.run(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    await twin.check(read, why="after FORCE ROW LEVEL SECURITY through neonpoly")
    await writer.run(f"ALTER ROLE {role} NOBYPASSRLS")
    await twin.check(read, why="after NOBYPASSRLS through neonpoly")
    await twin.probe(read)
    await writer.run(f"ALTER POLICY own ON {table} USING (tenant = 'b')")
    await twin.check(read, why="after ALTER POLICY through neonpoly")


@contextlib.asynccontextmanager
async def two_integrations(pg: PgServer, cache_dir: Path, host_b: str) -> AsyncIterator[int]:
    settings = ProxySettings(listen=("127.0.0.1", 0), cache_dir=cache_dir, cache=CacheSettings())
    service = ProxyService(settings)
    service.add_cache("adv-int-a", Origin.from_url(pg.url("postgres", "app", "require", host="127.0.0.1")))
    service.add_cache("adv-int-b", Origin.from_url(pg.url("postgres", "app", "require", host=host_b)))
    _, port = await service.start()
    try:
        yield port
    finally:
        await service.close(grace=0.5)


async def _two_integrations_case(env: Env, tmp_path: Path, host_b: str) -> None:
    table = await env.table("adv_two", "v int", "(1)")
    read = f"SELECT v FROM {table}"
    async with two_integrations(env.pg, tmp_path / f"two-{host_b}", host_b) as port:
        login = env.login()
        a = await Client.open("psycopg", login.with_params(application_name="adv-int-a"), "127.0.0.1", port)
        b = await Client.open("psycopg", login.with_params(application_name="adv-int-b"), "127.0.0.1", port)
        try:
            for _ in range(4):  # stored on the 2nd run, served from the 3rd
                assert await b.rows(read) == [(1,)]
            await a.run(f"UPDATE public.{table} SET v = 2")
            got = await b.rows(read)
            assert got == [(2,)], (
                f"integration b (origin host {host_b!r}) answered {got!r} after a write through "
                "integration a to the same server"
            )
        finally:
            await a.close()
            await b.close()


async def test_two_integrations_same_origin_address(env: Env, tmp_path: Path) -> None:
    await _two_integrations_case(env, tmp_path, "127.0.0.1")


async def test_two_integrations_same_origin_other_host_name(env: Env, tmp_path: Path) -> None:
    """The same server named `localhost` by one integration and `127.0.0.1` by the other."""
    await _two_integrations_case(env, tmp_path, "localhost")

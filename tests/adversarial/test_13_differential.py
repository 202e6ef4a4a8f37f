"""Class 13: a seeded random differential run.

Four sessions through neonpoly (two roles, three drivers), each with a twin straight to the
origin kept in exactly the same session state (tenant setting, search_path, SET ROLE, its own
temporary table shadowing the shared name), and a superuser writer through neonpoly doing
writes and DDL (policies, views, RLS on/off, BYPASSRLS, grants). Every read is compared with
its twin; every write goes through neonpoly, so no answer may ever differ.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from tests.adversarial.harness import Client, Driver, Env, Twin, unique
from tests.adversarial.harness3 import attempt, attempt_run, compare

SEED = int(os.environ.get("NEONPOLY_ADV_SEED", "1313"))  # fixed unless exploring
OPERATIONS = 700


@dataclass
class Actor:
    name: str
    twin: Twin
    role: str
    driver: Driver
    tenant: str | None = None
    alt_path: bool = False
    set_role: bool = False
    temp: bool = False


class World:
    def __init__(self, env: Env, rng: random.Random, writer: Client) -> None:
        self.env = env
        self.rng = rng
        self.writer = writer
        self.log: list[str] = []
        self.next_id = 1000
        self.hits = 0
        self.t = ""
        self.alt = ""
        self.view = ""
        self.r1 = ""
        self.r2 = ""

    def note(self, line: str) -> None:
        self.log.append(line)

    def failure(self, what: str) -> str:
        tail = "\n".join(self.log[-60:])
        return f"seed {SEED}: {what}\nlast operations:\n{tail}"


async def both(world: World, actor: Actor, sql: str) -> None:
    a = await attempt_run(actor.twin.via, sql)
    b = await attempt_run(actor.twin.direct, sql)
    world.note(f"{actor.name} both: {sql} -> {a[0]}/{b[0]}")
    assert a[0] == b[0] and (a[0] == "ok" or a[1] == b[1]), world.failure(
        f"{actor.name}: {sql!r} proxy {a!r} direct {b!r}"
    )


def reads(world: World, actor: Actor) -> list[tuple[str, tuple[Any, ...]]]:
    ph = "$1" if actor.driver.startswith("asyncpg") else "%s"
    t, view = world.t, world.view
    return [
        (f"SELECT id, tenant, v FROM {t} ORDER BY id", ()),
        (f"SELECT count(*), coalesce(sum(v), 0) FROM {t}", ()),
        (f"SELECT tenant, n FROM {view} ORDER BY tenant", ()),
        ("SELECT current_setting('app.tenant', true)", ()),
        (f"SELECT id FROM {t} WHERE v > {ph} ORDER BY id", (world.rng.choice([0, 3, 6]),)),
        (f"SELECT current_user, count(*) FROM public.{t} GROUP BY 1", ()),
    ]


async def do_read(world: World, actor: Actor) -> None:
    sql, params = world.rng.choice(reads(world, actor))
    got, expected, hit = await compare(actor.twin, sql, params)
    world.hits += hit
    world.note(f"{actor.name} read{' (HIT)' if hit else ''}: {sql} {params!r} -> {got!r}")
    assert got == expected, world.failure(
        f"{actor.name} ({actor.role}, tenant={actor.tenant}, alt_path={actor.alt_path}, "
        f"set_role={actor.set_role}, temp={actor.temp}) {'cache hit' if hit else 'miss'} "
        f"{sql!r} {params!r}: proxy {got!r}, direct {expected!r}"
    )


async def do_session_change(world: World, actor: Actor) -> None:
    rng = world.rng
    kind = rng.choice(["tenant", "tenant", "path", "role", "temp", "temp_write"])
    if kind == "tenant":
        if rng.random() < 0.2:
            actor.tenant = None
            await both(world, actor, "RESET app.tenant")
        else:
            actor.tenant = str(rng.randint(1, 3))
            await both(world, actor, f"SET app.tenant = '{actor.tenant}'")
    elif kind == "path":
        actor.alt_path = not actor.alt_path
        path = f"{world.alt}, public" if actor.alt_path else "public"
        await both(world, actor, f"SET search_path = {path}")
    elif kind == "role":
        if actor.role != world.r1:
            return
        actor.set_role = not actor.set_role
        await both(world, actor, f"SET ROLE {world.r2}" if actor.set_role else "RESET ROLE")
    elif kind == "temp":
        if actor.temp:
            await both(world, actor, f"DROP TABLE pg_temp.{world.t}")
        else:
            await both(world, actor, f"CREATE TEMP TABLE {world.t} (id int, tenant int, v int)")
        actor.temp = not actor.temp
    elif kind == "temp_write" and actor.temp:
        world.next_id += 1
        await both(world, actor, f"INSERT INTO pg_temp.{world.t} VALUES ({world.next_id}, 1, {rng.randint(0, 9)})")


async def do_write(world: World, actor: Actor) -> None:
    rng = world.rng
    t = world.t
    world.next_id += 1
    tenant = actor.tenant or "1"
    sql = rng.choice(
        [
            f"INSERT INTO public.{t} VALUES ({world.next_id}, {tenant}, {rng.randint(0, 9)})",
            f"UPDATE public.{t} SET v = v + 1 WHERE id % 3 = {rng.randint(0, 2)}",
            f"DELETE FROM public.{t} WHERE id = (SELECT min(id) FROM public.{t})",
            f"INSERT INTO {world.alt}.{t} VALUES ({world.next_id}, {tenant}, {rng.randint(0, 9)})",
        ]
    )
    out = await attempt_run(actor.twin.via, sql)
    world.note(f"{actor.name} write via neonpoly: {sql} -> {out!r}")


async def do_admin(world: World) -> None:
    rng = world.rng
    t, alt, view, r2 = world.t, world.alt, world.view, world.r2
    mine = "NULLIF(current_setting('app.tenant', true), '')::int"
    sql = rng.choice(
        [
            f"ALTER POLICY tenant_p ON public.{t} USING (tenant = {mine})",
            f"ALTER POLICY tenant_p ON public.{t} USING (tenant <= {mine})",
            f"ALTER POLICY tenant_p ON public.{t} USING (tenant > 1)",
            f"ALTER TABLE public.{t} DISABLE ROW LEVEL SECURITY",
            f"ALTER TABLE public.{t} ENABLE ROW LEVEL SECURITY",
            f"ALTER VIEW public.{view} SET (security_invoker = on)",
            f"ALTER VIEW public.{view} SET (security_invoker = off)",
            f"CREATE OR REPLACE VIEW public.{view} AS SELECT tenant, count(*) AS n FROM {t} GROUP BY tenant",
            f"CREATE OR REPLACE VIEW public.{view} AS SELECT tenant, sum(v) AS n FROM public.{t} GROUP BY tenant",
            f"ALTER ROLE {r2} BYPASSRLS",
            f"ALTER ROLE {r2} NOBYPASSRLS",
            f"GRANT SELECT ON {alt}.{t} TO {r2}",
            f"REVOKE SELECT ON {alt}.{t} FROM {r2}",
            f"UPDATE public.{t} SET v = v + 2 WHERE tenant = {rng.randint(1, 3)}",
            f"UPDATE {alt}.{t} SET v = v + 5",
        ]
    )
    out = await attempt_run(world.writer, sql)
    world.note(f"writer via neonpoly: {sql} -> {out!r}")


async def test_random_differential(env: Env) -> None:
    rng = random.Random(SEED)
    print(f"differential seed {SEED}")
    r1 = await env.role("adv_r1")
    r2 = await env.role("adv_r2")
    t = unique("adv_items")
    alt = unique("adv_alt")
    view = unique("adv_view")
    await env.admin(
        f"GRANT {r2} TO {r1}",
        f"CREATE SCHEMA {alt}",
        f"GRANT USAGE ON SCHEMA {alt} TO PUBLIC",
        f"CREATE TABLE public.{t} (id int, tenant int, v int)",
        f"INSERT INTO public.{t} SELECT g, 1 + g % 3, g % 7 FROM generate_series(1, 9) g",
        f"ALTER TABLE public.{t} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_p ON public.{t} USING (tenant = NULLIF(current_setting('app.tenant', true), '')::int)",
        f"GRANT ALL ON public.{t} TO PUBLIC",
        f"CREATE TABLE {alt}.{t} (id int, tenant int, v int)",
        f"INSERT INTO {alt}.{t} VALUES (500, 2, 5)",
        f"GRANT ALL ON {alt}.{t} TO {r1}",
        f"GRANT INSERT ON {alt}.{t} TO {r2}",
        f"CREATE VIEW public.{view} AS SELECT tenant, count(*) AS n FROM public.{t} GROUP BY tenant",
        f"GRANT SELECT ON public.{view} TO PUBLIC",
    )
    env.on_cleanup(
        f"DROP VIEW IF EXISTS public.{view}",
        f"DROP TABLE IF EXISTS public.{t}",
        f"DROP SCHEMA IF EXISTS {alt} CASCADE",
    )
    writer = await env.client()
    world = World(env, rng, writer)
    world.t, world.alt, world.view, world.r1, world.r2 = t, alt, view, r1, r2
    specs: list[tuple[str, str, Driver]] = [
        ("A", r1, "psycopg"),
        ("B", r2, "asyncpg"),
        ("C", r1, "psycopg_prepared"),
        ("D", r2, "psycopg"),
    ]
    actors = [Actor(name, await env.twin(env.login(role), driver), role, driver) for name, role, driver in specs]
    for actor in actors:
        actor.tenant = "1"
        await both(world, actor, "SET app.tenant = '1'")
    for _ in range(OPERATIONS):
        actor = rng.choice(actors)
        roll = rng.random()
        if roll < 0.8:
            await do_read(world, actor)
        elif roll < 0.88:
            await do_session_change(world, actor)
        elif roll < 0.97:
            await do_write(world, actor)
        else:
            await do_admin(world)
    print(f"differential: {world.hits} hits in {OPERATIONS} operations")
    assert world.hits >= 20, world.failure(f"only {world.hits} cache hits: the run did not exercise the cache")
    for actor in actors:
        await attempt(actor.twin.via, "SELECT 1")

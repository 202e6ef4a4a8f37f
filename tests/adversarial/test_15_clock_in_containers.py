"""Class 15: text from the data read as a date inside a container type. A column cast to a
range, an array or a composite type of timestamptz runs timestamptz's input function on each
element, and 'now' there is the clock, just as in a cast to timestamptz itself."""

from __future__ import annotations

from tests.adversarial.harness import Env, unique
from tests.adversarial.harness2 import fresh_every_time


async def test_column_cast_to_a_range_of_timestamptz(env: Env) -> None:
    table = await env.table("adv_rng", "v text", "('[now,)')")
    client = await env.client()
    await fresh_every_time(client, f"SELECT lower(v::tstzrange) FROM {table}")


async def test_column_cast_to_a_multirange_of_timestamptz(env: Env) -> None:
    table = await env.table("adv_mrng", "v text", "('{[now,)}')")
    client = await env.client()
    await fresh_every_time(client, f"SELECT lower(v::tstzmultirange) FROM {table}")


async def test_column_cast_to_an_array_of_timestamptz(env: Env) -> None:
    table = await env.table("adv_arr", "v text", "('{now}')")
    client = await env.client()
    await fresh_every_time(client, f"SELECT (v::timestamptz[])[1] FROM {table}")


async def test_column_cast_to_a_composite_with_a_timestamptz_field(env: Env) -> None:
    comp = unique("adv_comp")
    await env.admin(f"CREATE TYPE public.{comp} AS (ts timestamptz)")
    env.on_cleanup(f"DROP TYPE IF EXISTS public.{comp} CASCADE")
    table = await env.table("adv_rec", "v text", "('(now)')")
    client = await env.client()
    await fresh_every_time(client, f"SELECT (v::{comp}).ts FROM {table}")


async def test_column_cast_to_a_table_row_type(env: Env) -> None:
    """A table's row type is a composite type too (no CREATE TYPE needed)."""
    rowtype = await env.table("adv_rt", "ts timestamptz")
    table = await env.table("adv_rec2", "v text", "('(now)')")
    client = await env.client()
    await fresh_every_time(client, f"SELECT (v::{rowtype}).ts FROM {table}")

"""Key press → screen update while a workload runs through the proxy in the same process.

The time is from posting the key to the first frame the compositor hands to the driver in
which the expected change is visible (headless drivers drop the bytes, but the frame is
computed exactly as on a terminal). Numbers are printed; run with -s to see them. What must
hold (every key shows its change; the view's numbers are the engine's) is asserted; the
latency aim is checked only when NEONPOLY_LATENCY_BUDGET=1 (a benchmark, not a CI gate).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from textual import events
from textual.widgets import Input, Label

from neonpoly.control.local import LocalControl
from neonpoly.tui.app import ConsoleApp
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from neonpoly.tui.widgets.template_table import TemplateTable
from tests.pgharness import PgServer
from tests.tui.scenes import settle

AIM_P50_MS = 100.0  # the typical key must feel instant
BOUND_MAX_MS = 500.0  # rare outliers (GC, a ticker refresh landing on the key) stay bounded
BUDGET = os.environ.get("NEONPOLY_LATENCY_BUDGET") == "1"
# Samples per key: percentiles need several when the aim is enforced; what CI asserts (each
# key's change shows, the first showing composes and a later one re-shows the installed
# screen, the view's numbers are the engine's) needs two of each.
MANAGE_ROUNDS, VIEW_ROUNDS, SORT_ROUNDS = (6, 4, 5) if BUDGET else (2, 2, 2)


class FrameProbe:
    """Wraps App._display: records when a frame satisfying `wanted` is first produced."""

    def __init__(self, app: ConsoleApp) -> None:
        self.wanted: Callable[[], bool] | None = None
        self.seen_at: float | None = None
        original = app._display

        def display(screen: Any, renderable: Any) -> None:
            if self.wanted is not None and self.seen_at is None and self.wanted():
                self.seen_at = time.perf_counter()
            original(screen, renderable)

        app._display = display  # type: ignore[method-assign]


WORKLOAD = """
import sys, threading, psycopg
SQL = ("SELECT id, name FROM lat_items WHERE id = %s",
       "SELECT count(*) FROM lat_items WHERE id < %s",
       "SELECT now(), %s::int")  # volatile: always passes through
def run(n):
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        i = 0
        while True:
            conn.execute(SQL[i % 3], ((i + n) % 20 + 1,)).fetchall()
            i += 1
threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(4)]
for t in threads:
    t.start()
print("running", flush=True)
for t in threads:
    t.join()
"""


class Workload:
    """Clients in another process, as applications are: four connections querying flat out
    through the proxy (in-process threads would measure GIL contention, not the console)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Workload:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKLOAD, self.url, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        assert await asyncio.wait_for(self.proc.stdout.readline(), 30) == b"running\n"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()


async def test_key_to_frame_under_load(pg: PgServer, control: LocalControl) -> None:
    async with pg.superuser_conn() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS lat_items (id int PRIMARY KEY, name text);"
            "INSERT INTO lat_items SELECT g, 'item ' || g FROM generate_series(1, 50) g"
            " ON CONFLICT DO NOTHING; GRANT SELECT ON lat_items TO scram_user")
    app = ConsoleApp(control)
    probe = FrameProbe(app)
    timings: dict[str, list[float]] = {}

    async def measure(pilot: Any, name: str, key: str, wanted: Callable[[], bool],
                      char: str | None = None) -> None:
        # A person's keys are a few hundred ms apart: let the previous key's work finish, so
        # each number is one key's cost (the ticker and the proxy keep running meanwhile).
        await asyncio.sleep(0.15)
        probe.wanted, probe.seen_at = wanted, None
        # As a terminal driver does on input; pilot.press would also wait for the process
        # to go idle, which it never does under load.
        event = events.Key(key, char)
        event.set_sender(app)
        started = time.perf_counter()
        assert app._driver is not None
        app._driver.send_message(event)
        # What is asserted is that the change shows at all, not how fast (that is the budget
        # below, off by default): 2 s was exceeded on a 2-core machine running other suites.
        deadline = started + 30.0
        while probe.seen_at is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
        assert probe.seen_at is not None, f"{name}: no frame showed the change"
        timings.setdefault(name, []).append((probe.seen_at - started) * 1000)
        probe.wanted = None

    async with app.run_test(size=(120, 40)) as pilot:
        while not control.header().running:
            await pilot.pause(0.01)
        await control.sign_in()
        view = await control.add("default", lambda _line: None)
        url = control.connection_string(view.cache_id, reveal=True)
        app.refresh_views()
        await settle(pilot)

        async with Workload(url) as load:
            def calls() -> int:
                return control.stats(view.cache_id).totals.calls

            while calls() < 200:
                await asyncio.sleep(0.01)
            load_started, done_before = time.perf_counter(), calls()
            for i in range(MANAGE_ROUNDS):
                # Integrations page → Manage drawer → back. The first open composes the
                # drawer; later ones re-show the installed one: reported apart.
                name = "m (first Manage, composes)" if i == 0 else "m (open Manage drawer)"
                await measure(pilot, name, "m",
                              lambda: isinstance(app.screen, ManagePolyScaleDrawer), "m")
                await measure(pilot, "esc (close drawer)", "escape",
                              lambda: isinstance(app.screen, IntegrationsScreen))
            for i in range(VIEW_ROUNDS):
                name = "v (first cache view, composes)" if i == 0 else "v (open cache view)"
                await measure(pilot, name, "v",
                              lambda: isinstance(app.screen, CacheViewScreen), "v")
                if i < VIEW_ROUNDS - 1:
                    await measure(pilot, "esc (leave cache view)", "escape",
                                  lambda: isinstance(app.screen, IntegrationsScreen))
            screen = app.screen
            assert isinstance(screen, CacheViewScreen)
            sort_label = screen.query_one("#cv-sort", Label)
            box = screen.query_one("#filter", Input)
            for _ in range(SORT_ROUNDS):
                before = str(sort_label.content)

                def resorted(before: str = before) -> bool:
                    return str(sort_label.content) != before

                await measure(pilot, "s (re-sort table)", "s", resorted, "s")
                await measure(pilot, "/ (show filter)", "slash", lambda: bool(box.display), "/")
                await measure(pilot, "esc (clear filter)", "escape",
                              lambda: not box.display)
            qps = (calls() - done_before) / (time.perf_counter() - load_started)
            assert load.proc is not None and load.proc.returncode is None  # no client failed

        # The cache view's numbers are the engine's: compare with the admin console.
        # The workload's clients are gone once the proxy closed their sessions: no answer is
        # counted after that (a fixed sleep was a guess at it).
        deadline = time.perf_counter() + 30.0
        while control.service.server.sessions:
            assert time.perf_counter() < deadline, f"{len(control.service.server.sessions)} sessions left"
            await asyncio.sleep(0.01)
        admin = await asyncpg.connect(host=control.service.server.address[0],
                                      port=control.service.server.address[1],
                                      user="postgres", password=pg.password_for("postgres"),
                                      database="neonpoly", ssl=False)
        try:
            row = (await admin.fetch(f"SHOW STATS FOR CACHE {view.cache_id}"))[0]
        finally:
            await admin.close()
        app.refresh_views()
        await pilot.pause()
        shown = str(screen.query_one("#cv-calls", Label).content)
        assert shown == f"{row['calls']:,} queries", (shown, dict(row))
        table = screen.query_one(TemplateTable)
        assert table.row_count == len(control.stats(view.cache_id).templates) == 3

    print(f"\n[latency] workload {qps:.0f} queries/s through the proxy while measuring")
    slow: list[str] = []
    for name, values in timings.items():
        values.sort()
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        one_off = "composes" in name  # built once per console run: only the bound applies
        if (not one_off and statistics.median(values) > AIM_P50_MS) or values[-1] > BOUND_MAX_MS:
            slow.append(name)
        print(f"[latency] {name:<31} n={len(values):>2} p50 {statistics.median(values):6.1f} ms"
              f"  p95 {p95:6.1f} ms  max {values[-1]:6.1f} ms")
    # Speed is a benchmark, not a pass/fail test: a loaded CI machine must not fail the build.
    # `NEONPOLY_LATENCY_BUDGET=1 pytest tests/tui/test_latency.py -s` enforces the aim.
    if slow and BUDGET:
        pytest.fail(f"key→frame over p50 {AIM_P50_MS:.0f} ms or max {BOUND_MAX_MS:.0f} ms: {slow}")

#!/usr/bin/env python3
"""The proxy's own CPU per request, in process: pass-through, hits, misses and the 90/10 mix.

    .venv/bin/python benchmarks/inprocess.py --upstream postgresql://…   # a pgbench -i database
    .venv/bin/python benchmarks/inprocess.py                              # starts its own origin
    .venv/bin/python benchmarks/inprocess.py --compare DIR                # beside another tree

A real `ProxyService` (one caching, one `--no-cache`, on uvloop, a disk-backed store like
`serve`'s) in front of a real PostgreSQL, and one raw-protocol client in the same thread
sending pgbench's exact bytes one request at a time. Only the proxy is timed: the CPU time of
the event loop thread inside the session's two entry points (client bytes in, origin bytes
in; their system calls included), plus the CPU of the store's write-behind thread. On a
shared, busy machine this is steadier than throughput; `--compare DIR` runs rounds of this
tree and of DIR's `neonpoly` (e.g. `git archive main | tar -x -C DIR`) alternately, in
separate processes, and prints both. `--profile WORKLOAD` prints cProfile's view of one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
from benchmarks.rawclient import SYNC, RawClient, bind_describe_execute_sync, parse, query  # noqa: E402

if __name__ == "__main__" and "--source" in sys.argv:  # neonpoly from another tree (imported later)
    sys.path.insert(0, sys.argv[sys.argv.index("--source") + 1])

HOT = 200  # the hot set: aid 1..HOT
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = "
PREPARED = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
UPDATE = "UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid}"
WORKLOADS = ("pass-simple", "pass-prepared", "hit-simple", "hit-prepared", "miss-simple", "miss-prepared",
             "cold-simple", "cold-prepared", "fresh-prepared", "mix")  # fmt: skip
# miss-*: the miss path itself (first sightings, looked up, on a cache whose lookup bypass is
# off: cache/bypass.py). cold-*: the same reads of a template that only ever misses (pgbench -S
# over 1M rows) on a cache with the default bypass, past its first window: what -S costs.
# fresh-prepared: hits of stored keys by sessions that never read them (each session of a new
# pgbench run reads every key of the hot set once before its hit memos answer it): new
# sessions, logged in and prepared before the round, each reading the hot set once (with
# --python: one session whose hit memos are forgotten before each read).
COLD_WARMUP = 600  # first sightings before cold-* is measured: more than bypass.WINDOW


original_client_data: Callable[[Any, bytes], None]
original_origin_data: Callable[[Any, bytes], None]


class Meter:
    """CPU seconds spent inside the proxy's session entry points, and by the store's writer."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def install(self) -> None:
        from neonpoly.proxy.session import Session

        clock = time.thread_time
        meter = self

        def timed(fn: Callable[[Any, bytes], None]) -> Callable[[Any, bytes], None]:
            def wrapper(session: Any, data: bytes) -> None:
                t0 = clock()
                try:
                    fn(session, data)
                finally:
                    meter.seconds += clock() - t0

            return wrapper

        global original_client_data
        original_client_data = Session.client_data
        Session.client_data = timed(Session.client_data)  # type: ignore[method-assign,assignment]
        global original_origin_data
        original_origin_data = Session.origin_data
        Session.origin_data = timed(Session.origin_data)  # type: ignore[method-assign,assignment]

    @staticmethod
    def writer_seconds() -> float:
        total = 0.0
        for thread in threading.enumerate():
            if thread.name.startswith("neonpoly-cache-writer") and thread.ident is not None:
                with contextlib.suppress(OSError):
                    total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        return total



@contextlib.contextmanager
def recording_origin(session: Any) -> Iterator[list[bytes]]:
    """Keep what the origin sends the session meanwhile (each read, in order), as it goes on
    to the session. The origin's reads reach the session through its protocol, which took the
    session's method when it was made: the recorder goes there, and the protocol is set again
    (uvloop reads data_received only then)."""
    recorded: list[bytes] = []
    original = original_origin_data

    def record(data: bytes) -> None:
        recorded.append(data)
        original(session, data)

    transport = session.origin_transport
    assert transport is not None
    side: Any = transport.get_protocol()
    reads = side.data_received
    side.data_received = record
    transport.set_protocol(side)
    try:
        yield recorded
    finally:
        side.data_received = reads
        transport.set_protocol(side)

class Bench:
    def __init__(self, upstream: str, requests: int) -> None:
        from neonpoly.proxy.origin import Origin

        self.origin = Origin.from_url(upstream)
        self.requests = requests
        self.meter = Meter()
        self.meter.install()
        self.rng = random.Random(7)
        # Keys never asked before: each round takes a fresh stretch (a miss is a first sighting).
        self.fresh = 10_000 + int.from_bytes(os.urandom(2), "big") * 10

    async def start(self, tmp: Path) -> None:
        from neonpoly.control.serving import start_serving
        from neonpoly.service import CacheSettings, ProxyService, ProxySettings

        self.services = {}
        for mode, enabled in (("cache", True), ("pass", False), ("cold", True)):
            service = ProxyService(
                ProxySettings(listen=("127.0.0.1", 0), cache_dir=tmp / f"cache-{mode}",
                              cache=CacheSettings(enabled=enabled, ttl=600))
            )  # fmt: skip
            serving = await start_serving(service, tmp / f"state-{mode}", upstream=self.origin, follow=False)
            self.services[mode] = (service, serving)
            if mode == "cache":
                _bypass_off(service)
        self.clients: dict[str, RawClient] = {}
        for mode in self.services:
            for protocol in ("simple", "prepared"):
                self.clients[f"{mode}-{protocol}"] = await self._connect(mode, protocol == "prepared")
        for key in ("cache-simple", "cache-prepared"):  # warm: stored on the 2nd run, served from the 3rd
            for _ in range(3):
                for aid in range(1, HOT + 1):
                    await self._read(self.clients[key], key.endswith("prepared"), aid)
        for key in ("cold-simple", "cold-prepared"):  # past the bypass's first window
            for aid in range(self.fresh, self.fresh + COLD_WARMUP):
                await self._read(self.clients[key], key.endswith("prepared"), aid)
            self.fresh += COLD_WARMUP

    async def _connect(self, mode: str, prepared: bool) -> RawClient:
        port = self.services[mode][1].address[1]
        client = await RawClient.connect(
            port, self.origin.user or "postgres", self.origin.password or "", self.origin.database or "postgres"
        )
        if prepared:
            await client.request(parse("P_0", PREPARED) + SYNC)
        return client

    async def stop(self) -> None:
        for client in self.clients.values():
            await client.close()
        for _, serving in self.services.values():
            await serving.close(0.5)

    @staticmethod
    async def _read(client: RawClient, prepared: bool, aid: int) -> None:
        if prepared:
            await client.request(bind_describe_execute_sync("P_0", (str(aid),)))
        else:
            await client.request(query(f"{SELECT}{aid}"))

    async def run(self, workload: str) -> tuple[float, float]:
        """(proxy µs per request, write-behind µs per request) over self.requests requests."""
        mode, _, protocol = workload.partition("-")
        prepared = protocol == "prepared"
        client = self.clients["cache-simple"] if mode == "mix" else self.clients[_client(mode, protocol)]
        n = self.requests
        if mode in ("miss", "cold"):
            aids = list(range(self.fresh, self.fresh + n))
            self.fresh += n
        else:
            aids = [1 + (i * 7919) % HOT for i in range(n)]
        rng = self.rng
        fresh: list[RawClient] = []
        if mode == "fresh":
            for _ in range(-(-n // HOT)):
                fresh.append(await self._connect("cache", prepared=True))
            aids = list(range(1, HOT + 1))
        await asyncio.sleep(0.05)  # let the writer settle
        w0, m0 = Meter.writer_seconds(), self.meter.seconds
        if mode == "fresh":
            done = 0
            for each in fresh:
                for aid in aids[: n - done]:
                    await self._read(each, True, aid)
                done += min(HOT, n - done)
        elif mode == "mix":
            for i in range(n):
                if i % 10 == 9:
                    await client.request(query(UPDATE.format(delta=rng.randint(-5000, 5000), aid=rng.randint(1, HOT))))
                else:
                    await client.request(query(f"{SELECT}{rng.randint(1, HOT)}"))
        else:
            for aid in aids:
                await self._read(client, prepared, aid)
        await asyncio.sleep(0.05)  # the writer's share of these requests
        seconds = (self.meter.seconds - m0) / n * 1e6, (Meter.writer_seconds() - w0) / n * 1e6
        for each in fresh:
            await each.close()
        return seconds

    async def python_only(self, workload: str) -> float:
        """µs of Python per request with no sockets: the session's transports swapped for
        sinks, the origin's answer replayed from a real one recorded first."""
        mode, _, protocol = workload.partition("-")
        prepared = protocol == "prepared"
        client = self.clients[_client(mode, protocol)]
        service = self.services[_client(mode, protocol).partition("-")[0]][0]
        (session,) = [s for s in service.server.sessions if s.peer.endswith(str(_local_port(client)))]
        aid = self.fresh if mode in ("miss", "cold") else 1
        self.fresh += 1
        with recording_origin(session) as recorded:
            await self._read(client, prepared, aid)
            await self._read(client, prepared, aid)
        answer = b"".join(recorded[-1:])
        n = self.requests
        if mode in ("miss", "cold"):
            aids = list(range(self.fresh, self.fresh + n))
            self.fresh += n
        else:
            aids = [1 + (i * 7919) % HOT for i in range(n)]
        requests = [bind_describe_execute_sync("P_0", (str(a),)) if prepared else query(f"{SELECT}{a}") for a in aids]
        real_client, real_origin = session.client, session.origin_transport
        session.client, session.origin_transport = _Sink(), _Sink()  # type: ignore[assignment]
        goes_out = mode not in ("hit", "fresh")
        # fresh: every read the session's first of its key (its hit memos forgotten before it).
        memos = session.hit_memos if mode == "fresh" else None
        try:
            t0 = time.thread_time()
            for data in requests:
                if memos is not None:
                    memos.clear()
                original_client_data(session, data)
                if goes_out:
                    original_origin_data(session, answer)
            return (time.thread_time() - t0) / n * 1e6
        finally:
            session.client, session.origin_transport = real_client, real_origin


def _client(mode: str, protocol: str) -> str:
    """The client a workload runs on: its service (cache, cold or pass) and protocol."""
    return {"pass": "pass", "cold": "cold"}.get(mode, "cache") + "-" + protocol


def _bypass_off(service: Any) -> None:
    """The `cache` service measures the miss path itself: its lookup bypass never judges (a
    tree without one, such as a base to compare with, has nothing to turn off)."""
    try:
        from neonpoly.cache.bypass import Bypass
    except ImportError:
        return
    for route in service.routes.by_id.values():
        if route.cache is not None:
            route.cache.bypass = Bypass(route.cache.clock, window=1 << 62)


class _Sink:
    """A transport that takes writes and does nothing (no system call)."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _local_port(client: RawClient) -> int:
    return int(client.writer.get_extra_info("sockname")[1])


def _loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of serve
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def measure(
    upstream: str, workloads: list[str], requests: int, rounds: int, profile: str | None, python_only: bool = False
) -> dict[str, Any]:
    loop = _loop()
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in workloads}

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return loop.run_until_complete(coro)

    with tempfile.TemporaryDirectory(prefix="neonpoly-inprocess-") as tmp:
        bench = Bench(upstream, requests)
        run(bench.start(Path(tmp)))
        try:
            if python_only:
                if profile:
                    profiler = cProfile.Profile(time.thread_time)
                    profiler.enable()
                    run(bench.python_only(profile))
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
                for w in workloads:
                    if w == "mix":
                        continue
                    results[w].extend((run(bench.python_only(w)), 0.0) for _ in range(rounds))
                return {w: [list(x) for x in rs] for w, rs in results.items()}
            if profile:
                profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: a wakeup preempts us
                profiler.enable()
                run(bench.run(profile))
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
            for r in range(rounds):
                for w in workloads if r % 2 == 0 else workloads[::-1]:
                    results[w].append(run(bench.run(w)))
        finally:
            run(bench.stop())
            loop.close()
    return {w: [list(x) for x in rs] for w, rs in results.items()}


def _origin(tmp: Path) -> tuple[Any, str]:
    """A throwaway PostgreSQL with pgbench's tables (scale 10)."""
    from benchmarks.targets import PG_SETTINGS
    from neonpoly.integrations.embedded import LocalPostgres

    pg = LocalPostgres(tmp / "pg", settings=PG_SETTINGS, remove_on_stop=True, die_with_parent=True)
    pg.start()
    env = dict(os.environ, PGPASSWORD=pg.password, PGSSLMODE="disable")
    subprocess.run(
        ["pgbench", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-i", "-q", "-s", "10", "postgres"],
        env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return pg, pg.url(sslmode="disable")


def _table(columns: dict[str, dict[str, list[list[float]]]], workloads: list[str]) -> str:
    names = list(columns)
    lines = ["| workload | " + " | ".join(f"{n} µs/req (writer)" for n in names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for w in workloads:
        cells = []
        for n in names:
            rows = columns[n].get(w, [])
            if not rows:
                cells.append("-")
                continue
            cells.append(f"{min(r[0] for r in rows):.1f} / med {statistics.median(r[0] for r in rows):.1f} "
                         f"({statistics.median(r[1] for r in rows):.1f})")  # fmt: skip
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upstream", help="a database initialised by pgbench -i (default: start one)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per workload per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--profile", choices=WORKLOADS, help="print a cProfile of one workload first")
    parser.add_argument("--python", action="store_true", help="no sockets: the session's Python alone")
    parser.add_argument("--source", type=Path, help="the neonpoly tree to measure (default: this one)")
    parser.add_argument("--compare", type=Path, help="another tree, measured in alternate rounds")
    parser.add_argument("--json", dest="json_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    with tempfile.TemporaryDirectory(prefix="neonpoly-inprocess-origin-") as tmp:
        os.chmod(tmp, 0o711)  # PostgreSQL runs as an unprivileged user when we are root
        pg = None
        upstream = args.upstream
        if upstream is None:
            pg, upstream = _origin(Path(tmp))
        try:
            if args.compare is None:
                result = measure(upstream, workloads, args.requests, args.rounds, args.profile, args.python)
                if args.json_out is not None:
                    args.json_out.write_text(json.dumps(result))
                    return 0
                print(_table({"this tree": result}, workloads))
                return 0
            trees = {"this tree": args.source or ROOT, str(args.compare): args.compare}
            columns: dict[str, dict[str, list[list[float]]]] = {n: {w: [] for w in workloads} for n in trees}
            for r in range(args.rounds):
                for name, tree in list(trees.items())[:: 1 if r % 2 == 0 else -1]:
                    out = Path(tmp) / "round.json"
                    subprocess.run(
                        [sys.executable, __file__, "--upstream", upstream, "--requests", str(args.requests),
                         "--rounds", "1", "--workloads", ",".join(workloads), "--source", str(tree),
                         "--json", str(out), *(["--python"] if args.python else [])],
                        check=True,
                    )  # fmt: skip
                    for w, rows in json.loads(out.read_text()).items():
                        columns[name][w].extend(rows)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            print(_table(columns, workloads))
            return 0
        finally:
            if pg is not None:
                pg.stop()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Instructions per request of the 90/10 mix's kinds (a write, the read right after its key's
write, a hit, the mix itself), the session's Python alone, counted by callgrind.

    .venv/bin/python benchmarks/mix_instructions.py --upstream postgresql://…   # a pgbench -i db
    .venv/bin/python benchmarks/mix_instructions.py --upstream … --source DIR   # another tree

It runs itself under `valgrind --tool=callgrind` with instrumentation off until the sessions are
warm, then counts each section between two `os.getppid()` calls (`--dump-before=getppid`: one
profile dump per marker, so each section's count is exact and the setup is not in it). As
`inprocess.py --python`: the cache service's session with its transports swapped for sinks,
each request's origin answer replayed from a real one recorded first (an UPDATE's, a point
read's). A section is `--requests` requests: writes of distinct keys of the hot set, then a
read of each (every one a re-capture), then a read of each again (hits); the mix is 90% reads
and 10% UPDATEs of random keys of the hot set, after three unmeasured rounds of it. Then two
sections of prepared first sightings (pgbench -S -M prepared's Bind/Describe/Execute/Sync of
keys never asked before): `miss-prepared` on the cache whose lookup bypass is off (the miss
path itself), `cold-prepared` on one past the bypass's first window (bypassed, as -S runs).
Each section's requests are made before it is counted.
Instruction counts move by about ±0.5% between runs (the hash seed is fixed).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--source" in sys.argv:  # neonpoly from another tree (imported later)
        sys.path.insert(0, sys.argv[sys.argv.index("--source") + 1])
from benchmarks import inprocess  # noqa: E402
from benchmarks.rawclient import bind_describe_execute_sync, query  # noqa: E402

SECTIONS = ("write", "recapture", "hit", "mix", "miss-prepared", "cold-prepared")


class _Sink:
    """A transport that counts writes and does nothing else."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False


async def _sections(upstream: str, requests: int, under_valgrind: bool) -> None:
    bench = inprocess.Bench(upstream, requests)
    with tempfile.TemporaryDirectory(prefix="neonpoly-mix-instructions-") as tmp:
        await bench.start(Path(tmp))
        client = bench.clients["cache-simple"]
        service = bench.services["cache"][0]
        port = str(inprocess._local_port(client))
        (session,) = [s for s in service.server.sessions if s.peer.endswith(port)]
        origin_data = inprocess.original_origin_data
        client_data = inprocess.original_client_data
        with inprocess.recording_origin(session) as recorded:
            await client.request(query(inprocess.UPDATE.format(delta=1, aid=1)))
            updated = b"".join(recorded)
            recorded.clear()
            await client.request(query(f"{inprocess.SELECT}1"))  # a re-capture: its answer
            selected = b"".join(recorded)
        prepared = {mode: await _prepared_reads(bench, mode, requests) for mode in ("cache", "cold")}
        real = session.client, session.origin_transport
        sink = _Sink()
        session.client, session.origin_transport = _Sink(), sink  # type: ignore[assignment]
        rng = random.Random(7)
        answers = {ord("U"): updated, ord("S"): selected}

        def run(batch: list[bytes]) -> int:
            """Requests made beforehand (so only the session's work is counted), each answered
            as the origin answered its kind when the session sent it."""
            went = 0
            for data in batch:
                sink.writes = 0
                client_data(session, data)
                if sink.writes:
                    origin_data(session, answers[data[5]])
                    went += sink.writes
            return went

        def write(aid: int) -> bytes:
            return query(inprocess.UPDATE.format(delta=rng.randint(-5000, 5000), aid=aid))

        def read(aid: int) -> bytes:
            return query(f"{inprocess.SELECT}{aid}")

        def mix() -> list[bytes]:
            return [
                write(rng.randint(1, inprocess.HOT)) if i % 10 == 9 else read(rng.randint(1, inprocess.HOT))
                for i in range(requests)
            ]

        aids = [1 + (i * 7919) % inprocess.HOT for i in range(requests)]
        run([r for aid in aids for r in (write(aid), read(aid), read(aid))])  # every path warm: memos made
        for _ in range(3):
            run(mix())
        reads = [read(a) for a in aids]
        batches = {"write": [write(a) for a in aids], "recapture": reads, "hit": reads, "mix": mix()}
        went: dict[str, int] = {}
        try:
            if under_valgrind:
                subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
            runs: dict[str, Callable[[], int]] = {
                **{name: functools.partial(run, batch) for name, batch in batches.items()},
                "miss-prepared": prepared["cache"],
                "cold-prepared": prepared["cold"],
            }
            for name in SECTIONS:
                os.getppid()  # the markers: a dump before each (--dump-before=getppid)
                went[name] = runs[name]()
                os.getppid()
            if under_valgrind:
                subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True, capture_output=True)
        finally:
            session.client, session.origin_transport = real
        print(" ".join(f"{name}:{n}" for name, n in went.items()), file=sys.stderr)  # requests that went out
        await bench.stop()


async def _prepared_reads(bench: inprocess.Bench, mode: str, requests: int) -> Callable[[], int]:
    """A section of first sightings of a prepared read (pgbench -S -M prepared: Bind/Describe/
    Execute/Sync of keys never asked before) on the `cache` service (its lookup bypass off:
    the miss path itself) or the `cold` one (past the bypass's first window: bypassed), each
    answered as the origin answered one such read."""
    client = bench.clients[f"{mode}-prepared"]
    service = bench.services[mode][0]
    port = str(inprocess._local_port(client))
    (session,) = [s for s in service.server.sessions if s.peer.endswith(port)]
    warm = [bind_describe_execute_sync("P_0", (str(bench.fresh + i),)) for i in range(requests)]
    bench.fresh += requests
    with inprocess.recording_origin(session) as recorded:
        await client.request(warm[0])
    answer = b"".join(recorded)
    reads = [bind_describe_execute_sync("P_0", (str(bench.fresh + i),)) for i in range(requests)]
    bench.fresh += requests
    client_data, origin_data = inprocess.original_client_data, inprocess.original_origin_data

    def run(batches: list[bytes]) -> int:
        real = session.client, session.origin_transport
        sink = _Sink()
        session.client, session.origin_transport = _Sink(), sink  # type: ignore[assignment]
        try:
            for data in batches:
                before = sink.writes
                client_data(session, data)
                if sink.writes != before:
                    origin_data(session, answer)
            return sink.writes
        finally:
            session.client, session.origin_transport = real

    run(warm[1:])  # every path warm (the first was the recorded one)
    return lambda: run(reads)


def _count(args: argparse.Namespace) -> dict[str, float]:
    """Run the sections under callgrind; instructions per request of each (main thread)."""
    with tempfile.TemporaryDirectory(prefix="neonpoly-callgrind-") as out:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-before=getppid", "--separate-threads=yes",
            f"--callgrind-out-file={out}/cg.out", sys.executable, __file__, "--inside",
            "--upstream", args.upstream, "--requests", str(args.requests),
            *(["--source", str(args.source)] if args.source else []),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONHASHSEED="0")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        totals: dict[int, int] = {}
        for path in Path(out).glob("cg.out.*-01"):  # thread 1: the event loop's
            part = int(path.name.split(".")[2].split("-")[0])
            for line in path.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    totals[part] = int(line.split()[1])
                    break
    # Dumps: 1 before the first marker, then each section and the gap after it, in turn.
    return {name: totals.get(2 + 2 * i, 0) / args.requests for i, name in enumerate(SECTIONS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="a database initialised by pgbench -i")
    parser.add_argument("--requests", type=int, default=200, help="requests per section (at most the hot set's 200 "
                        "for the write, re-capture and hit sections to be those)")  # fmt: skip
    parser.add_argument("--source", type=Path, help="the neonpoly tree to measure (default: this one)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        loop = inprocess._loop()
        loop.run_until_complete(_sections(args.upstream, args.requests, under_valgrind=True))
        loop.close()
        return 0
    for name, count in _count(args).items():
        print(f"{name:10s} {count / 1000:7.1f}k instructions a request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The workers of one `serve --workers N` answering for each other, over Redis.

An admin connection lands on whichever worker the kernel picks (SO_REUSEPORT), and so does a
CancelRequest, so each worker can ask the others, in one round trip:

- `report`: its `service.report()` (merged by admin/reports.py into SHOW STATS, QUERIES,
  CACHES and /metrics), `run`: an admin statement run there (SHOW CONNECTIONS rows, PURGE,
  a rule change to load), `worker`: its SHOW WORKERS row, `cancel`: a cancel key, cancelled
  there if one of its sessions holds it.

Keys (under `neonpoly:workers:<group>:`, the group a token of one `serve` run, so runs
sharing a `--redis` never mix): `req:<i>` the stream worker i reads its requests from,
`rep:<request id>` the list replies are pushed to (expiring), `hb:<i>` worker i's last
SHOW WORKERS row (a heartbeat, expiring). A worker that does not reply within `timeout` is
reported as missing (SHOW WORKERS says so, with its last heartbeat), never silently dropped
from a sum without a trace: the answering worker logs which ones were missing.

Redis rather than pipes between the processes: the plane already needs it (the parent starts
a private one on a unix socket when no `--redis` is given), a stream survives the reader's
reconnect, and one round trip on a unix socket is ~20 µs, nothing beside an admin query.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from neonpoly.admin.commands import Command, Executor, Result, Value, columns_of
from neonpoly.admin.reports import decode_report, encode, merge

if TYPE_CHECKING:
    from neonpoly.service import ProxyService, ServiceReport

log = logging.getLogger("neonpoly.workers")

HEARTBEAT = 1.0  # seconds between a worker's SHOW WORKERS rows in Redis
HEARTBEAT_TTL = 30  # a heartbeat key outlives a dead worker this long (SHOW WORKERS: missing, last seen)
REQUEST_BACKLOG = 1000  # entries kept per request stream (approximately)

# Statements every worker runs on its own part: purges (each worker has its own entries).
BROADCAST = ("purge all", "purge table", "purge query")
# Statements one worker runs (they change rules.toml), then the others reload it.
RULE_CHANGES = ("create rule", "drop rule", "set mode")
# Answers read from the merged report.
FROM_REPORT = ("show stats", "show queries", "show caches")


@dataclass(frozen=True, slots=True)
class WorkerPlace:
    """Where this worker stands among its siblings (given by the `serve` parent)."""

    index: int
    count: int
    group: str
    url: str  # the Redis the workers share


def _value_out(value: Value) -> Any:
    return {"t": value.timestamp()} if isinstance(value, datetime) else value


def _int(value: Value) -> int:
    return value if isinstance(value, int) else 0


def _value_in(value: Any) -> Value:
    if isinstance(value, dict):
        return datetime.fromtimestamp(float(value["t"]), UTC)
    return value  # type: ignore[no-any-return]


class WorkerFleet:
    """This worker's end of the request streams: answers its siblings, asks them."""

    def __init__(
        self, place: WorkerPlace, service: ProxyService, executor: Executor, *, timeout: float = 0.5
    ) -> None:
        self.place = place
        self.service = service
        self.executor = executor
        self.timeout = timeout
        self.prefix = f"neonpoly:workers:{place.group}:"
        self._redis: Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.reload_rules: Callable[[], None] | None = None  # set by the worker: load rules.toml again

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.place.count) if i != self.place.index]

    async def start(self) -> None:
        # RESP2: redis-py 8 defaults to RESP3, whose XREAD reply is a map, not a list.
        self._redis = Redis.from_url(self.place.url, protocol=2, decode_responses=True)
        await self._redis.ping()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve()), loop.create_task(self._heartbeat())]

    async def close(self) -> None:
        for task in [*self._tasks, *self._handlers]:
            task.cancel()
        for task in [*self._tasks, *self._handlers]:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        self._tasks = []
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
            self._redis = None

    # --- answering ----------------------------------------------------------------------

    async def _serve(self) -> None:
        assert self._redis is not None
        stream = f"{self.prefix}req:{self.place.index}"
        last = "0-0"  # the group is new with each run: everything in the stream is for us
        while True:
            try:
                reply: Any = await self._redis.xread({stream: last}, count=100, block=1000)
            except (RedisError, OSError) as exc:
                log.warning("worker %d: cannot read requests from Redis: %s", self.place.index, exc)
                await asyncio.sleep(0.5)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    task = asyncio.get_running_loop().create_task(self._answer(fields))
                    self._handlers.add(task)
                    task.add_done_callback(self._handlers.discard)

    async def _answer(self, fields: dict[str, str]) -> None:
        assert self._redis is not None
        kind, body = fields["kind"], json.loads(fields["body"])
        try:
            answer: Any = await self._handle(kind, body)
        except Exception as exc:  # a bad request must not end the loop; the asker sees an error
            log.exception("worker %d: request %s failed", self.place.index, kind)
            answer = {"error": str(exc)}
        key = f"{self.prefix}rep:{fields['id']}"
        payload = json.dumps({"from": self.place.index, "answer": answer})
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, payload)
            pipe.expire(key, 10)
            await pipe.execute()

    async def _handle(self, kind: str, body: dict[str, Any]) -> Any:
        if kind == "report":
            return encode(self.service.report(body.get("cache_id")))
        if kind == "worker":
            return [_value_out(v) for v in self.executor.worker_row(self.place.index)]
        if kind == "run":
            command = Command(**body)
            if command.verb in RULE_CHANGES:
                if self.reload_rules is not None:
                    self.reload_rules()
                if command.verb == "create rule":
                    self._purge_for_rule(command)
                return {"rows": []}
            result = self.executor.run(command)
            return {"rows": [[_value_out(v) for v in row] for row in result.rows], "tag": result.tag}
        if kind == "cancel":
            return await self._cancel(int(body["pid"]), bytes.fromhex(body["secret"]))
        raise ValueError(f"unknown request {kind!r}")

    def _purge_for_rule(self, command: Command) -> None:
        # Entries stored under an older, longer TTL would outlive the rule here too.
        verb = "purge table" if command.target == "table" else "purge query"
        self.executor.run(Command(verb, name=command.name, cache_id=command.cache_id))

    async def _cancel(self, pid: int, secret: bytes) -> bool:
        server = self.service.server
        if (pid, secret) not in server.by_key:
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def delivered() -> None:
            if not done.done():
                done.set_result(None)

        server.cancel(pid, secret, delivered)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await done
        return True

    async def _heartbeat(self) -> None:
        assert self._redis is not None
        key = f"{self.prefix}hb:{self.place.index}"
        while True:
            row = [_value_out(v) for v in self.executor.worker_row(self.place.index)]
            with contextlib.suppress(RedisError, OSError):
                await self._redis.set(key, json.dumps(row), ex=HEARTBEAT_TTL)
            await asyncio.sleep(HEARTBEAT)

    # --- asking -------------------------------------------------------------------------

    async def ask(self, kind: str, body: dict[str, Any], workers: Sequence[int] | None = None) -> dict[int, Any]:
        """Each other worker's answer to one request; a worker missing from the result did
        not answer within `timeout` (or Redis could not be reached)."""
        targets = list(self.others if workers is None else workers)
        if not targets or self._redis is None:
            return {}
        request = secrets.token_hex(8)
        key = f"{self.prefix}rep:{request}"
        fields: dict[Any, Any] = {"id": request, "kind": kind, "body": json.dumps(body), "from": str(self.place.index)}
        answers: dict[int, Any] = {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in targets:
                    pipe.xadd(f"{self.prefix}req:{i}", fields, maxlen=REQUEST_BACKLOG, approximate=True)
                await pipe.execute()
            deadline = time.monotonic() + self.timeout
            while len(answers) < len(targets):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                popped = await self._redis.blpop([key], timeout=max(left, 0.01))
                if popped is None:
                    break
                reply = json.loads(popped[1])
                answers[int(reply["from"])] = reply["answer"]
            await self._redis.delete(key)
        except (RedisError, OSError) as exc:
            log.warning("worker %d: cannot ask the other workers over Redis: %s", self.place.index, exc)
        missing = sorted(set(targets) - set(answers))
        if missing:
            log.warning("worker %d: workers %s did not answer a %s request", self.place.index, missing, kind)
        return answers

    async def report(self, cache_id: str | None = None) -> ServiceReport:
        """Every worker's figures merged (the missing ones' left out, and logged)."""
        own = self.service.report(cache_id)
        answers = await self.ask("report", {"cache_id": cache_id})
        others = [decode_report(a) for a in answers.values() if not (isinstance(a, dict) and "error" in a)]
        return merge(own, others)

    async def run(self, command: Command) -> Result:
        """An admin statement answered for every worker."""
        verb = command.verb
        if verb in FROM_REPORT:
            return self.executor.run(command, await self.report())
        if verb == "show workers":
            return await self._workers()
        result = self.executor.run(command)
        if verb in RULE_CHANGES:
            await self.ask("run", asdict(command))
            return result
        if verb in BROADCAST or verb == "show connections":
            answers = await self.ask("run", asdict(command))
            rows = list(result.rows)
            for answer in answers.values():
                rows.extend(tuple(_value_in(v) for v in row) for row in answer.get("rows", ()))
            if verb in BROADCAST:
                removed = sum(_int(r[0]) for r in rows)
                return Result(result.columns, [(removed,)], f"PURGE {removed}")
            return Result(result.columns, rows, result.tag)
        return result

    async def _workers(self) -> Result:
        answers = await self.ask("worker", {})
        rows: list[tuple[Value, ...]] = [self.executor.worker_row(self.place.index)]
        for i in self.others:
            if i in answers and isinstance(answers[i], list):
                rows.append(tuple(_value_in(v) for v in answers[i]))
                continue
            last: list[Any] | None = None
            with contextlib.suppress(RedisError, OSError, ValueError, TypeError):
                assert self._redis is not None
                text = await self._redis.get(f"{self.prefix}hb:{i}")
                last = json.loads(text) if text else None
            if last is not None:
                rows.append((i, last[1], "missing", *last[3:6], _value_in(last[6]), *last[7:9]))
            else:
                rows.append((i, None, "missing", None, None, None, None, None, None))
        rows.sort(key=lambda r: _int(r[0]))
        return Result(columns_of(Command("show workers")), rows, "SHOW")

    def forward_cancel(self, pid: int, secret: bytes, done: Callable[[], None] | None) -> None:
        """The `unknown_cancel` hook of this worker's listener: the session may be a sibling's."""

        async def forward() -> None:
            try:
                answers = await self.ask("cancel", {"pid": pid, "secret": secret.hex()})
                if not any(a is True for a in answers.values()):
                    log.info("cancel request for an unknown backend ignored (no worker holds it)")
            finally:
                if done is not None:
                    done()

        task = asyncio.get_running_loop().create_task(forward())
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

"""libpq on the event loop: one origin connection driven without blocking, for the change feed.

psycopg 3 has no replication API, but its binding of libpq (`psycopg.pq`) does all a
replication client needs: `replication=database` in the conninfo starts a walsender,
`START_REPLICATION` answers COPY BOTH, and `get_copy_data`/`put_copy_data` carry the stream.
libpq brings what a hand-written client would have to redo: SCRAM, TLS with SNI (Neon
routes by it) and certificate checks, `.pgpass` and `PGPASSWORD`.

Why on the event loop and not in a thread: the feed's work is small and bursty (a few bytes
per commit), and the generations it bumps are the caches' own, touched by the sessions on
the loop; doing it there needs no locks and no hand-off, and stopping it is closing a socket,
not interrupting a thread blocked in `PQgetCopyData`. The connection is non-blocking; we wait
on its socket with `loop.add_reader`/`add_writer` (asyncio and uvloop alike). libpq resolves
host names inside `PQconnectPoll`, which would block the loop, so the caller passes
`hostaddr` (resolved with the loop's `getaddrinfo`) next to `host` (the name TLS checks and
sends as SNI). With TLS, libpq may hold decrypted bytes the socket no longer shows, so reads
call `consume_input` again before waiting whenever the last one yielded a message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from psycopg import NotSupportedError, pq
from psycopg._encodings import pg2pyenc

log = logging.getLogger("neonpoly.changefeed")


class LibpqError(Exception):
    """The connection failed or a command was refused; `sqlstate` when the server said so."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace").strip()


Row = tuple[str | None, ...]


class LibpqConnection:
    """A non-blocking libpq connection: simple queries, then (for a walsender) COPY BOTH."""

    def __init__(self, conn: pq.abc.PGconn) -> None:
        self._conn = conn
        self._ended: LibpqError | None = None
        conn.notice_handler = _log_notice

    @classmethod
    async def connect(cls, conninfo: str, timeout: float) -> LibpqConnection:
        conn = pq.PGconn.connect_start(conninfo.encode())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if conn.status == pq.ConnStatus.BAD:
                        raise LibpqError(_text(conn.error_message) or "connection failed")
                    state = conn.connect_poll()
                    if state == pq.PollingStatus.OK:
                        break
                    if state == pq.PollingStatus.FAILED:
                        raise LibpqError(_text(conn.error_message) or "connection failed")
                    await _wait(conn.socket, write=state == pq.PollingStatus.WRITING)
        except TimeoutError:
            conn.finish()
            raise LibpqError(f"timed out after {timeout:g} s") from None
        except BaseException:
            conn.finish()
            raise
        conn.nonblocking = 1
        return cls(conn)

    @property
    def server_version(self) -> int:
        return int(self._conn.server_version)

    @property
    def backend_pid(self) -> int:
        return int(self._conn.backend_pid)

    def parameter(self, name: str) -> str | None:
        """A parameter the server reported (server_encoding, …)."""
        value = self._conn.parameter_status(name.encode())
        return None if value is None else value.decode("ascii", "replace")

    async def query(self, sql: str) -> list[Row]:
        """Run one simple-protocol statement; the rows of its last result (text)."""
        result = await self._run(sql)
        if result is None:
            return []
        return [
            tuple(None if (v := result.get_value(i, j)) is None else v.decode() for j in range(result.nfields))
            for i in range(result.ntuples)
        ]

    async def start_copy_both(self, sql: str) -> None:
        """Send START_REPLICATION; returns once the server answered COPY BOTH."""
        result = await self._run(sql, copy_both=True)
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise LibpqError("the server did not start streaming")

    async def _run(self, sql: str, *, copy_both: bool = False) -> pq.abc.PGresult | None:
        conn = self._conn
        try:
            conn.send_query(sql.encode())
        except Exception as exc:
            raise LibpqError(_text(conn.error_message) or str(exc)) from exc
        await self._flush()
        last: pq.abc.PGresult | None = None
        error: LibpqError | None = None
        while True:
            while conn.is_busy():
                await _wait(conn.socket)
                self._consume()
            result = conn.get_result()
            if result is None:
                break
            if result.status == pq.ExecStatus.FATAL_ERROR:
                sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
                error = error or LibpqError(_text(result.error_message), sqlstate.decode() if sqlstate else None)
            elif result.status == pq.ExecStatus.COPY_BOTH and copy_both:
                return result
            else:
                last = result
        if error is not None:
            raise error
        return last

    def _consume(self) -> None:
        try:
            self._conn.consume_input()
        except Exception as exc:
            raise LibpqError(_text(self._conn.error_message) or str(exc)) from exc

    async def _flush(self) -> None:
        while True:
            try:
                pending = self._conn.flush()
            except Exception as exc:
                raise LibpqError(_text(self._conn.error_message) or str(exc)) from exc
            if pending == 0:
                return
            await _wait(self._conn.socket, write=True)

    # --- COPY BOTH ----------------------------------------------------------------------

    async def read_copy(self, timeout: float, limit: int = 256) -> list[bytes]:
        """The CopyData messages available now (at most `limit`: the caller yields to the loop
        between batches), waiting up to `timeout` for the first ([] on timeout). Raises
        LibpqError once the stream has ended, with the server's why."""
        if self._ended is not None:
            raise self._ended
        conn = self._conn
        out: list[bytes] = []
        waited = False
        while True:
            self._consume()
            got = False
            while len(out) < limit:
                try:
                    n, data = conn.get_copy_data(1)
                except Exception as exc:  # -2: the connection failed
                    self._ended = LibpqError(_text(conn.error_message) or str(exc))
                    break
                if n > 0:
                    raw = data.obj
                    out.append(raw if isinstance(raw, bytes) else bytes(data))
                    got = True
                    continue
                if n == 0:
                    break
                self._ended = self._end_of_copy(n)
                break
            if self._ended is not None:
                if out:
                    return out  # the messages before the end still count
                raise self._ended
            if len(out) >= limit:
                return out
            if got:
                continue  # libpq may hold more (TLS): consume again before waiting
            if out or waited:
                return out
            try:
                async with asyncio.timeout(timeout):
                    await _wait(conn.socket)
            except TimeoutError:
                return out
            waited = True

    def _end_of_copy(self, n: int) -> LibpqError:
        conn = self._conn
        why = _text(conn.error_message)
        if n == -1:  # the server ended COPY: its reason follows as a result
            while not conn.is_busy() and (result := conn.get_result()) is not None:
                if result.status == pq.ExecStatus.FATAL_ERROR:
                    why = _text(result.error_message)
        return LibpqError(f"the origin ended the replication stream: {why or 'no reason given'}")

    async def write_copy(self, data: bytes) -> None:
        try:
            if self._conn.put_copy_data(data) != 1:
                raise LibpqError(_text(self._conn.error_message) or "cannot send to the origin")
        except LibpqError:
            raise
        except Exception as exc:
            raise LibpqError(_text(self._conn.error_message) or str(exc)) from exc
        await self._flush()

    def close(self) -> None:
        self._conn.finish()


def _log_notice(result: pq.abc.PGresult) -> None:
    log.debug("origin notice: %s", _text(result.error_message))


async def _wait(fd: int, *, write: bool = False) -> None:
    """Until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add: Callable[..., None] = loop.add_writer if write else loop.add_reader
    remove: Callable[[int], bool] = loop.remove_writer if write else loop.remove_reader
    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


def python_encoding(server_encoding: str | None) -> str:
    """Python's codec for a PostgreSQL encoding name (UTF-8 when unknown or SQL_ASCII)."""
    if not server_encoding or server_encoding == "SQL_ASCII":  # bytes as clients wrote them
        return "utf-8"
    try:
        return pg2pyenc(server_encoding.encode())
    except (NotSupportedError, LookupError):
        return "utf-8"

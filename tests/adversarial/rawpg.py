"""A raw PostgreSQL protocol client: exact control over extended-protocol batches."""

from __future__ import annotations

import asyncio
import contextlib
import struct

from neonpoly import pgwire

Message = tuple[bytes, bytes]
SYNC = pgwire.frame(b"S")


def parse(name: str, sql: str) -> bytes:
    return pgwire.frame(b"P", pgwire.cstr(name) + pgwire.cstr(sql) + struct.pack("!h", 0))


def bind(portal: str, statement: str, params: tuple[str, ...] = ()) -> bytes:
    body = pgwire.cstr(portal) + pgwire.cstr(statement) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        raw = p.encode()
        body += struct.pack("!i", len(raw)) + raw
    return pgwire.frame(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "", rows: int = 0) -> bytes:
    return pgwire.frame(b"E", pgwire.cstr(portal) + struct.pack("!i", rows))


def close_statement(name: str) -> bytes:
    return pgwire.frame(b"C", b"S" + pgwire.cstr(name))


def describe_statement(name: str = "") -> bytes:
    return pgwire.frame(b"D", b"S" + pgwire.cstr(name))


def describe_portal(name: str = "") -> bytes:
    return pgwire.frame(b"D", b"P" + pgwire.cstr(name))


def query(sql: str) -> bytes:
    return pgwire.frame(b"Q", pgwire.cstr(sql))


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, user: str = "trust_user", database: str = "app") -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        writer.write(pgwire.build_startup({"user": user, "database": database}))
        msgs = await raw.until_ready()
        assert not [m for m in msgs if m[0] == b"E"], msgs
        return raw

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def message(self, timeout: float = 10.0) -> Message:
        head = await asyncio.wait_for(self.reader.readexactly(5), timeout)
        size = struct.unpack("!i", head[1:])[0] - 4
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        return head[:1], body

    async def until_ready(self, timeout: float = 10.0) -> list[Message]:
        out = []
        while True:
            msg = await self.message(timeout)
            out.append(msg)
            if msg[0] == b"Z":
                return out

    async def close(self) -> None:
        self.writer.write(pgwire.frame(b"X"))
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def rows(msgs: list[Message]) -> list[list[bytes | None]]:
    return [pgwire.parse_data_row(body) for t, body in msgs if t == b"D"]


def kinds(msgs: list[Message]) -> bytes:
    return b"".join(t for t, _ in msgs)

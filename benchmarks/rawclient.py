"""A minimal PostgreSQL client speaking raw protocol frames, for the in-process benchmark.

It sends exactly the bytes pgbench sends (a simple Query; or Bind/Describe/Execute/Sync of a
statement parsed once) and reads up to ReadyForQuery, with as little client-side work as
possible, so that what is measured is the proxy. Logs in with SCRAM-SHA-256 or a cleartext
or trust login. It imports nothing of neonpoly: `inprocess.py --compare` loads another tree's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import struct

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")


class _Wire:
    """The few frame helpers this client needs."""

    @staticmethod
    def frame(mtype: bytes, body: bytes = b"") -> bytes:
        return mtype + _I32.pack(len(body) + 4) + body

    @staticmethod
    def cstr(value: str) -> bytes:
        return value.encode() + b"\x00"

    @staticmethod
    def build_startup(params: dict[str, str]) -> bytes:
        body = struct.pack("!i", 196608) + b"".join(_Wire.cstr(k) + _Wire.cstr(v) for k, v in params.items()) + b"\x00"
        return _I32.pack(len(body) + 4) + body

    @staticmethod
    def parse_error_fields(body: bytes) -> dict[str, str]:
        return {part[:1].decode(): part[1:].decode(errors="replace") for part in body.split(b"\x00") if part}


pgwire = _Wire


def query(sql: str) -> bytes:
    return pgwire.frame(b"Q", pgwire.cstr(sql))


def parse(name: str, sql: str) -> bytes:
    return pgwire.frame(b"P", pgwire.cstr(name) + pgwire.cstr(sql) + struct.pack("!h", 0))


def bind_describe_execute_sync(statement: str, params: tuple[str, ...]) -> bytes:
    """What libpq's PQsendQueryPrepared sends (pgbench -M prepared)."""
    body = b"\x00" + pgwire.cstr(statement) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        raw = p.encode()
        body += _I32.pack(len(raw)) + raw
    body += struct.pack("!h", 0)
    return (
        pgwire.frame(b"B", body)
        + pgwire.frame(b"D", b"P\x00")
        + pgwire.frame(b"E", b"\x00" + _I32.pack(0))
        + pgwire.frame(b"S")
    )


SYNC = pgwire.frame(b"S")


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, user: str, password: str, database: str) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(pgwire.build_startup({"user": user, "database": database, "application_name": "bench"}))
        await client._login(user, password)
        return client

    async def _login(self, user: str, password: str) -> None:
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first_bare = f"n=,r={nonce}"
        salted = b""
        auth_message = ""
        while True:
            kind, body = await self.message()
            if kind == b"E":
                raise RuntimeError(f"login refused: {pgwire.parse_error_fields(body).get('M')}")
            if kind == b"Z":
                return
            if kind != b"R":
                continue
            code = _I32.unpack_from(body)[0]
            if code == 3:  # cleartext
                self.writer.write(pgwire.frame(b"p", pgwire.cstr(password)))
            elif code == 10:  # SASL: start SCRAM-SHA-256
                first = ("n,," + first_bare).encode()
                self.writer.write(pgwire.frame(b"p", pgwire.cstr("SCRAM-SHA-256") + _I32.pack(len(first)) + first))
            elif code == 11:  # SASL continue: the server's first message
                server_first = body[4:].decode()
                fields = dict(item.split("=", 1) for item in server_first.split(","))
                salted = hashlib.pbkdf2_hmac(
                    "sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
                )
                final_bare = f"c=biws,r={fields['r']}"
                auth_message = f"{first_bare},{server_first},{final_bare}"
                client_key = hmac.digest(salted, b"Client Key", "sha256")
                signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message.encode(), "sha256")
                proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
                self.writer.write(pgwire.frame(b"p", f"{final_bare},p={proof}".encode()))
            elif code == 12:  # SASL final: check the server knew the password too
                server_key = hmac.digest(salted, b"Server Key", "sha256")
                expected = base64.b64encode(hmac.digest(server_key, auth_message.encode(), "sha256")).decode()
                if body[4:].decode() != f"v={expected}":
                    raise RuntimeError("the server's SCRAM signature does not match")
            elif code != 0:
                raise RuntimeError(f"unsupported authentication request {code}")

    async def message(self) -> tuple[bytes, bytes]:
        kind, size = _HDR.unpack(await self.reader.readexactly(5))
        return kind, await self.reader.readexactly(size - 4)

    async def request(self, data: bytes) -> bytes:
        """Send a request, read its whole response (up to ReadyForQuery); an error raises."""
        self.writer.write(data)
        failed = None
        while True:
            kind, body = await self.message()
            if kind == b"E":
                failed = pgwire.parse_error_fields(body).get("M")
            elif kind == b"Z":
                if failed is not None:
                    raise RuntimeError(failed)
                return body

    async def close(self) -> None:
        self.writer.write(pgwire.frame(b"X"))
        self.writer.close()

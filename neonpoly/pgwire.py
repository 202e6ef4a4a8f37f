"""PostgreSQL protocol v3 codec: bytes in, frames out. No I/O, no neonpoly imports.

The proxy forwards bytes untouched by default, so the codec's main job is to find frame
boundaries cheaply (`scan_frames`) and to decode or build only the handful of messages a
decision needs. Everything here works on `bytes`/`bytearray` and returns plain values.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# PostgreSQL's own limits (pqcomm.h / postmaster.c): a startup packet may not exceed 10000
# bytes, "small" messages 10000 bytes, everything else 1 GB - 1. Enforcing them means a
# length field of 2 GB is refused before a single byte is buffered for it.
MAX_STARTUP_LENGTH = 10000
SMALL_MESSAGE_LIMIT = 10000
LARGE_MESSAGE_LIMIT = 0x3FFFFFFF

# --- message types ----------------------------------------------------------------------
#
# Named as PostgreSQL names them in src/include/libpq/protocol.h (which pgbouncer's
# include/common/protocol.h copies): PqMsg_ReadyForQuery is MSG_READY_FOR_QUERY here. The
# MSG_ prefix keeps them apart from the ready-made frames at the end of this module
# (PARSE_COMPLETE, NO_DATA ...), whose names are older than these.
#
# Convention: a message type is an `int`, the type byte as `scan_frames` reports it and as
# indexing `bytes` reads it, so the relay compares it as it comes (`mtype == MSG_SYNC`, a
# plain int comparison in its per-frame loops) and keeps sets of them as frozenset[int].
# `frame()` takes the same int. The same byte means different messages in the two
# directions ('D' is Describe from a client, DataRow from a server).

# Sent by the client.
MSG_BIND = ord("B")
MSG_CLOSE = ord("C")
MSG_DESCRIBE = ord("D")
MSG_EXECUTE = ord("E")
MSG_FUNCTION_CALL = ord("F")
MSG_FLUSH = ord("H")
MSG_PARSE = ord("P")
MSG_QUERY = ord("Q")
MSG_SYNC = ord("S")
MSG_TERMINATE = ord("X")
MSG_COPY_FAIL = ord("f")
MSG_PASSWORD_MESSAGE = ord("p")  # as are GSSResponse, SASLInitialResponse and SASLResponse

# Sent by either side.
MSG_COPY_DONE = ord("c")
MSG_COPY_DATA = ord("d")

# Sent by the server.
MSG_PARSE_COMPLETE = ord("1")
MSG_BIND_COMPLETE = ord("2")
MSG_CLOSE_COMPLETE = ord("3")
MSG_NOTIFICATION_RESPONSE = ord("A")
MSG_COMMAND_COMPLETE = ord("C")
MSG_DATA_ROW = ord("D")
MSG_ERROR_RESPONSE = ord("E")
MSG_COPY_IN_RESPONSE = ord("G")
MSG_COPY_OUT_RESPONSE = ord("H")
MSG_EMPTY_QUERY_RESPONSE = ord("I")
MSG_BACKEND_KEY_DATA = ord("K")
MSG_NOTICE_RESPONSE = ord("N")
MSG_AUTHENTICATION_REQUEST = ord("R")
MSG_PARAMETER_STATUS = ord("S")
MSG_ROW_DESCRIPTION = ord("T")
MSG_FUNCTION_CALL_RESPONSE = ord("V")
MSG_COPY_BOTH_RESPONSE = ord("W")
MSG_READY_FOR_QUERY = ord("Z")
MSG_NO_DATA = ord("n")
MSG_PORTAL_SUSPENDED = ord("s")
MSG_PARAMETER_DESCRIPTION = ord("t")
MSG_NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Frontend message types a client may send after startup, and which of them are "large".
FRONTEND_TYPES = frozenset(
    (
        MSG_QUERY, MSG_PARSE, MSG_BIND, MSG_EXECUTE, MSG_DESCRIBE, MSG_CLOSE, MSG_SYNC, MSG_FLUSH,
        MSG_TERMINATE, MSG_COPY_DATA, MSG_COPY_DONE, MSG_COPY_FAIL, MSG_PASSWORD_MESSAGE, MSG_FUNCTION_CALL,
    )
)
FRONTEND_LARGE_TYPES = frozenset(
    (MSG_QUERY, MSG_PARSE, MSG_BIND, MSG_COPY_DATA, MSG_PASSWORD_MESSAGE, MSG_FUNCTION_CALL)
)

# Transaction status, the body of ReadyForQuery.
TX_IDLE = b"I"
TX_IN_BLOCK = b"T"
TX_FAILED = b"E"  # in a failed transaction block

# What a Describe or Close names: a prepared statement or a portal.
TARGET_STATEMENT = b"S"
TARGET_PORTAL = b"P"

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!Bi")
_I16 = struct.Struct("!h")


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid protocol stream (SQLSTATE 08P01)."""


def take(pending: bytearray, used: int) -> bytes:
    """The first `used` bytes, out of the buffer: one copy when they are all of it (the
    common case, a read of whole messages), not a slice copied again."""
    if used == len(pending):
        taken = bytes(pending)
        pending.clear()
        return taken
    with memoryview(pending) as view, view[:used] as head:
        taken = bytes(head)
    del pending[:used]  # after the views are released: a bytearray with views cannot shrink
    return taken


def scan_frames(
    buf: bytes | bytearray | memoryview,
    start: int = 0,
    *,
    allowed: frozenset[int] | None = None,
    large: frozenset[int] | None = None,
) -> tuple[list[tuple[int, int, int]], int]:
    """Split `buf[start:]` into complete typed frames.

    Returns ([(type, frame_start, frame_end), ...], offset of the first incomplete frame).
    `allowed`, when given, is the set of legal type bytes; `large` the types allowed to
    exceed SMALL_MESSAGE_LIMIT. Raises ProtocolViolation on an illegal type or length.
    """
    frames: list[tuple[int, int, int]] = []
    n = len(buf)
    pos = start
    unpack = _I32.unpack_from
    while n - pos >= 5:
        mtype = buf[pos]
        length = unpack(buf, pos + 1)[0]
        if allowed is not None and mtype not in allowed:
            raise ProtocolViolation(f"invalid message type 0x{mtype:02x}")
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        limit = LARGE_MESSAGE_LIMIT if large is None or mtype in large else SMALL_MESSAGE_LIMIT
        if length > limit:
            raise ProtocolViolation(f"message length {length} exceeds the limit of {limit}")
        end = pos + 1 + length
        if end > n:
            break
        frames.append((mtype, pos, end))
        pos = end
    return frames, pos


def frame(mtype: int | bytes, body: bytes = b"") -> bytes:
    """One message: a MSG_* type (or the type as one byte, b"Q"), the length, the body."""
    return _HDR.pack(mtype if isinstance(mtype, int) else ord(mtype), len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def read_cstr(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode("utf-8", "replace"), end + 1


# --- startup phase ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupRequest:
    """The first packet of a connection (it has no type byte)."""

    code: int
    raw: bytes
    params: Mapping[str, str]
    cancel_key: tuple[int, bytes] | None = None

    @property
    def is_ssl(self) -> bool:
        return self.code == SSL_REQUEST_CODE

    @property
    def is_gssenc(self) -> bool:
        return self.code == GSSENC_REQUEST_CODE

    @property
    def is_cancel(self) -> bool:
        return self.code == CANCEL_REQUEST_CODE


def parse_startup(buf: bytes | bytearray) -> tuple[StartupRequest | None, int]:
    """Decode one startup-phase packet from the front of `buf`: (packet or None, bytes used)."""
    if len(buf) < 8:
        return None, 0
    length = _I32.unpack_from(buf, 0)[0]
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None, 0
    raw = bytes(buf[:length])
    code = _I32.unpack_from(raw, 4)[0]
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        return StartupRequest(code, raw, {}), length
    if code == CANCEL_REQUEST_CODE:
        if length < 16:
            raise ProtocolViolation("truncated cancel request")
        pid = _I32.unpack_from(raw, 8)[0]
        return StartupRequest(code, raw, {}, (pid, raw[12:])), length
    if code >> 16 != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    if not raw.endswith(b"\x00"):  # as PostgreSQL's ProcessStartupPacket insists
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    params: dict[str, str] = {}
    parts = raw[8:].split(b"\x00")
    # The packet ends with an empty name; pairs before it are name, value.
    try:
        for i in range(0, len(parts) - 1, 2):
            if not parts[i]:
                break
            params[parts[i].decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    except IndexError as exc:
        raise ProtocolViolation("malformed startup packet") from exc
    return StartupRequest(code, raw, params), length


def build_startup(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(protocol) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: bytes) -> bytes:
    return _I32.pack(12 + len(secret)) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + secret


# --- backend messages -----------------------------------------------------------------


def ready_for_query(status: bytes) -> bytes:
    return _READY_FOR_QUERY.get(status) or frame(MSG_READY_FOR_QUERY, status)


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return frame(MSG_BACKEND_KEY_DATA, _I32.pack(pid) + secret)


def parameter_status(name: str, value: str) -> bytes:
    return frame(MSG_PARAMETER_STATUS, cstr(name) + cstr(value))


def parse_parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    b = bytes(body)
    name, _, rest = b.partition(b"\x00")
    value, _, _ = rest.partition(b"\x00")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate), b"M" + cstr(message)]
    if detail:
        fields.append(b"D" + cstr(detail))
    if hint:
        fields.append(b"H" + cstr(hint))
    return frame(MSG_ERROR_RESPONSE, b"".join(fields) + b"\x00")


def parse_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body → {field code: value}, e.g. {'C': '57014'}."""
    out: dict[str, str] = {}
    b = bytes(body)
    pos = 0
    while pos < len(b) and b[pos] != 0:
        code = chr(b[pos])
        end = b.index(b"\x00", pos + 1)
        out[code] = b[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return out


AUTH_SASL = 10


def strip_scram_plus(body: bytes) -> bytes:
    """Remove SCRAM-SHA-256-PLUS from an AuthenticationSASL body.

    Channel binding ties SCRAM to the TLS session the client sees; a proxy that terminates
    TLS makes that binding impossible, so the client must pick plain SCRAM-SHA-256.
    """
    mechanisms = [m for m in body[4:].split(b"\x00") if m and not m.endswith(b"-PLUS")]
    return body[:4] + b"".join(m + b"\x00" for m in mechanisms) + b"\x00"


def auth_code(body: bytes | memoryview) -> int:
    return int(_I32.unpack_from(body, 0)[0])


def parse_data_row(body: bytes) -> list[bytes | None]:
    count = _I16.unpack_from(body, 0)[0]
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        size = _I32.unpack_from(body, pos)[0]
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + size])
            pos += size
    return values


def command_complete(tag: str) -> bytes:
    return frame(MSG_COMMAND_COMPLETE, cstr(tag))


# --- extended query protocol (frontend) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ParseMsg:
    name: str
    query: str
    param_types: bytes  # raw int32 OIDs, kept as bytes: they are only compared and replayed


@dataclass(frozen=True, slots=True)
class BindMsg:
    portal: str
    statement: str
    # Everything after the statement name (formats, values, result formats) as raw bytes:
    # the cache key needs exactly these bytes, and nothing else needs them decoded.
    tail: bytes


@dataclass(frozen=True, slots=True)
class TargetMsg:
    """Describe or Close: kind is TARGET_STATEMENT or TARGET_PORTAL."""

    kind: bytes
    name: str


@dataclass(frozen=True, slots=True)
class ExecuteMsg:
    portal: str
    max_rows: int


def parse_parse(body: bytes) -> ParseMsg:
    name, pos = read_cstr(body, 0)
    query, pos = read_cstr(body, pos)
    return ParseMsg(name, query, body[pos:])


def parse_bind(body: bytes) -> BindMsg:
    portal, pos = read_cstr(body, 0)
    statement, pos = read_cstr(body, pos)
    return BindMsg(portal, statement, body[pos:])


def parse_target(body: bytes) -> TargetMsg:
    name, _ = read_cstr(body, 1)
    return TargetMsg(body[:1], name)


def parse_execute(body: bytes) -> ExecuteMsg:
    portal, pos = read_cstr(body, 0)
    return ExecuteMsg(portal, _I32.unpack_from(body, pos)[0])


def build_parse(msg: ParseMsg) -> bytes:
    return frame(MSG_PARSE, cstr(msg.name) + cstr(msg.query) + msg.param_types)


def close_statement(name: str) -> bytes:
    """A Close of a prepared statement."""
    return frame(MSG_CLOSE, TARGET_STATEMENT + cstr(name))


def text_array(values: Iterable[str]) -> str:
    """A text[] value in PostgreSQL's input syntax (every element quoted), for a parameter."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def extended_request(statement: str, sql: str, params: list[str]) -> bytes:
    """One statement of the proxy's own, run with text parameters in the client's idle session:
    Close, Parse, Bind (unnamed portal), Execute, Close, Sync. A named statement, so the
    client's unnamed one survives; closed before and after, so nothing is left behind."""
    name = cstr(statement)
    bind = b"\x00" + name + b"\x00\x00" + len(params).to_bytes(2, "big")
    for value in params:
        data = value.encode()
        bind += len(data).to_bytes(4, "big") + data
    bind += b"\x00\x00"
    return (
        close_statement(statement)
        + frame(MSG_PARSE, name + cstr(sql) + b"\x00\x00")
        + frame(MSG_BIND, bind)
        + frame(MSG_EXECUTE, b"\x00\x00\x00\x00\x00")
        + close_statement(statement)
        + frame(MSG_SYNC)
    )


def query_text(body: bytes) -> str:
    """The SQL of a simple Query message (its body minus the trailing NUL)."""
    return body[:-1].decode("utf-8", "replace") if body.endswith(b"\x00") else body.decode("utf-8", "replace")


# Ready-made frames.
PARSE_COMPLETE = frame(MSG_PARSE_COMPLETE)
BIND_COMPLETE = frame(MSG_BIND_COMPLETE)
CLOSE_COMPLETE = frame(MSG_CLOSE_COMPLETE)
NO_DATA = frame(MSG_NO_DATA)
EMPTY_QUERY = frame(MSG_EMPTY_QUERY_RESPONSE)
AUTH_OK = frame(MSG_AUTHENTICATION_REQUEST, _I32.pack(0))
_READY_FOR_QUERY = {status: frame(MSG_READY_FOR_QUERY, status) for status in (TX_IDLE, TX_IN_BLOCK, TX_FAILED)}

# The one-byte answers to SSLRequest and GSSENCRequest (no frame around them).
SSL_NO = b"N"
SSL_YES = b"S"

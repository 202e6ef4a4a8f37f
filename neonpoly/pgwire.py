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

# Frontend message types a client may send after startup, and which of them are "large".
FRONTEND_TYPES = frozenset(b"QPBEDCSHXdcfpF")
FRONTEND_LARGE_TYPES = frozenset(b"QPBdpF")
BACKEND_TYPES = frozenset(b"RKSZTDCIEN1234nstAcdGHWfVv")

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid protocol stream (SQLSTATE 08P01)."""


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


def frame(mtype: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(mtype, len(body) + 4) + body


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
    return frame(b"Z", status)


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return frame(b"K", _I32.pack(pid) + secret)


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstr(name) + cstr(value))


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
    return frame(b"E", b"".join(fields) + b"\x00")


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


def row_description(columns: Iterable[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    cols = list(columns)
    parts = [_I16.pack(len(cols))]
    typlen = {16: 1, 20: 8, 21: 2, 23: 4, 700: 4, 701: 8}
    for name, oid in cols:
        parts.append(cstr(name) + struct.pack("!ihihih", 0, 0, oid, typlen.get(oid, -1), -1, 0))
    return frame(b"T", b"".join(parts))


def data_row(values: Iterable[str | None]) -> bytes:
    parts: list[bytes] = []
    vals = list(values)
    parts.append(_I16.pack(len(vals)))
    for v in vals:
        if v is None:
            parts.append(_I32.pack(-1))
        else:
            enc = v.encode()
            parts.append(_I32.pack(len(enc)) + enc)
    return frame(b"D", b"".join(parts))


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
    return frame(b"C", cstr(tag))


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
    """Describe or Close: kind is b'S' (statement) or b'P' (portal)."""

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
    return frame(b"P", cstr(msg.name) + cstr(msg.query) + msg.param_types)


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
        frame(b"C", b"S" + name)
        + frame(b"P", name + cstr(sql) + b"\x00\x00")
        + frame(b"B", bind)
        + frame(b"E", b"\x00\x00\x00\x00\x00")
        + frame(b"C", b"S" + name)
        + frame(b"S")
    )


def query_text(body: bytes) -> str:
    """The SQL of a simple Query message (its body minus the trailing NUL)."""
    return body[:-1].decode("utf-8", "replace") if body.endswith(b"\x00") else body.decode("utf-8", "replace")


PARSE_COMPLETE = frame(b"1")
BIND_COMPLETE = frame(b"2")
CLOSE_COMPLETE = frame(b"3")
NO_DATA = frame(b"n")
EMPTY_QUERY = frame(b"I")
SSL_NO = b"N"
SSL_YES = b"S"
AUTH_OK = frame(b"R", _I32.pack(0))

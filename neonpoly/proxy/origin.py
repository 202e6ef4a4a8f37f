"""Where the origin is and how to dial it: TCP, the SSLRequest dance, TLS with SNI."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from neonpoly import pgwire

TLS_MODES = ("require", "verify-ca", "verify-full")
SSL_MODES = ("disable", "allow", "prefer", *TLS_MODES)


class OriginUnavailable(Exception):
    """The origin could not be reached; the message names it (sent to clients as 08001)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """A PostgreSQL server neonpoly relays to.

    `connect_host`/`connect_port` is where we dial; `host` is the name we send as TLS SNI.
    They differ only under a curl-like `--connect-to` override, which lets a local server
    stand in for a Neon endpoint while the real host name still travels as SNI.
    """

    host: str
    port: int
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    connect_host: str | None = None
    connect_port: int | None = None
    user: str | None = None
    password: str | None = None
    database: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError(f"not a postgres URL: {url!r} (expected postgres://host:port/db)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = parts.hostname or query.get("host") or "127.0.0.1"
        try:
            port = parts.port or int(query.get("port", "5432"))
        except ValueError as exc:
            raise ValueError(f"invalid port in {url!r}") from exc
        sslmode = query.get("sslmode", "prefer")
        if sslmode not in SSL_MODES:
            raise ValueError(f"sslmode={sslmode!r} in the URL is not one of {', '.join(SSL_MODES)}")
        return cls(
            host=host,
            port=port,
            sslmode=sslmode,
            sslrootcert=query.get("sslrootcert"),
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            database=unquote(parts.path.lstrip("/")) or None,
        )

    def connecting_to(self, host: str, port: int) -> Origin:
        return replace(self, connect_host=host, connect_port=port)

    @property
    def label(self) -> str:
        """How the origin is named in errors and logs (never includes a password)."""
        return f"{self.host}:{self.port}"

    @property
    def dial(self) -> tuple[str, int]:
        return (self.connect_host or self.host, self.connect_port or self.port)

    def ssl_context(self) -> ssl.SSLContext:
        if self.sslmode in ("verify-ca", "verify-full"):
            ctx = ssl.create_default_context(cafile=self.sslrootcert)
            ctx.check_hostname = self.sslmode == "verify-full"
        else:
            # libpq's `require` encrypts without verifying; we match its meaning.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class _FirstByte(asyncio.Protocol):
    """Collects the single-byte answer to SSLRequest before TLS starts."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("origin closed the connection"))


async def open_origin(origin: Origin, protocol: asyncio.Protocol, timeout: float = 10.0) -> asyncio.Transport:
    """Connect to the origin, negotiate TLS as its sslmode asks, and attach `protocol`."""
    loop = asyncio.get_running_loop()
    host, port = origin.dial
    try:
        async with asyncio.timeout(timeout):
            transport, probe = await loop.create_connection(_FirstByte, host, port)
            if _is_loopback(host):
                limit_socket_buffer(transport, socket.SO_RCVBUF)
            if origin.sslmode in ("disable", "allow"):
                transport.set_protocol(protocol)
                protocol.connection_made(transport)
                return transport
            transport.write(pgwire.ssl_request())
            answer = await probe.answer
            if answer[:1] == pgwire.SSL_YES:
                tls = await loop.start_tls(transport, protocol, origin.ssl_context(), server_hostname=origin.host)
                if tls is None:  # pragma: no cover - only when the loop is closing
                    raise ConnectionError("TLS handshake aborted")
                if _is_loopback(host):
                    # The TLS layer reads ahead into a buffer of its own (256 KiB by default).
                    with contextlib.suppress(AttributeError, NotImplementedError):
                        tls.set_read_buffer_limits(high=RELAY_SOCKET_BUFFER)  # type: ignore[attr-defined]
                protocol.connection_made(tls)
                return tls
            if origin.sslmode in TLS_MODES:
                transport.close()
                raise OriginUnavailable(f"origin {origin.label} refused TLS (sslmode={origin.sslmode})")
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return transport
    except OriginUnavailable:
        raise
    except TimeoutError as exc:
        raise OriginUnavailable(f"could not connect to origin {origin.label}: timed out") from exc
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OriginUnavailable(f"could not connect to origin {origin.label}: {reason}") from exc


# Kernel buffering a relay adds on each side. While the client does not read, neonpoly stops
# reading the origin; with the kernel's autotuned buffers (megabytes) between, the origin could
# still finish a large COPY or result the client is abandoning, so a cancel arrives too late
# where on a direct connection it would have stopped the statement. Small buffers on the local
# legs keep neonpoly's extra buffering near zero; a remote origin keeps autotuning (its window
# must cover the round trip).
RELAY_SOCKET_BUFFER = 64 * 1024


def limit_socket_buffer(transport: asyncio.BaseTransport, option: int) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, RELAY_SOCKET_BUFFER)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def send_cancel(origin: Origin, pid: int, secret: bytes, timeout: float = 5.0) -> None:
    """Deliver a CancelRequest for an origin backend (over TLS when the origin wants it)."""
    sink = _Sink()
    transport = await open_origin(origin, sink, timeout)
    transport.write(pgwire.cancel_request(pid, secret))
    # The server closes the socket once it has read the request; wait for that briefly
    # so the cancel is delivered before we return.
    try:
        async with asyncio.timeout(timeout):
            await sink.closed
    except TimeoutError:
        transport.close()

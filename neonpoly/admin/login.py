"""How an admin session proves who it is: a password of neonpoly's own (SCRAM-SHA-256), or a
login to an origin relayed as for a normal session (the origin checks the role's password).

Each login reads the client's authentication messages and ends by calling `admit()` or
`refuse(sqlstate, message, hint)` of its `LoginHost` (the admin session).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import struct
from typing import Protocol

from neonpoly import pgwire
from neonpoly.proxy.origin import Origin, OriginUnavailable, open_origin

log = logging.getLogger("neonpoly.admin")

SCRAM_ITERATIONS = 4096
_SASL, _SASL_CONTINUE, _SASL_FINAL, _AUTH_OK = 10, 11, 12, 0


class LoginHost(Protocol):
    @property
    def user(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def admit(self) -> None: ...

    def refuse(self, sqlstate: str, message: str, hint: str | None = None) -> None: ...


def _auth(code: int, payload: bytes = b"") -> bytes:
    return pgwire.frame(b"R", struct.pack("!i", code) + payload)


class ScramVerifier:
    """neonpoly's own admin password as PostgreSQL keeps one (salt, iterations, keys)."""

    def __init__(self, password: str, iterations: int = SCRAM_ITERATIONS) -> None:
        self.salt = secrets.token_bytes(16)
        self.iterations = iterations
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, iterations)
        self.stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
        self.server_key = hmac.digest(salted, b"Server Key", "sha256")


class ScramLogin:
    """The server side of SCRAM-SHA-256 (RFC 7677, without channel binding), as PostgreSQL."""

    def __init__(self, host: LoginHost, verifier: ScramVerifier) -> None:
        self.host = host
        self.verifier = verifier
        self.client_first_bare = ""
        self.server_first = ""
        self.nonce = ""

    def start(self) -> None:
        self.host.write(_auth(_SASL, b"SCRAM-SHA-256\x00\x00"))

    def client(self, mtype: int, body: bytes) -> None:
        if mtype != pgwire.MSG_PASSWORD_MESSAGE:
            self._fail()
        elif not self.server_first:
            self._first(body)
        else:
            self._final(body)

    def _fail(self) -> None:
        self.host.refuse("28P01", f'password authentication failed for user "{self.host.user}"')

    def _first(self, body: bytes) -> None:
        try:
            mechanism, pos = pgwire.read_cstr(body, 0)
            (length,) = struct.unpack_from("!i", body, pos)
            message = body[pos + 4 : pos + 4 + length].decode()
            flag, _, rest = message.partition(",")
            bare = rest.partition(",")[2]  # after the gs2 header "n,," (no authzid)
            attrs = dict(a.split("=", 1) for a in bare.split(",") if "=" in a)
            client_nonce = attrs["r"]
        except (struct.error, UnicodeDecodeError, ValueError, KeyError):
            self._fail()
            return
        if mechanism != "SCRAM-SHA-256" or flag not in ("n", "y"):
            self._fail()
            return
        self.client_first_bare = bare
        self.nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self.verifier.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={self.verifier.iterations}"
        self.host.write(_auth(_SASL_CONTINUE, self.server_first.encode()))

    def _final(self, body: bytes) -> None:
        try:
            message = body.decode()
            without_proof, _, proof_b64 = message.rpartition(",p=")
            attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
            proof = base64.b64decode(proof_b64, validate=True)
        except (UnicodeDecodeError, ValueError):
            self._fail()
            return
        if attrs.get("r") != self.nonce or len(proof) != 32:
            self._fail()
            return
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.digest(self.verifier.stored_key, auth_message, "sha256")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.verifier.stored_key):
            self._fail()
            return
        server_signature = hmac.digest(self.verifier.server_key, auth_message, "sha256")
        self.host.write(_auth(_SASL_FINAL, b"v=" + base64.b64encode(server_signature)))
        self.host.admit()


class OriginLogin(asyncio.Protocol):
    """Relays the client's login to `origin` as a normal session would; a login the origin
    accepts admits the client (the origin connection is closed at once). `need_password`:
    an origin that lets the role in without asking for a password does not admit it."""

    def __init__(self, host: LoginHost, origin: Origin, *, need_password: bool, timeout: float = 10.0) -> None:
        self.host = host
        self.origin = origin
        self.need_password = need_password
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.buf = bytearray()
        self.challenged = False
        self.done = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            transport = await open_origin(self.origin, self, self.timeout)
        except OriginUnavailable as exc:
            self._end("08001", f"cannot check the admin login: {exc}")
            return
        if self.done:
            transport.close()
            return
        self.transport = transport
        params = {
            "user": self.host.user,
            "database": self.origin.database or "postgres",
            "application_name": "neonpoly admin login",
        }
        transport.write(pgwire.build_startup(params) + b"".join(self.pending))
        self.pending.clear()

    def client(self, mtype: int, body: bytes) -> None:
        if mtype != pgwire.MSG_PASSWORD_MESSAGE:
            self._end("08P01", "expected a password message during the admin login")
            return
        message = pgwire.frame(mtype, body)
        if self.transport is None:
            self.pending.append(message)
        else:
            self.transport.write(message)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        frames, used = pgwire.scan_frames(self.buf)
        raw = bytes(self.buf[:used])
        del self.buf[:used]
        for mtype, start, end in frames:
            if self.done:
                return
            body = raw[start + 5 : end]
            if mtype == pgwire.MSG_ERROR_RESPONSE:
                fields = pgwire.parse_error_fields(body)
                self._end(fields.get("C", "28000"), fields.get("M", "the origin refused the login"))
            elif mtype == pgwire.MSG_AUTHENTICATION_REQUEST and pgwire.auth_code(body) == _AUTH_OK:
                if self.need_password and not self.challenged:
                    self._end(
                        "28000",
                        f'the origin admits role "{self.host.user}" without a password, which does not '
                        "authenticate it for the admin database on a non-loopback listener",
                        "set NEONPOLY_ADMIN_PASSWORD on the neonpoly that serves it",
                    )
                else:
                    self._close()
                    self.host.admit()
            elif mtype == pgwire.MSG_AUTHENTICATION_REQUEST:
                self.challenged = True
                if pgwire.auth_code(body) == pgwire.AUTH_SASL:
                    body = pgwire.strip_scram_plus(body)  # the origin's TLS is not the client's
                self.host.write(pgwire.frame(mtype, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._end("08006", "the origin closed the connection during the admin login")

    def cancel(self) -> None:
        self.done = True
        self._close()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.write(pgwire.frame(pgwire.MSG_TERMINATE))
            self.transport.close()
            self.transport = None

    def _end(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        if self.done:
            return
        self._close()
        self.host.refuse(sqlstate, message, hint)

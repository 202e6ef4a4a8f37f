"""The servers a run starts and measures, each bound to 127.0.0.1 on a free port with its
configuration in the run's temporary directory: neonpoly (`neonpoly serve`, with or without its
cache), PgBouncer and pgpool-II; the origin's PostgreSQL settings (the origin itself is
neonpoly's `LocalPostgres`). Every one is stopped by its PID, and the CPU and memory of its
process tree are read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from neonpoly.integrations.embedded import free_port
from neonpoly.integrations.pgbin import RunAs, run_as

TARGETS = (
    "direct", "pgbouncer", "pgpool", "no-cache", "cache", "no-cache-2w", "cache-2w", "no-cache-base", "cache-base",
)
# Both neonpoly modes once more from another source tree (--baseline): a before/after in one
# run, where drift and the machine's other load hit both alike. Only run when asked.
BASELINE = ("no-cache-base", "cache-base")
COLUMNS = {
    "pgbouncer": "PgBouncer tx",
    "pgpool": "pgpool-II cache",
    "no-cache": "neonpoly --no-cache",
    "cache": "neonpoly cache",
    "no-cache-2w": "neonpoly --no-cache, 2 workers",
    "cache-2w": "neonpoly cache, 2 workers",
    "no-cache-base": "baseline --no-cache",
    "cache-base": "baseline cache",
}
CACHING = ("pgpool", "cache", "cache-2w", "cache-base")
# neonpoly's own targets and the `serve` options each one adds (`--workers 2`: the same proxy in
# two processes on one port, their private redis-server included in its CPU and memory).
NEONPOLY = {
    "no-cache": ["--no-cache"],
    "cache": ["--ttl", "600"],
    "no-cache-2w": ["--no-cache", "--workers", "2"],
    "cache-2w": ["--ttl", "600", "--workers", "2"],
    "no-cache-base": ["--no-cache"],
    "cache-base": ["--ttl", "600"],
}
SESSION_DB = "postgres_session"  # PgBouncer's alias of the origin's database in session pooling
PG_SETTINGS: dict[str, str | int | bool] = {
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "autovacuum": False,
    "jit": False,
    "max_parallel_workers_per_gather": 0,
    "shared_buffers": "256MB",
    "max_connections": 100,
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.max": 1000,
}


def target_label(target: str) -> str:
    return "direct" if target == "direct" else COLUMNS[target]


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


# --------------------------------------------------------------------------- process trees
def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu_seconds(pid: int) -> float | None:
    """utime+stime of every live process under pid, plus what their reaped children used."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if p == pid:
                return None
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def tree_memory_mb(pid: int) -> tuple[float | None, int]:
    """RSS of a lone process, or the sum of PSS over a tree (shared memory counted once)."""
    pids = _tree(pid)
    key = "VmRSS:" if len(pids) == 1 else "Pss:"
    total = 0
    for p in pids:
        path = f"/proc/{p}/status" if len(pids) == 1 else f"/proc/{p}/smaps_rollup"
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
                    break
    return (total / 1024 if total else None), len(pids)


# --------------------------------------------------------------------------- processes
class Service:
    """A server subprocess we started, its output in a log file; stopped by its PID."""

    label = "service"
    stop_signal = signal.SIGTERM

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, cwd: Path, env: dict[str, str] | None = None,
                 user: RunAs | None = None) -> None:  # fmt: skip
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        ids: dict[str, Any] = {}
        if user is not None:
            ids = {"user": user.uid, "group": user.gid, "extra_groups": []}
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, we stop it in order
                **ids,
            )
        except BaseException:
            self._log.close()
            raise

    def wait_ready(self, password: str, dbname: str = "postgres", timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "Traceback" in self.log_tail(400):
                raise RuntimeError(f"{self.label} logged a traceback:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                asyncio.run(_query_once(self.port, password, "SELECT 1", dbname))
                return
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"{self.label} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    port: int = 0

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid)

    def memory(self) -> tuple[float | None, int]:
        return tree_memory_mb(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def problems(self) -> list[str]:
        """Log lines that report something wrong."""
        out: list[str] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if re.search(r"\b(WARNING|ERROR|FATAL|CRITICAL|Traceback|Exception)\b", line):
                    out.append(f"[{self.name}] {line}")
        return out

    def stop(self) -> None:
        """Signal the process we started, wait, then SIGKILL its process group if anything is left."""
        pid = self.proc.pid
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(self.stop_signal)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    self.proc.wait(5)
            # children it forked (pgpool-II) share its process group, which is its PID
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, 0)
                time.sleep(0.5)
                os.killpg(pid, signal.SIGKILL)
        finally:
            self._log.close()


class Proxy(Service):
    """One `neonpoly serve` subprocess."""

    def __init__(
        self, name: str, upstream: str, workdir: Path, extra: list[str], python_flags: list[str], source: Path
    ) -> None:
        self.label = f"neonpoly {name}"
        self.port = free_port()
        cache_dir = workdir / f"cache-{name}"
        cmd = [
            sys.executable, *python_flags, "-m", "neonpoly.cli", "serve",
            "--upstream", upstream,
            "--listen", f"127.0.0.1:{self.port}",
            "--cache-dir", str(cache_dir),
            "--state-dir", str(workdir / f"state-{name}"),
            "--grace", "1",
            *extra,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]))
        super().__init__(name, cmd, workdir / f"neonpoly-{name}.log", cwd=source, env=env)


def _peer_dir(workdir: Path, name: str, user: RunAs | None) -> Path:
    d = workdir / name
    d.mkdir(mode=0o700)
    if user is not None:
        os.chown(d, user.uid, user.gid)
    return d


def _write(path: Path, text: str, user: RunAs | None, mode: int = 0o600) -> None:
    path.write_text(text)
    os.chmod(path, mode)
    if user is not None:
        os.chown(path, user.uid, user.gid)


def version(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        out = (done.stdout + done.stderr).strip()  # pgpool prints its version on stderr
        return out.splitlines()[0].strip() if out else "?"
    return "?"


class PgBouncer(Service):
    """PgBouncer: database `postgres` pooled per transaction, alias SESSION_DB per session."""

    label = "PgBouncer"
    stop_signal = signal.SIGINT  # "safe shutdown" would wait for clients

    def __init__(self, binary: str, workdir: Path, origin_port: int, password: str, clients: int) -> None:
        user = run_as()  # PgBouncer refuses to run as root
        d = _peer_dir(workdir, "pgbouncer", user)
        self.port = free_port()
        origin = f"host=127.0.0.1 port={origin_port} dbname=postgres"
        _write(d / "userlist.txt", f'"postgres" "{password}"\n', user)
        _write(
            d / "pgbouncer.ini",
            f"""[databases]
postgres = {origin}
{SESSION_DB} = {origin} pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pidfile = {d / "pgbouncer.pid"}
auth_type = scram-sha-256
auth_file = {d / "userlist.txt"}
pool_mode = transaction
max_client_conn = 200
default_pool_size = {clients + 2}
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
""",
            user,
        )
        super().__init__("pgbouncer", [binary, str(d / "pgbouncer.ini")], workdir / "pgbouncer.log", cwd=d, user=user)


class PgPool(Service):
    """pgpool-II in raw mode with its in-memory query cache in shared memory, in the foreground."""

    label = "pgpool-II"
    stop_signal = signal.SIGINT  # fast shutdown: children too, and the shared memory removed

    def __init__(self, binary: str, workdir: Path, origin_port: int, password: str, clients: int) -> None:
        user = run_as()
        d = _peer_dir(workdir, "pgpool", user)
        (d / "oiddir").mkdir()
        if user is not None:
            os.chown(d / "oiddir", user.uid, user.gid)
        self.port = free_port()
        conf = {
            "backend_clustering_mode": "'raw'",
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "socket_dir": f"'{d}'",
            "pcp_listen_addresses": "''",  # PCP on its Unix socket only
            "pcp_port": free_port(),
            "pcp_socket_dir": f"'{d}'",
            "wd_ipc_socket_dir": f"'{d}'",
            "pid_file_name": f"'{d / 'pgpool.pid'}'",
            "logdir": f"'{d}'",
            "log_destination": "'stderr'",
            "backend_hostname0": "'127.0.0.1'",
            "backend_port0": origin_port,
            "backend_weight0": 1,
            "backend_flag0": "'DISALLOW_TO_FAILOVER'",
            # SCRAM from the client to pgpool, and from pgpool to the origin with pool_passwd
            "enable_pool_hba": "on",
            "pool_passwd": "'pool_passwd'",
            "num_init_children": clients + 4,  # one process per client connection
            "max_pool": 1,
            "child_life_time": 0,
            "load_balance_mode": "off",
            "health_check_period": 0,
            "sr_check_period": 0,
            "failover_on_backend_error": "off",
            "use_watchdog": "off",
            "memory_cache_enabled": "on",
            "memqcache_method": "'shmem'",
            "memqcache_total_size": "'64MB'",
            "memqcache_max_num_cache": 1000000,
            "memqcache_expire": 0,
            "memqcache_auto_cache_invalidation": "on",
            "memqcache_oiddir": f"'{d / 'oiddir'}'",
        }
        _write(d / "pgpool.conf", "".join(f"{k} = {v}\n" for k, v in conf.items()), user)
        _write(d / "pool_hba.conf", "host all all 127.0.0.1/32 scram-sha-256\n", user)
        _write(d / "pool_passwd", f"postgres:TEXT{password}\n", user)
        _write(d / "pcp.conf", "", user)
        cmd = [binary, "-n", "-D", "-f", str(d / "pgpool.conf"), "-F", str(d / "pcp.conf"),
               "-a", str(d / "pool_hba.conf")]  # fmt: skip
        super().__init__("pgpool", cmd, workdir / "pgpool.log", cwd=d, user=user)

    def problems(self) -> list[str]:
        # pgpool logs every cache block it recycles at LOG level with an ERROR-free text; keep the rest
        return [p for p in super().problems() if "pool_reuse_block" not in p]

    def pool_cache(self, password: str) -> dict[str, int] | None:
        """SHOW pool_cache (only pgpool's simple-protocol path answers it): the counters we need."""
        psql = shutil.which("psql")
        if psql is None:
            return None
        env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable")
        cmd = [psql, "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
               "-A", "-F", "\t", "-c", "SHOW pool_cache"]  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10).stdout.splitlines()
            if len(out) >= 2:
                row = dict(zip(out[0].split("\t"), out[1].split("\t"), strict=False))
                return {k: int(row[k]) for k in ("num_cache_hits", "num_selects", "num_cache_entries") if k in row}
        return None


async def _query_once(port: int, password: str, sql: str, dbname: str = "postgres") -> Any:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=password,
        database=dbname,
        ssl=False,
        timeout=5,
    )
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()

"""Which worker of `serve --workers N` holds a session, and sessions opened on a chosen one
(the kernel spreads SO_REUSEPORT connections at random; /proc says which worker holds the
accepted socket). Cases about what workers share (test_29, the two-phase cases) read through
another worker than the one that wrote, or they prove nothing about sharing."""

from __future__ import annotations

import os
import socket
from typing import Any

import asyncpg
import psycopg

from tests.adversarial.harness import Client, Env, Login
from tests.proxy.workers import WorkersProxy


def _client_port(client: Client) -> int:
    conn = client.conn
    if isinstance(conn, asyncpg.Connection):
        transport: Any = conn._transport
        return int(transport.get_extra_info("sockname")[1])
    assert isinstance(conn, psycopg.AsyncConnection)
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def worker_of(proxy: WorkersProxy, client: Client) -> int:
    """The index (in proxy.pids) of the worker whose accepted socket talks to this client."""
    port = _client_port(client)
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == proxy.port and int(remote.split(":")[1], 16) == port:
                inode = fields[9]
    assert inode is not None, f"no server socket for client port {port}"
    wanted = f"socket:[{inode}]"
    for index, pid in enumerate(proxy.pids):
        fds = f"/proc/{pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(f"{fds}/{fd}") == wanted:
                    return index
            except OSError:
                continue
    raise AssertionError(f"no worker holds the socket of client port {port}")


async def session_on(env: Env, worker: int, login: Login | None = None, driver: Any = "psycopg") -> Client:
    """A session through neonpoly held by worker `worker` (connections are spread at random)."""
    assert isinstance(env.proxy, WorkersProxy)
    for _ in range(40):
        client = await env.client(login, driver=driver)
        if worker_of(env.proxy, client) == worker:
            return client
        await client.close()
    raise AssertionError(f"40 sessions, none on worker {worker}")

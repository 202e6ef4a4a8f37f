"""Capture a real walsender's CopyData for the codec's unit tests (tests/unit/stream_capture.py).

    .venv/bin/python -m tests.freshness.capture_stream > tests/unit/stream_capture.py

Starts a throwaway PostgreSQL with wal_level=logical, runs SCRIPT directly on it, and records
every CopyData payload a slot streams for it, for each output plugin the feed reads, with
the START_REPLICATION options the feed uses (keepalives included).
"""

from __future__ import annotations

import select
import sys
import time

import psycopg
from psycopg import pq

from neonpoly.freshness import origin_sql, textdecoding
from tests.freshness.conftest import LOGICAL
from tests.pgharness import start_pg_server

SETUP = [
    "CREATE TABLE t (id int PRIMARY KEY, v text)",
    'CREATE SCHEMA "S 2"',
    'CREATE TABLE "S 2"."Mixed: Case." (id int)',
    'ALTER TABLE "S 2"."Mixed: Case." REPLICA IDENTITY FULL',
    "CREATE TABLE parent (id int, k int) PARTITION BY RANGE (k)",
    "CREATE TABLE part_low PARTITION OF parent FOR VALUES FROM (0) TO (100)",
    "CREATE TABLE child (id int PRIMARY KEY REFERENCES t ON DELETE CASCADE)",
    "CREATE PUBLICATION neonpoly FOR ALL TABLES",
    origin_sql.install_ddl_trigger_sql(),
]
# Each is one transaction (autocommit), except the lists, which are one each.
SCRIPT: list[str | list[str]] = [
    "INSERT INTO t VALUES (1, 'a: b'), (2, 'b')",
    "UPDATE t SET v = 'c' WHERE id = 1",
    [
        'INSERT INTO "S 2"."Mixed: Case." VALUES (5)',
        'UPDATE "S 2"."Mixed: Case." SET id = 6',
        "DELETE FROM t WHERE id = 2",
    ],
    "INSERT INTO parent VALUES (1, 50)",
    ["INSERT INTO child VALUES (1)", "DELETE FROM t WHERE id = 1"],
    'TRUNCATE t, "S 2"."Mixed: Case." RESTART IDENTITY CASCADE',
    "ALTER TABLE t ADD COLUMN w int DEFAULT 7",
    ["INSERT INTO t VALUES (9, 'with DDL')", "CREATE INDEX ON t (v)"],
    "SELECT pg_logical_emit_message(false, 'other', 'not in a transaction')",
    "INSERT INTO t VALUES (3, repeat('x', 3000))",
    "BEGIN; INSERT INTO t VALUES (4, 'rolled back'); ROLLBACK",
]
PLUGINS = {
    "pgoutput": "proto_version '1', publication_names '\"neonpoly\"', messages 'true'",
    "test_decoding": textdecoding.START_OPTIONS,
}


def capture(server_port: int, password: str, url: str) -> dict[str, list[bytes]]:
    info = f"host=127.0.0.1 port={server_port} user=postgres dbname=app replication=database password={password}"
    conns: dict[str, pq.abc.PGconn] = {}
    for plugin, options in PLUGINS.items():
        repl = pq.PGconn.connect(info.encode())
        for sql in (
            f"CREATE_REPLICATION_SLOT capture_{plugin} TEMPORARY LOGICAL {plugin} NOEXPORT_SNAPSHOT",
            f"START_REPLICATION SLOT capture_{plugin} LOGICAL 0/0 ({options})",
        ):
            repl.send_query(sql.encode())
            while (result := repl.get_result()) is not None:
                if result.status == pq.ExecStatus.COPY_BOTH:
                    break
        repl.nonblocking = 1
        conns[plugin] = repl
    with psycopg.connect(url, autocommit=True) as conn:
        for step in SCRIPT:
            if isinstance(step, list):
                with conn.transaction():
                    for sql in step:
                        conn.execute(sql.encode())
            else:
                conn.execute(step.encode())
    frames: dict[str, list[bytes]] = {plugin: [] for plugin in conns}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        select.select([c.socket for c in conns.values()], [], [], 0.2)
        for plugin, repl in conns.items():
            repl.consume_input()
            while (got := repl.get_copy_data(1))[0] > 0:
                frames[plugin].append(bytes(got[1]))
                quiet_since = time.monotonic()
    for repl in conns.values():
        repl.finish()
    return frames


def main() -> None:
    server = start_pg_server(small=True, extra_settings=LOGICAL)
    try:
        url = server.url("postgres", "app")
        with psycopg.connect(url, autocommit=True) as conn:
            for sql in SETUP:
                conn.execute(sql.encode())
        frames = capture(server.port, server.password_for("postgres"), url)
    finally:
        server.destroy()
    out = sys.stdout
    out.write('"""CopyData payloads a PostgreSQL 15 walsender streamed for the SCRIPT of\n')
    out.write("tests/freshness/capture_stream.py, per output plugin, as the change feed asks for them.\n\n")
    out.write("Regenerate: `python -m tests.freshness.capture_stream > tests/unit/stream_capture.py`.\n")
    out.write('Keepalives are kept: they are part of what the feed reads."""\n')
    out.write("# ruff: noqa: E501\n")
    for plugin, payloads in frames.items():
        out.write(f"\n{plugin.upper()}: list[bytes] = [\n")
        for frame in payloads:
            out.write(f"    {frame!r},\n")
        out.write("]\n")


if __name__ == "__main__":
    main()

"""Capture a real walsender's CopyData for the codec's unit tests (tests/unit/pgoutput_capture.py).

    .venv/bin/python -m tests.freshness.capture_pgoutput > tests/unit/pgoutput_capture.py

Starts a throwaway PostgreSQL with wal_level=logical, runs SCRIPT directly on it, and records
every CopyData payload a pgoutput slot streams for it (the same START_REPLICATION options
the feed uses), keepalives included.
"""

from __future__ import annotations

import select
import sys
import time

import psycopg
from psycopg import pq

from neonpoly.freshness import origin_sql
from tests.freshness.conftest import LOGICAL
from tests.pgharness import start_pg_server

SETUP = [
    "CREATE TABLE t (id int PRIMARY KEY, v text)",
    "CREATE SCHEMA s2",
    "CREATE TABLE s2.\"Mixed Case\" (id int)",
    "ALTER TABLE s2.\"Mixed Case\" REPLICA IDENTITY FULL",
    "CREATE TABLE parent (id int, k int) PARTITION BY RANGE (k)",
    "CREATE TABLE part_low PARTITION OF parent FOR VALUES FROM (0) TO (100)",
    "CREATE TABLE child (id int REFERENCES t ON DELETE CASCADE)",
    "CREATE PUBLICATION neonpoly FOR ALL TABLES",
    origin_sql.install_ddl_trigger_sql(),
]
# Each is one transaction (autocommit), except the list, which is one.
SCRIPT: list[str | list[str]] = [
    "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
    "UPDATE t SET v = 'c' WHERE id = 1",
    ["INSERT INTO s2.\"Mixed Case\" VALUES (5)", "UPDATE s2.\"Mixed Case\" SET id = 6", "DELETE FROM t WHERE id = 2"],
    "INSERT INTO parent VALUES (1, 50)",
    "INSERT INTO child VALUES (1)",
    "TRUNCATE t, child RESTART IDENTITY CASCADE",
    "ALTER TABLE t ADD COLUMN w int DEFAULT 7",
    "SELECT pg_logical_emit_message(false, 'other', 'not in a transaction')",
    "INSERT INTO t VALUES (3, repeat('x', 3000))",
    "BEGIN; INSERT INTO t VALUES (4, 'rolled back'); ROLLBACK",
]


def main() -> None:
    server = start_pg_server(small=True, extra_settings=LOGICAL)
    try:
        url = server.url("postgres", "app")
        with psycopg.connect(url, autocommit=True) as conn:
            for sql in SETUP:
                conn.execute(sql.encode())
        info = (f"host=127.0.0.1 port={server.port} user=postgres dbname=app replication=database "
                f"password={server.password_for('postgres')} sslmode=disable")
        repl = pq.PGconn.connect(info.encode())
        for sql in (
            "CREATE_REPLICATION_SLOT capture TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            "START_REPLICATION SLOT capture LOGICAL 0/0 "
            "(proto_version '1', publication_names '\"neonpoly\"', messages 'true')",
        ):
            repl.send_query(sql.encode())
            while (result := repl.get_result()) is not None:
                if result.status == pq.ExecStatus.COPY_BOTH:
                    break
        repl.nonblocking = 1
        with psycopg.connect(url, autocommit=True) as conn:
            for step in SCRIPT:
                if isinstance(step, list):
                    with conn.transaction():
                        for sql in step:
                            conn.execute(sql.encode())
                else:
                    conn.execute(step.encode())
        frames: list[bytes] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            select.select([repl.socket], [], [], 0.2)
            repl.consume_input()
            while (got := repl.get_copy_data(1))[0] > 0:
                frames.append(bytes(got[1]))
                quiet_since = time.monotonic()
        repl.finish()
    finally:
        server.destroy()
    out = sys.stdout
    out.write('"""CopyData payloads a PostgreSQL 15 walsender streamed (pgoutput, proto 1, messages on).\n\n')
    out.write("Captured by `python -m tests.freshness.capture_pgoutput`; the SQL that made them is in\n")
    out.write('its SETUP and SCRIPT. Keepalives are kept: they are part of what the feed reads."""\n\n')
    out.write("FRAMES: list[bytes] = [\n")
    for frame in frames:
        out.write(f"    {frame!r},\n")
    out.write("]\n")


if __name__ == "__main__":
    main()

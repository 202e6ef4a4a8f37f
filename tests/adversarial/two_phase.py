"""What the two-phase commit cases share (test_42, test_45): an origin that allows prepared
transactions (the suite's runs with max_prepared_transactions = 0, where PREPARE TRANSACTION
fails), and the mark for cases that need the hold in the process that reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.conftest import WORKERS
from tests.pgharness import PgServer, start_pg_server

# The hold is kept by the worker that saw PREPARE TRANSACTION (and its in-process siblings):
# another worker of `serve --workers N` still stores what the prepared transaction wrote.
HELD_IN_ONE_PROCESS = pytest.mark.skipif(WORKERS > 1, reason="the prepared-transaction hold is per process")


def prepared_transactions_origin() -> Iterator[PgServer]:
    """A module's origin with prepared transactions allowed (its `pg` fixture: the `env`
    fixture runs neonpoly in front of it)."""
    server = start_pg_server(small=True, extra_settings={"max_prepared_transactions": 5})
    try:
        yield server
    finally:
        server.destroy()

"""The local pg_net stand-in's database side: applying ``infra/local/pg_net.sql`` (the ``net`` schema,
``net.http_post``/``net.http_get``, ``supabase_functions.http_request()``), a UTC database as Supabase's,
the request queue's depth and idleness, and the statements the sender (:mod:`infra.local.pgnet_sender`) runs
to take a batch from ``net.http_request_queue`` and record outcomes in ``net._http_response``.

Python API (for the local stack and tests)::

    apply_pg_net_sql(url_or_conn)                  # create/refresh the stand-in objects (idempotent)
    ensure_utc_database(url_or_conn)               # Supabase runs with TimeZone=UTC (pg_net.sql does it too)
    queue_depth(url_or_conn)                       # requests waiting in net.http_request_queue
    wait_idle(url_or_conn, timeout_s=10.0)         # queue empty and no batch in flight (any process)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

logger = logging.getLogger("zsync.pgnet_sender")

PG_NET_SQL_PATH = Path(__file__).with_name("pg_net.sql")
NOTIFY_CHANNEL = "zsync_pg_net"  # pg_net.sql's net.http_* notify this channel with the request id
# Advisory lock the sender holds (shared) from taking a batch until its outcomes are recorded;
# wait_idle() takes it exclusively to know no batch is in flight. Arbitrary constant ("zsyncpgn").
IN_FLIGHT_LOCK_KEY = 0x7A73796E6370676E

# The sender's statements: take a batch (oldest first, deleted from the queue), record each outcome in
# one of pg_net's two shapes (an HTTP answer, or a transport failure's error_msg only).
TAKE_BATCH_SQL = """
DELETE FROM net.http_request_queue
 WHERE id IN (SELECT id FROM net.http_request_queue ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, method, url, headers, body, timeout_milliseconds
"""

INSERT_RESPONSE_SQL = """
INSERT INTO net._http_response (id, status_code, content, headers, content_type, timed_out)
VALUES (%s, %s, %s, %s, %s, false)
"""

INSERT_FAILURE_SQL = "INSERT INTO net._http_response (id, error_msg) VALUES (%s, %s)"


@contextlib.contextmanager
def _connection(conn_or_url: str | psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Yield a connection: a new autocommit one for a URL (closed afterwards), else the one given."""
    if isinstance(conn_or_url, str):
        with psycopg.connect(conn_or_url, autocommit=True) as conn:
            yield conn
    else:
        yield conn_or_url


def apply_pg_net_sql(conn_or_url: str | psycopg.Connection[Any]) -> None:
    """Apply infra/local/pg_net.sql (idempotent). LOCAL ONLY: never against a real Supabase project.

    With a non-autocommit connection the statements join the caller's transaction (commit it).
    """
    sql = PG_NET_SQL_PATH.read_text(encoding="utf-8")
    with _connection(conn_or_url) as conn:
        conn.execute(sql)  # type: ignore[arg-type]  # a trusted file, run as one simple-protocol script
    logger.info("applied %s", PG_NET_SQL_PATH.name)


def ensure_utc_database(conn_or_url: str | psycopg.Connection[Any]) -> None:
    """Make UTC the current database's default TimeZone and this session's TimeZone.

    Supabase databases run with TimeZone UTC, and Postgres serialises timestamptz inside the webhook
    payload with the session TimeZone, so locally it must be UTC too to get "...+00:00" strings.
    The database default only affects sessions opened afterwards. pg_net.sql already does this.
    """
    with _connection(conn_or_url) as conn:
        conn.execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET timezone TO %L', current_database(), 'UTC'); END $$"
        )
        conn.execute("SET timezone TO 'UTC'")


def queue_depth(conn_or_url: str | psycopg.Connection[Any]) -> int:
    """Number of requests waiting in net.http_request_queue."""
    with _connection(conn_or_url) as conn:
        row = conn.execute("SELECT count(*) FROM net.http_request_queue").fetchone()
    return int(row[0]) if row else 0


def wait_idle(conn_or_url: str | psycopg.Connection[Any], timeout_s: float = 10.0, *, poll_s: float = 0.02) -> None:
    """Return once net.http_request_queue is empty and no sender has a batch in flight.

    Works across processes (the sender holds an advisory lock while a batch is in flight). Pass a
    URL, or a connection that is not inside a transaction. Raises TimeoutError after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with _connection(conn_or_url) as conn:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise ValueError("wait_idle() needs a connection outside any transaction (or a URL)")
        while True:
            depth: int | None = None
            with conn.transaction():
                row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (IN_FLIGHT_LOCK_KEY,)).fetchone()
                if row and row[0]:
                    count = conn.execute("SELECT count(*) FROM net.http_request_queue").fetchone()
                    depth = int(count[0]) if count else 0
            if depth == 0:
                return
            if time.monotonic() >= deadline:
                state = "a batch is in flight" if depth is None else f"{depth} request(s) still queued"
                raise TimeoutError(f"pg_net stand-in not idle after {timeout_s:.1f}s: {state}")
            time.sleep(poll_s)

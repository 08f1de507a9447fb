"""Local stand-in for pg_net's background worker: the worker loop and its command line.

``infra/local/pg_net.sql`` gives the embedded Postgres the ``net`` schema (request queue, response
table, ``net.http_post``/``net.http_get``) and ``supabase_functions.http_request()``. This module
holds the worker that actually sends the queued requests, as pg_net's background worker does on
Supabase, and its CLI; one request's sending is in :mod:`infra.local.pgnet_http`, the SQL (applying
pg_net.sql, the queue, the statements run here) in :mod:`infra.local.pgnet_sql`. The worker:

* takes up to ``batch_size`` (200, like pg_net) requests per batch, oldest first, deleting them
  from ``net.http_request_queue``;
* sends them concurrently, each ONCE: a timeout, a refused connection or a 5xx is recorded in
  ``net._http_response`` and never retried (pg_net has no retries: pg_net issue 110);
* records outcomes the way pg_net does: an HTTP answer (any status) becomes ``(id, status_code,
  content, headers, content_type, timed_out=false)``; a transport failure becomes ``(id,
  error_msg)`` only, with curl's wording ("Timeout of 1000 ms reached. ...", "Couldn't connect to
  server", ...). Note that pg_net leaves ``timed_out`` NULL on a timeout: detect timeouts with
  ``error_msg LIKE 'Timeout of %'`` (the ``timed_out`` counter on the sender is exact);
* wakes on ``NOTIFY zsync_pg_net`` (a local speed-up issued by the stand-in's ``net.http_*``) and
  also polls every ``poll_interval_s``;
* survives Postgres restarts (reconnects with exponential backoff) and bad rows (recorded as a
  failed request, logged, skipped).

Python API (for the local stack and tests)::

    sender = PgNetSender(database_url, poll_interval_s=0.25, batch_size=200, max_workers=32)
    sender.start(); ...; sender.wait_idle(10.0); sender.stop()   # or: with PgNetSender(url) as sender:
    sender.sent / sender.failed / sender.timed_out / sender.stats()

CLI (runs until SIGTERM/SIGINT)::

    python -m infra.local.pgnet_sender --database-url postgresql://... [--apply-sql] [--poll-interval 0.25]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.types.json import Jsonb

from infra.local.pgnet_http import ERR_DROPPED, Outcome, QueuedRequest, send_request
from infra.local.pgnet_sql import (
    IN_FLIGHT_LOCK_KEY,
    INSERT_FAILURE_SQL,
    INSERT_RESPONSE_SQL,
    NOTIFY_CHANNEL,
    TAKE_BATCH_SQL,
    apply_pg_net_sql,
    wait_idle,
)

logger = logging.getLogger("zsync.pgnet_sender")

BATCH_SIZE = 200  # pg_net's default batch size (pg_net.batch_size)


class PgNetSender:
    """pg_net's background worker for the local stack: a thread sending queued webhook requests.

    Counters (read any time): ``sent`` (got an HTTP answer, any status), ``http_errors`` (of those,
    status >= 400), ``failed`` (no answer: refused, DNS, bad url ...), ``timed_out``, ``batches``,
    ``largest_batch``, ``connects``.
    """

    def __init__(
        self,
        database_url: str,
        *,
        poll_interval_s: float = 0.25,
        batch_size: int = BATCH_SIZE,
        max_workers: int = 32,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
    ) -> None:
        if batch_size < 1 or max_workers < 1 or poll_interval_s <= 0:
            raise ValueError("batch_size and max_workers must be >= 1 and poll_interval_s > 0")
        self.database_url = database_url
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.max_workers = max_workers
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s

        self.sent = 0
        self.http_errors = 0
        self.failed = 0
        self.timed_out = 0
        self.batches = 0
        self.largest_batch = 0
        self.connects = 0
        self.dropped = 0
        # Fault knob (soak / chaos tests): the share of requests lost without being sent, recorded as a
        # transport failure ("Connection lost (dropped by fault injection)"), as pg_net itself loses
        # requests (timeouts, worker restarts). The outbox sweeper must recover them.
        self.drop_share = 0.0
        self._drop_rng = random.Random()

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._busy = False  # a batch taken from the queue is not fully recorded yet
        self._unrecorded: list[Outcome] = []  # outcomes whose INSERT was cut off by a lost connection

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (returns at once; see wait_connected())."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("PgNetSender already running")
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="pgnet-send")
        self._thread = threading.Thread(target=self._run, name="pgnet-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the batch in flight (if any) is sent and recorded. Queued rows stay queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("pg_net sender thread did not stop within %.1fs", timeout_s)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=False)
            self._pool = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """True once the worker is connected and listening (False on timeout)."""
        return self._connected.wait(timeout_s)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Queue empty, no batch in flight, every outcome recorded. Raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        wait_idle(self.database_url, timeout_s)
        while self._busy or self._unrecorded:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"pg_net sender not idle after {timeout_s:.1f}s")
            time.sleep(0.02)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "sent": self.sent,
                "http_errors": self.http_errors,
                "failed": self.failed,
                "timed_out": self.timed_out,
                "dropped": self.dropped,
                "batches": self.batches,
                "largest_batch": self.largest_batch,
                "connects": self.connects,
            }

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- worker loop ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.reconnect_min_s
        while not self._stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = psycopg.connect(
                    self.database_url, autocommit=True, connect_timeout=5, application_name="zsync_pgnet_sender"
                )
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                with self._lock:
                    self.connects += 1
                logger.info(
                    "pg_net sender connected (backend pid %s), listening on %s", conn.info.backend_pid, NOTIFY_CHANNEL
                )
                self._connected.set()
                backoff = self.reconnect_min_s
                self._record(conn, [])  # flush outcomes left over from a lost connection
                while not self._stop.is_set():
                    self._drain(conn)
                    self._wait_for_work(conn)
            except psycopg.OperationalError as exc:
                self._connected.clear()
                logger.warning(
                    "pg_net sender: database unavailable (%s); reconnecting in %.2fs", _one_line(exc), backoff
                )
            except Exception as exc:
                self._connected.clear()
                logger.exception(
                    "pg_net sender: unexpected error (%s); reconnecting in %.2fs", type(exc).__name__, backoff
                )
            finally:
                self._busy = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.reconnect_max_s)
        self._connected.clear()
        logger.info("pg_net sender stopped")

    def _wait_for_work(self, conn: psycopg.Connection[Any]) -> None:
        woke = False
        for _ in conn.notifies(timeout=self.poll_interval_s, stop_after=1):
            woke = True
        if woke:  # swallow the other notifications of the same burst: one drain serves them all
            for _ in conn.notifies(timeout=0.0):
                pass

    def _drain(self, conn: psycopg.Connection[Any]) -> None:
        """Take, send and record batches until the queue is empty (or stop is requested)."""
        while not self._stop.is_set():
            self._busy = True
            conn.execute("SELECT pg_advisory_lock_shared(%s)", (IN_FLIGHT_LOCK_KEY,))
            try:
                rows = conn.execute(TAKE_BATCH_SQL, (self.batch_size,)).fetchall()
                if not rows:
                    return
                requests_ = sorted((self._parse(row) for row in rows), key=lambda r: r.id)
                outcomes = self._send_all(requests_)
                self._record(conn, outcomes)
            finally:
                with contextlib.suppress(psycopg.Error):
                    if not conn.closed:
                        conn.execute("SELECT pg_advisory_unlock_shared(%s)", (IN_FLIGHT_LOCK_KEY,))
                self._busy = False

    @staticmethod
    def _parse(row: Sequence[Any]) -> QueuedRequest:
        req_id, method, url, headers, body, timeout_ms = row
        return QueuedRequest(int(req_id), method, url, headers, bytes(body) if body is not None else None, timeout_ms)

    def _send_all(self, reqs: list[QueuedRequest]) -> list[Outcome]:
        started = time.monotonic()
        pool = self._pool  # None if stop() raced with a batch: send inline rather than drop taken requests
        with self._lock:
            dropped = {r.id for r in reqs if self.drop_share > 0 and self._drop_rng.random() < self.drop_share}
            self.dropped += len(dropped)
        send = [r for r in reqs if r.id not in dropped]
        sent = list(pool.map(send_request, send)) if pool is not None else [send_request(r) for r in send]
        by_id = {o.id: o for o in sent} | {i: Outcome(id=i, error_msg=ERR_DROPPED) for i in dropped}
        outcomes = [by_id[r.id] for r in reqs]
        counts = {"ok": 0, "http_error": 0, "failed": 0, "timed_out": 0}
        for req, out in zip(reqs, outcomes, strict=True):
            if out.timed_out:
                counts["timed_out"] += 1
                logger.warning(
                    "pg_net request %s %s %s timed out after %.0f ms (limit %s ms)",
                    out.id,
                    _safe_method(req.method),
                    _safe_url(req.url),
                    out.elapsed_ms,
                    req.timeout_milliseconds,
                )
            elif out.error_msg is not None:
                counts["failed"] += 1
                logger.warning(
                    "pg_net request %s %s %s failed: %s",
                    out.id,
                    _safe_method(req.method),
                    _safe_url(req.url),
                    out.error_msg,
                )
            elif out.status_code is not None and out.status_code >= 400:
                counts["http_error"] += 1
                logger.warning(
                    "pg_net request %s %s %s -> HTTP %s (%.0f ms)",
                    out.id,
                    _safe_method(req.method),
                    _safe_url(req.url),
                    out.status_code,
                    out.elapsed_ms,
                )
            else:
                counts["ok"] += 1
                logger.debug(
                    "pg_net request %s %s %s -> HTTP %s (%.0f ms)",
                    out.id,
                    _safe_method(req.method),
                    _safe_url(req.url),
                    out.status_code,
                    out.elapsed_ms,
                )
        with self._lock:
            self.sent += counts["ok"] + counts["http_error"]
            self.http_errors += counts["http_error"]
            self.failed += counts["failed"]
            self.timed_out += counts["timed_out"]
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(reqs))
        logger.info(
            "pg_net batch of %d sent in %.0f ms: %d ok, %d http errors, %d failed, %d timed out",
            len(reqs),
            (time.monotonic() - started) * 1000.0,
            counts["ok"],
            counts["http_error"],
            counts["failed"],
            counts["timed_out"],
        )
        return outcomes

    def _record(self, conn: psycopg.Connection[Any], outcomes: list[Outcome]) -> None:
        """Insert outcomes into net._http_response; keep them for later if the connection is lost."""
        pending = self._unrecorded + outcomes
        self._unrecorded = []
        for i, out in enumerate(pending):
            try:
                if out.is_response:
                    conn.execute(
                        INSERT_RESPONSE_SQL,
                        (out.id, out.status_code, out.content, Jsonb(out.headers or {}), out.content_type),
                    )
                else:
                    conn.execute(INSERT_FAILURE_SQL, (out.id, out.error_msg))
            except psycopg.OperationalError:
                self._unrecorded = pending[i:]
                logger.warning("pg_net sender: %d outcome(s) not recorded yet (connection lost)", len(pending) - i)
                raise
            except psycopg.Error as exc:  # a bad value: log and move on, never block the queue
                logger.error("pg_net sender: could not record outcome of request %s: %s", out.id, _one_line(exc))


def _safe_method(method: Any) -> str:
    text = str(method)
    return text if text.isalpha() and len(text) <= 10 else "<bad method>"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _safe_url(url: Any) -> str:
    """The url for logs: no userinfo, no query string (either may carry secrets)."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable url>"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.pgnet_sender",
        description="Local stand-in for pg_net's background worker: sends the HTTP requests queued in "
        "net.http_request_queue (by Supabase-style Database Webhook triggers) once each, and records the "
        "outcomes in net._http_response. Runs until SIGTERM/SIGINT. Local use only.",
    )
    parser.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL"), help="Postgres URL (default: $DATABASE_URL)"
    )
    parser.add_argument(
        "--apply-sql",
        action="store_true",
        help="apply infra/local/pg_net.sql first (idempotent; never against real Supabase)",
    )
    parser.add_argument("--poll-interval", type=float, default=0.25, help="seconds between polls (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"requests per batch (default {BATCH_SIZE})")
    parser.add_argument("--max-workers", type=int, default=32, help="concurrent sends (default 32)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url is required (or set DATABASE_URL)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.apply_sql:
        apply_pg_net_sql(args.database_url)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sender = PgNetSender(
        args.database_url, poll_interval_s=args.poll_interval, batch_size=args.batch_size, max_workers=args.max_workers
    )
    sender.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        sender.stop()
    logger.info("pg_net sender exiting: %s", sender.stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())

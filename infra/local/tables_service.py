"""Local stand-in for Zapier Tables (records API) and for the Zaps' "new or updated record" triggers.

It implements the contract documented in :mod:`shared.zapier_tables` (the only module of the project
that knows the API shape) over real HTTP, with records stored durably in a SQLite file (WAL mode, one
connection guarded by one lock; restarting on the same file keeps every record).

Emulated Zapier behaviour:

* Field stamping (Zapier's record timestamps that our Zaps map into fields), for tables with
  ``stamp_updated_at``: a create without a ``created_at`` key gets ``created_at = now`` (an explicit
  null is kept); a create or
  update that does not include ``updated_at`` gets ``updated_at = now`` (UTC ISO, microseconds, "Z").
  A write that includes ``updated_at`` keeps the given value exactly.
* Triggers: after a create, or an update that changes the data (an update equal to the stored data is
  a no-op: no write, no trigger), the record is POSTed to the table's ``trigger_url`` as its flat data
  fields plus ``"id": <record id>`` when the data has no ``id`` field, with the shared secret header.
  Delivery runs in background workers, once per change; ``autoreplay`` (delays in seconds; Zapier's is
  5 min, 30 min, 1 h, 3 h, 6 h) re-sends deliveries that met a connection error, timeout, 429 or 5xx.
* Field values must be flat scalars (string, number, boolean, null): JSON kinds travel as strings, so
  a nested object means a mapping bug on our side and gets a 400.

Admin endpoints (no token; the service binds to loopback): ``POST/DELETE /_admin/faults``,
``GET /_admin/stats``, ``POST /_admin/stats/reset``, ``GET /_admin/deliveries``,
``PUT /_admin/tables/{table_id}/trigger``, ``POST /_admin/triggers/flush``, ``GET /_admin/health``.

Run it: ``python -m infra.local.tables_service --db PATH --config JSON_FILE --port N`` (see ``--help``),
or from Python with :func:`start_tables_service`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import heapq
import hmac
import itertools
import json
import logging
import os
import queue
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Self

import requests
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from infra.local.trigger_inbox_service import InboxService, inbox_blueprint

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/tables"
PAGE_DEFAULT = 100
PAGE_MAX = 1000
BATCH_MAX = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_FIELDS = 200
DELIVERY_LOG_MAX = 10_000
FLUSH_DEFAULT_S = 10.0
FLUSH_MAX_S = 120.0
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}

Data = dict[str, Any]
Rec = dict[str, Any]


@dataclass(frozen=True)
class TableConfig:
    name: str
    table_id: str
    trigger_url: str | None = None
    stamp_updated_at: bool = True


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# --- small helpers -------------------------------------------------------------------------------------


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_record_id() -> str:
    """``rec_`` + a ULID-like id (48-bit millisecond time + 80 random bits, Crockford base32)."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "rec_" + "".join(reversed(chars))


def field_text(value: Any) -> str | None:
    """The text a ``filter[field]=`` value is compared with (see ``shared.zapier_tables.filter_text``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _sql_field_text(data_json: str, name: str) -> str | None:
    return field_text(json.loads(data_json).get(name))


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, seq = text.partition(":")
        if prefix != "v1" or not seq.isdigit():
            raise ValueError(text)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid cursor") from None


# --- durable storage -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    table_id TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_table ON records (table_id, seq);
"""


def _row_record(row: sqlite3.Row) -> Rec:
    return {
        "id": row["id"],
        "data": json.loads(row["data"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


class RecordStore:
    """SQLite persistence: one connection, one lock, WAL journal, ``synchronous=FULL``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.create_function("field_text", 2, _sql_field_text, deterministic=True)
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @staticmethod
    def fetch(conn: sqlite3.Connection, table_id: str, rid: str) -> Rec | None:
        row = conn.execute("SELECT * FROM records WHERE table_id = ? AND id = ?", (table_id, rid)).fetchone()
        return _row_record(row) if row else None

    @staticmethod
    def insert(conn: sqlite3.Connection, table_id: str, record: Rec) -> None:
        conn.execute(
            "INSERT INTO records (table_id, id, data, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (table_id, record["id"], json.dumps(record["data"]), record["created_at"], record["updated_at"]),
        )

    @staticmethod
    def replace_data(conn: sqlite3.Connection, record: Rec) -> None:
        conn.execute(
            "UPDATE records SET data = ?, updated_at = ? WHERE id = ?",
            (json.dumps(record["data"]), record["updated_at"], record["id"]),
        )

    @staticmethod
    def delete(conn: sqlite3.Connection, table_id: str, rid: str) -> bool:
        return conn.execute("DELETE FROM records WHERE table_id = ? AND id = ?", (table_id, rid)).rowcount > 0

    @staticmethod
    def page(
        conn: sqlite3.Connection, table_id: str, after: int, limit: int, filters: Mapping[str, str]
    ) -> tuple[list[Rec], int | None]:
        """Up to ``limit`` records after ``seq`` ``after``, and the last seq when more follow."""
        sql = "SELECT * FROM records WHERE table_id = ? AND seq > ?"
        args: list[Any] = [table_id, after]
        for name, value in filters.items():
            sql += " AND field_text(data, ?) = ?"
            args += [name, value]
        rows = conn.execute(sql + " ORDER BY seq LIMIT ?", [*args, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_row_record(r) for r in rows], (rows[-1]["seq"] if more else None)


# --- record semantics (stamping, no-op updates) ---------------------------------------------------------


def _stamp_create(data: Data, stamp: bool, now: str) -> Data:
    data = dict(data)
    if stamp and "created_at" not in data:  # an explicit null is a value the writer chose: keep it
        data["created_at"] = now
    if stamp and "updated_at" not in data:
        data["updated_at"] = now
    return data


def _merge_update(old: Data, given: Data, stamp: bool, now: str) -> Data | None:
    """The new data, or None when the update changes nothing (no write, no trigger)."""
    merged = old | given
    if merged == old:
        return None
    if stamp and "updated_at" not in given:
        merged["updated_at"] = now
    return merged


class RecordEngine:
    """The records API's behaviour over :class:`RecordStore`, per registered table."""

    def __init__(self, store: RecordStore, tables: Sequence[TableConfig]) -> None:
        self.store = store
        self.tables = {t.table_id: t for t in tables}

    def table(self, table_id: str) -> TableConfig:
        if not _ID_RE.match(table_id):
            raise ApiError(400, "malformed table id")
        try:
            return self.tables[table_id]
        except KeyError:
            raise ApiError(404, f"unknown table {table_id}") from None

    def create_many(self, table_id: str, items: list[Data]) -> list[Rec]:
        stamp = self.table(table_id).stamp_updated_at
        now = utc_now_iso()
        records = [
            {"id": new_record_id(), "data": _stamp_create(d, stamp, now), "created_at": now, "updated_at": now}
            for d in items
        ]
        with self.store.transaction() as conn:
            for record in records:
                self.store.insert(conn, table_id, record)
        return records

    def update_many(self, table_id: str, updates: list[tuple[str, Data]]) -> list[tuple[Rec, bool]]:
        """Apply all updates atomically; each result says whether the record changed."""
        stamp = self.table(table_id).stamp_updated_at
        now = utc_now_iso()
        results: list[tuple[Rec, bool]] = []
        with self.store.transaction() as conn:
            for rid, given in updates:
                record = self._existing(conn, table_id, rid)
                merged = _merge_update(record["data"], given, stamp, now)
                if merged is not None:
                    record = record | {"data": merged, "updated_at": now}
                    self.store.replace_data(conn, record)
                results.append((record, merged is not None))
        return results

    def get(self, table_id: str, rid: str) -> Rec:
        self.table(table_id)
        with self.store.transaction() as conn:
            return self._existing(conn, table_id, rid)

    def delete(self, table_id: str, rid: str) -> None:
        self.table(table_id)
        _check_record_id(rid)
        with self.store.transaction() as conn:
            if not self.store.delete(conn, table_id, rid):
                raise ApiError(404, f"unknown record {rid}")

    def page(self, table_id: str, after: int, limit: int, filters: Mapping[str, str]) -> tuple[list[Rec], int | None]:
        self.table(table_id)
        with self.store.transaction() as conn:
            return self.store.page(conn, table_id, after, limit, filters)

    def _existing(self, conn: sqlite3.Connection, table_id: str, rid: str) -> Rec:
        _check_record_id(rid)
        record = self.store.fetch(conn, table_id, rid)
        if record is None:
            raise ApiError(404, f"unknown record {rid}")
        return record


def _check_record_id(rid: Any) -> str:
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise ApiError(400, "malformed record id")
    return rid


# --- trigger delivery ----------------------------------------------------------------------------------


@dataclass
class Delivery:
    url: str
    table_id: str
    record_id: str
    payload: Data
    attempt: int = 1


def trigger_payload(record: Rec) -> Data:
    """What a Zap's "new or updated record" trigger hands to its webhook step: the flat fields + id."""
    payload = dict(record["data"])
    payload.setdefault("id", record["id"])
    return payload


class TriggerDispatcher:
    """Delivers trigger payloads from a queue with worker threads; replays failures on a schedule."""

    def __init__(
        self,
        secret_header: str,
        secret: str | None,
        autoreplay: Sequence[float] = (),
        timeout_s: float = 10.0,
        workers: int = 4,
    ) -> None:
        self._headers = {"Content-Type": "application/json"} | ({secret_header: secret} if secret else {})
        self._autoreplay = tuple(float(d) for d in autoreplay)
        self._timeout_s = timeout_s
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._cond = threading.Condition()
        self._replays: list[tuple[float, int, Delivery]] = []
        self._tiebreak = itertools.count()
        self._pending = 0
        self._counts: Counter[str] = Counter()
        self._log: deque[Data] = deque(maxlen=DELIVERY_LOG_MAX)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"trigger-{i}", daemon=True) for i in range(workers)]
        self._threads.append(threading.Thread(target=self._schedule_replays, name="trigger-replay", daemon=True))
        for thread in self._threads:
            thread.start()

    def enqueue(self, delivery: Delivery) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put(delivery)

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "sent": self._counts["sent"],
                "failed": self._counts["failed"],
                "pending": self._pending,
                "attempts": self._counts["attempts"],
            }

    def outcomes(self) -> list[Data]:
        with self._cond:
            return list(self._log)

    def reset(self) -> None:
        with self._cond:
            self._counts.clear()
            self._log.clear()

    def stop(self) -> None:
        """Stop the workers; queued and scheduled deliveries are dropped."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for _ in range(len(self._threads) - 1):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + 2)

    def _work(self) -> None:
        while True:
            delivery = self._queue.get()
            if delivery is None or self._stopping.is_set():
                return
            self._attempt(delivery)

    def _attempt(self, delivery: Delivery) -> None:
        status, error = self._post(delivery)
        ok = status is not None and 200 <= status < 300
        retriable = status is None or status == 429 or status >= 500
        replay_in = self._autoreplay[delivery.attempt - 1] if delivery.attempt <= len(self._autoreplay) else None
        with self._cond:
            self._counts["attempts"] += 1
            self._log.append(
                {
                    "url": delivery.url,
                    "table_id": delivery.table_id,
                    "record_id": delivery.record_id,
                    "attempt": delivery.attempt,
                    "status": status,
                    "error": error,
                    "ok": ok,
                    "at": utc_now_iso(),
                }
            )
            if not ok and retriable and replay_in is not None:
                delivery.attempt += 1
                heapq.heappush(self._replays, (time.monotonic() + replay_in, next(self._tiebreak), delivery))
            else:
                self._counts["sent" if ok else "failed"] += 1
                self._pending -= 1
            self._cond.notify_all()

    def _post(self, delivery: Delivery) -> tuple[int | None, str | None]:
        try:
            response = requests.post(
                delivery.url,
                json=delivery.payload,
                headers=self._headers,
                timeout=self._timeout_s,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return None, type(exc).__name__
        response.close()
        return response.status_code, None

    def _schedule_replays(self) -> None:
        with self._cond:
            while not self._stopping.is_set():
                now = time.monotonic()
                if self._replays and self._replays[0][0] <= now:
                    self._queue.put(heapq.heappop(self._replays)[2])
                    continue
                self._cond.wait(timeout=(self._replays[0][0] - now) if self._replays else None)


# --- counters and fault injection ----------------------------------------------------------------------


class ServiceStats:
    def __init__(self, table_ids: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._table_ids = list(table_ids)
        self._writes: Counter[str] = Counter({t: 0 for t in self._table_ids})
        self._requests = 0

    def reset(self) -> None:
        with self._lock:
            self._writes = Counter({t: 0 for t in self._table_ids})
            self._requests = 0

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def count_writes(self, table_id: str, n: int) -> None:
        with self._lock:
            self._writes[table_id] += n

    def snapshot(self) -> Data:
        with self._lock:
            return {"writes": dict(self._writes), "api_requests": self._requests}


@dataclass
class _Fault:
    status: int
    count: int
    retry_after: int | None


class FaultInjector:
    """Makes the next N records-API requests answer a given status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault: _Fault | None = None
        self._served = 0

    def stats(self) -> Data:
        with self._lock:
            return {"served": self._served, "left": self._fault.count if self._fault else 0}

    def arm(self, status: int, count: int, retry_after: int | None) -> None:
        with self._lock:
            self._fault = _Fault(status, count, retry_after)

    def clear(self) -> None:
        with self._lock:
            self._fault = None

    def take(self) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or fault.count <= 0:
                return None
            fault.count -= 1
            self._served += 1
            return fault


# --- request parsing and validation --------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _json_body() -> Any:
    raw = request.get_data(cache=True)
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {str(exc)[:120]}") from None


def _object_body() -> Data:
    body = _json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object")
    return body


def _fields(value: Any, where: str) -> Data:
    if not isinstance(value, dict):
        raise ApiError(400, f"{where} must be a JSON object of fields")
    if len(value) > MAX_FIELDS:
        raise ApiError(400, f"{where} has more than {MAX_FIELDS} fields")
    for name, item in value.items():
        if not _FIELD_RE.match(name):
            raise ApiError(400, f"{where}: invalid field name {name[:70]!r}")
        if item is not None and not isinstance(item, str | int | float | bool):
            raise ApiError(400, f"{where}: field {name!r} must be a string, number, boolean or null")
    return value


def _only_key(body: Any, key: str) -> bool:
    return isinstance(body, dict) and set(body) == {key}


def _batch(body: Any) -> list[Any]:
    items = body["records"]
    if not isinstance(items, list) or not 1 <= len(items) <= BATCH_MAX:
        raise ApiError(400, f"records must be a list of 1 to {BATCH_MAX} items")
    return items


def _create_items(body: Any) -> tuple[list[Data], bool]:
    """The field sets to create and whether the request was a batch."""
    if _only_key(body, "records"):
        items = _batch(body)
        return [
            _fields(i.get("data") if _only_key(i, "data") else None, f"records[{n}].data") for n, i in enumerate(items)
        ], True
    if _only_key(body, "data") and isinstance(body["data"], dict):
        return [_fields(body["data"], "data")], False
    return [_fields(body, "body")], False


def _update_items(body: Any) -> list[tuple[str, Data]]:
    if not _only_key(body, "records"):
        raise ApiError(400, 'expected {"records": [{"id": ..., "data": {...}}]}')
    updates = []
    for n, item in enumerate(_batch(body)):
        if not isinstance(item, dict) or set(item) != {"id", "data"}:
            raise ApiError(400, f'records[{n}] must be {{"id": ..., "data": {{...}}}}')
        updates.append((_check_record_id(item["id"]), _fields(item["data"], f"records[{n}].data")))
    return updates


def _list_params() -> tuple[int, int, dict[str, str]]:
    limit, after, filters = PAGE_DEFAULT, 0, {}
    for key, values in request.args.lists():
        if len(values) != 1:
            raise ApiError(400, f"query parameter {key[:70]!r} given more than once")
        value = values[0]
        if key == "limit":
            if not value.isdigit() or not 1 <= int(value) <= PAGE_MAX:
                raise ApiError(400, f"limit must be an integer from 1 to {PAGE_MAX}")
            limit = int(value)
        elif key == "cursor":
            after = decode_cursor(value)
        elif key.startswith("filter[") and key.endswith("]") and _FIELD_RE.match(key[7:-1]):
            filters[key[7:-1]] = value
        else:
            raise ApiError(400, f"unknown or malformed query parameter {key[:70]!r}")
    return limit, after, filters


def _drain_input(limit: int = 16 * MAX_BODY_BYTES) -> None:
    """Read (and drop) an oversized body so the client sees our 413 instead of a connection reset."""
    stream = request.environ.get("wsgi.input")
    remaining = min(request.content_length or 0, limit)
    while stream is not None and remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            return
        remaining -= len(chunk)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(dict(headers or {}))
    return response


# --- the Flask app -------------------------------------------------------------------------------------


@dataclass
class ServiceContext:
    engine: RecordEngine
    dispatcher: TriggerDispatcher
    token: str
    stats: ServiceStats
    faults: FaultInjector = field(default_factory=FaultInjector)
    triggers: dict[str, str | None] = field(default_factory=dict)
    stopped: bool = False
    inboxes: InboxService | None = None  # trigger inboxes (infra/local/trigger_inbox_service.py)

    def after_change(self, table_id: str, records: Sequence[Rec]) -> None:
        """Count the writes and queue one trigger delivery per changed record."""
        self.stats.count_writes(table_id, len(records))
        for record in records if self.inboxes else ():
            self.inboxes.publish(table_id, record)  # type: ignore[union-attr]
        url = self.triggers.get(table_id)
        for record in records if url else ():
            self.dispatcher.enqueue(Delivery(url, table_id, record["id"], trigger_payload(record)))


def _check_auth(token: str) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})


def _gate(ctx: ServiceContext) -> None:
    """Runs before every records-API request: count, read the body, faults, auth."""
    ctx.stats.count_request()
    request.get_data(cache=True)  # read the body first: an early error must not leave it unread
    if ctx.stopped:
        raise ApiError(503, "service is stopping")
    fault = ctx.faults.take()
    if fault is not None:
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        raise ApiError(fault.status, f"injected fault {fault.status}", headers)
    _check_auth(ctx.token)


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Response:
        _drain_input()
        return _error(413, f"request body larger than {app.config['MAX_CONTENT_LENGTH']} bytes")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("tables service: unexpected error")
        return _error(500, "internal error")


def _register_records_api(app: Flask, ctx: ServiceContext) -> None:
    engine = ctx.engine
    records_path = API_PREFIX + "/<table_id>/records"

    @app.before_request
    def _before() -> None:
        if request.path.startswith("/api/"):
            _gate(ctx)

    @app.get(records_path)
    def list_records(table_id: str) -> Response:
        limit, after, filters = _list_params()
        records, last = engine.page(table_id, after, limit, filters)
        return jsonify(data=records, next_cursor=encode_cursor(last) if last is not None else None)

    @app.post(records_path)
    def create_records(table_id: str) -> tuple[Response, int]:
        engine.table(table_id)
        items, is_batch = _create_items(_json_body())
        created = engine.create_many(table_id, items)
        ctx.after_change(table_id, created)
        return (jsonify(data=created) if is_batch else jsonify(created[0])), 201

    @app.patch(records_path)
    def update_records(table_id: str) -> Response:
        engine.table(table_id)
        results = engine.update_many(table_id, _update_items(_json_body()))
        ctx.after_change(table_id, [r for r, changed in results if changed])
        return jsonify(data=[r for r, _ in results])

    @app.get(records_path + "/<rid>")
    def get_record(table_id: str, rid: str) -> Response:
        return jsonify(engine.get(table_id, rid))

    @app.patch(records_path + "/<rid>")
    def update_record(table_id: str, rid: str) -> Response:
        engine.table(table_id)
        body = _json_body()
        if not _only_key(body, "data"):
            raise ApiError(400, 'expected {"data": {...}}')
        [(record, changed)] = engine.update_many(table_id, [(rid, _fields(body["data"], "data"))])
        ctx.after_change(table_id, [record] if changed else [])
        return jsonify(record)

    @app.delete(records_path + "/<rid>")
    def delete_record(table_id: str, rid: str) -> tuple[str, int]:
        engine.delete(table_id, rid)
        return "", 204


def _admin_number(body: Data, key: str, allowed: Callable[[Any], bool]) -> Any:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not allowed(value):
        raise ApiError(400, f"invalid {key!r}")
    return value


def _register_admin(app: Flask, ctx: ServiceContext) -> None:
    @app.get("/_admin/health")
    def health() -> Response:
        return jsonify(ok=True)

    @app.post("/_admin/faults")
    def arm_faults() -> Response:
        body = _object_body()
        status = _admin_number(body, "status", lambda v: isinstance(v, int) and 400 <= v <= 599)
        count = _admin_number(body, "count", lambda v: isinstance(v, int) and 0 <= v <= 1_000_000)
        retry_after = body.get("retry_after")
        if retry_after is not None:
            retry_after = _admin_number(body, "retry_after", lambda v: isinstance(v, int) and 0 <= v <= 86_400)
        ctx.faults.arm(status, count, retry_after)
        return jsonify(status=status, count=count, retry_after=retry_after)

    @app.delete("/_admin/faults")
    def clear_faults() -> tuple[str, int]:
        ctx.faults.clear()
        return "", 204

    @app.get("/_admin/stats")
    def stats() -> Response:
        return jsonify(ctx.stats.snapshot() | {"deliveries": ctx.dispatcher.stats(), "faults": ctx.faults.stats()})

    @app.post("/_admin/stats/reset")
    def reset_stats() -> tuple[str, int]:
        ctx.stats.reset()
        ctx.dispatcher.reset()
        return "", 204

    @app.get("/_admin/deliveries")
    def deliveries() -> Response:
        return jsonify(data=ctx.dispatcher.outcomes())

    @app.put("/_admin/tables/<table_id>/trigger")
    def set_trigger(table_id: str) -> Response:
        ctx.engine.table(table_id)
        body = _object_body()
        url = body.get("url")
        valid = url is None or (isinstance(url, str) and url.startswith(("http://", "https://")))
        if set(body) != {"url"} or not valid:
            raise ApiError(400, 'expected {"url": "http(s)://..." | null}')
        ctx.triggers[table_id] = url
        return jsonify(table_id=table_id, url=url)

    @app.post("/_admin/triggers/flush")
    def flush() -> Response:
        body = _object_body() if request.get_data(cache=True) else {}
        timeout = body.get("timeout", FLUSH_DEFAULT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= FLUSH_MAX_S:
            raise ApiError(400, f"timeout must be a number of seconds from 0 to {FLUSH_MAX_S}")
        flushed = ctx.dispatcher.wait_idle(timeout)
        return jsonify(flushed=flushed, pending=ctx.dispatcher.stats()["pending"])


def create_app(ctx: ServiceContext, max_body_bytes: int = MAX_BODY_BYTES) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    _register_errors(app)
    _register_records_api(app, ctx)
    _register_admin(app, ctx)
    if ctx.inboxes is not None:
        app.register_blueprint(inbox_blueprint(ctx.inboxes))
    return app


# --- running it ----------------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s -> %s", self.command, self.path, code)


class TablesService:
    """A running service: ``url``, ``stop()``; also a context manager."""

    def __init__(self, server: BaseWSGIServer, ctx: ServiceContext, host: str) -> None:
        self._server = server
        self.ctx = ctx
        display_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{display_host}:{server.server_port}"
        self.port = server.server_port
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="tables-service", daemon=True)
        self._thread.start()
        self._stopped = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> Data:
        ctx = self.ctx
        return ctx.stats.snapshot() | {"deliveries": ctx.dispatcher.stats(), "faults": ctx.faults.stats()}

    def deliveries(self) -> list[Data]:
        return self.ctx.dispatcher.outcomes()

    def flush(self, timeout_s: float = FLUSH_DEFAULT_S) -> bool:
        return self.ctx.dispatcher.wait_idle(timeout_s)

    def stop(self) -> None:
        """Stop serving, drop pending deliveries, join the threads and close the database."""
        if self._stopped:
            return
        self._stopped = True
        self.ctx.stopped = True
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()
        self.ctx.dispatcher.stop()
        if self.ctx.inboxes is not None:
            self.ctx.inboxes.close()
        self.ctx.engine.store.close()


def start_tables_service(
    db_path: str | Path,
    tables: Sequence[TableConfig],
    token: str,
    secret_header: str,
    secret: str | None,
    host: str = "127.0.0.1",
    port: int = 0,
    autoreplay: Sequence[float] = (),
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    delivery_timeout_s: float = 10.0,
    delivery_workers: int = 4,
) -> TablesService:
    """Start the service in background threads and return once it accepts connections."""
    if not token:
        raise ValueError("a bearer token is required")
    if host not in _LOOPBACK:
        log.warning("tables service bound to %s: its /_admin endpoints have no authentication", host)
    engine = RecordEngine(RecordStore(Path(db_path)), tables)
    dispatcher = TriggerDispatcher(secret_header, secret, autoreplay, delivery_timeout_s, delivery_workers)
    ctx = ServiceContext(
        engine,
        dispatcher,
        token,
        ServiceStats([t.table_id for t in tables]),
        triggers={t.table_id: t.trigger_url for t in tables},
        inboxes=InboxService(Path(db_path).with_suffix(".inboxes.sqlite3"), [t.table_id for t in tables]),
    )
    try:
        server = make_server(host, port, create_app(ctx, max_body_bytes), threaded=True, request_handler=_QuietHandler)
    except BaseException:
        dispatcher.stop()
        engine.store.close()
        raise
    return TablesService(server, ctx, host)


# --- CLI -----------------------------------------------------------------------------------------------

_CONFIG_HELP = """\
config file (JSON):
  {
    "token": "<bearer token; default: $ZSYNC_TABLES_TOKEN>",
    "secret_header": "X-Zsync-Secret",
    "secret": "<sent with each trigger delivery; default: $ZSYNC_WEBHOOK_SECRET>",
    "autoreplay": [300, 1800, 3600, 10800, 21600],
    "tables": [
      {"name": "agent_jobs", "table_id": "tbl_agent_jobs",
       "trigger_url": "http://127.0.0.1:9000/agent_jobs_to_supabase", "stamp_updated_at": true}
    ]
  }
"""


@dataclass(frozen=True)
class CliConfig:
    token: str
    secret_header: str
    secret: str | None
    autoreplay: tuple[float, ...]
    tables: tuple[TableConfig, ...]


def load_config(path: Path) -> CliConfig:
    from shared.settings import DEFAULT_SECRET_HEADER

    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), list):
        raise ValueError('config must be a JSON object with a "tables" list')
    tables = tuple(TableConfig(**t) for t in raw["tables"])
    token = raw.get("token") or os.environ.get("ZSYNC_TABLES_TOKEN")
    if not token:
        raise ValueError('no token: set "token" in the config or ZSYNC_TABLES_TOKEN')
    return CliConfig(
        token=token,
        secret_header=raw.get("secret_header") or DEFAULT_SECRET_HEADER,
        secret=raw.get("secret") or os.environ.get("ZSYNC_WEBHOOK_SECRET"),
        autoreplay=tuple(float(d) for d in raw.get("autoreplay", ())),
        tables=tables,
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.tables_service",
        description="Local stand-in for the Zapier Tables records API and the Zaps' record triggers.",
        epilog=_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", required=True, type=Path, help="SQLite file holding the records (created if missing)")
    parser.add_argument("--config", required=True, type=Path, help="JSON config file (format below)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port, printed at start)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; admin has no auth)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except (OSError, ValueError, TypeError) as exc:
        print(f"tables_service: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    service = start_tables_service(
        args.db,
        config.tables,
        config.token,
        config.secret_header,
        config.secret,
        host=args.host,
        port=args.port,
        autoreplay=config.autoreplay,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"tables service listening on {service.url} (db {args.db})", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

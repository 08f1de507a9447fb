"""Local stand-in for Zapier Tables (the API the official SDK speaks) and for the Zaps' record triggers.

It serves the same paths as ``https://sdkapi.zapier.com`` (``/api/v0/sdk/tables/api/v1/...``, see
``/work/shared/reference/zapier-tables-api.md`` and :mod:`shared.adapters.zapier_tables`) over real HTTP, plus
Zapier's OAuth token endpoint (``POST /oauth/token/``, client credentials), so both our client and
Zapier's official SDK (``@zapier/zapier-sdk``, pointed at this base URL) can use it. Anything else
(the SDK's telemetry, ``/api/v4/tracking/event/``) gets a quiet 204. State is a SQLite file (WAL, one
connection, one lock): restarting on the same file keeps tables, fields and records.

Emulated Zapier behaviour:

* Tables and records have 26-character ULID ids; fields have integer ids (``f<n>`` in record data) and
  a type. Values that do not fit a field's type are refused per record (``errors`` on the record, the
  field left unset); an unknown field id refuses the whole request (``meta.errors``), both in a 200.
* Query (``POST .../records/query``): filters exact/different/contains/icontains/gt/gte/lt/lte/in/
  isnull/startswith, orders, cursor paging (``meta.pagination``), ``trash=exclude|include|only``.
  ``exact`` and ``in`` use an index of field values, so a find by id costs the same at any table size.
* Writes answer changesets; ``edited_at`` is set on every change; delete moves records to the trash.
* As harsh as Zapier: a write stores only the fields the caller sends (no ``created_at`` / ``updated_at``
  field is ever filled in; ``edited_at`` is Zapier's own record metadata), and an empty cell (``null``,
  ``""``, ``[]``) is left out of ``data``: writing one empties the cell.
* Rate limit: ``rate_limit`` requests per ``rate_window_s`` per table (default Zapier's 100 per 5 s),
  429 with ``Retry-After`` beyond it.
* Triggers: after a create, or an update that changes the data, the record is POSTed to the table's
  ``trigger_url`` (configured by table *name*) as its fields by name, plus ``"id": <record id>`` when it
  has no ``id`` field, plus ``"edited_at"``, with the shared secret header; once per change, in
  background workers, with ``autoreplay`` (Zapier's is 5 min, 30 min, 1 h, 3 h, 6 h).

Fault injection: ``POST /_admin/faults`` ``{"status": 503, "count": N}`` answers the next N records-API
requests with that status (``"retry_after"`` adds the header); ``"for_s": S`` makes it every request for
S seconds instead; ``"hang_s": H`` waits H seconds before answering (a hang past the client's timeout);
``"status": 200`` refuses inside a 200 (``meta.errors``, nothing changed); ``"method": "DELETE"`` limits
the fault to requests of that method.

A person's actions in Zapier's UI that the API does not offer: ``POST /_admin/tables/{t}/records/{r}/restore``
(restore from the trash: live again, ``edited_at`` the restore time, the trigger fires as for an update) and
``POST /_admin/tables/{t}/trash/empty`` (trashed records gone for good, as when the trash is emptied).
``TriggerDispatcher.drop_share`` loses that share of trigger delivery attempts in transit.

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
import math
import os
import queue
import random
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Self

import requests
from flask import Flask, Response, jsonify, request
from waitress import wasyncore
from waitress.server import BaseWSGIServer, create_server
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from infra.local.sqlite_store import SqliteStore
from infra.local.trigger_inbox_service import (
    INBOX_PATH,
    META_PATH,
    QUARANTINE_AFTER,
    InboxService,
    inbox_blueprint,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v0/sdk/tables/api/v1"
TOKEN_PATH = "/oauth/token/"
PAGE_DEFAULT = 100
PAGE_MAX = 1000
BATCH_MAX = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_FIELDS = 200
DELIVERY_LOG_MAX = 10_000
FLUSH_DEFAULT_S = 10.0
FLUSH_MAX_S = 120.0
TOKEN_TTL_S = 3600
RATE_LIMIT = 100  # requests per table per window (Zapier's documented limit for Zap steps)
RATE_WINDOW_S = 5.0
FIELD_TYPES = frozenset({
    "string", "text", "number", "decimal", "boolean", "datetime", "json", "uuid", "email", "link",
    "currency", "phone_number", "multiple_string", "multiple_email", "multiple_link", "multiple_number",
})
OPERATORS = frozenset({"exact", "different", "contains", "icontains", "gte", "gt", "lt", "lte", "in", "isnull",
                       "startswith"})
_ULID_RE = re.compile(r"^[0-9A-Z]{26}$")
_FIELD_KEY_RE = re.compile(r"^f(\d{1,9})$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ACCOUNT_ID = 1
USER_ID = 1

Data = dict[str, Any]
Rec = dict[str, Any]


@dataclass(frozen=True)
class TableConfig:
    """How the service behaves for the table of this *name* (tables themselves are made through the API)."""

    name: str
    trigger_url: str | None = None


class ApiError(Exception):
    """An error answered as ``{"errors": [{"title": message}], "error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class RefusedRequest(Exception):
    """A request Zapier answers 200 with ``meta.errors`` and no change."""

    def __init__(self, title: str, meta: Mapping[str, Any]) -> None:
        super().__init__(title)
        self.error = {"title": title, "human_title": title, "meta": dict(meta)}


# --- small helpers -------------------------------------------------------------------------------------


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_ulid() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32, 26 characters."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def index_text(value: Any) -> str | None:
    """The text an ``exact``/``in`` filter compares (numbers canonical, so 3 and 3.0 match)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        number = float(value)
        return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def encode_cursor(position: dict[str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def decode_cursor(cursor: Any) -> dict[str, int]:
    try:
        if not isinstance(cursor, str):
            raise ValueError(cursor)
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
            raise ValueError(cursor)
        return value
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid cursor") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _datetime_ok(value: str) -> bool:
    try:
        datetime.fromisoformat(value.strip())
    except ValueError:
        return False
    return True


def check_value(ftype: str, value: Any) -> tuple[Any, str | None]:
    """``(stored value, None)`` or ``(None, problem)`` for a value written to a field of ``ftype``; an empty
    value (null, "", []) empties the cell whatever the type."""
    if is_empty_cell(value):
        return None, None
    match ftype:
        case "number" | "decimal" | "currency":
            number = _number(value)
            if number is None:
                return None, f"{value!r:.60} is not a number"
            if isinstance(value, int | float) and not isinstance(value, bool):
                return value, None
            return (int(number) if number.is_integer() else number), None
        case "boolean":
            return (value, None) if isinstance(value, bool) else (None, f"{value!r:.60} is not a boolean")
        case "datetime":
            if isinstance(value, str) and _datetime_ok(value):
                return value, None
            return None, f"{value!r:.60} is not an ISO-8601 datetime"
        case "json":
            return value, None  # any JSON value (JSON text stays text)
        case _ if ftype.startswith("multiple_"):
            if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                               for v in value):
                return value, None
            return None, f"{value!r:.60} is not a list"
        case _:
            if isinstance(value, str):
                return value, None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value), None
            return None, f"{value!r:.60} is not text"


def _matches(op: str, stored: Any, wanted: Any) -> bool:
    if op == "isnull":
        is_null = stored is None or stored == "" or stored == []
        return is_null == bool(wanted)
    if op == "in":
        return isinstance(wanted, list) and index_text(stored) in {index_text(w) for w in wanted}
    if op == "exact":
        return stored is not None and index_text(stored) == index_text(wanted)
    if op == "different":
        return index_text(stored) != index_text(wanted)
    if stored is None:
        return False
    if op in ("contains", "icontains", "startswith"):
        text, part = str(index_text(stored)), str(index_text(wanted))
        if op == "icontains":
            return part.lower() in text.lower()
        return text.startswith(part) if op == "startswith" else part in text
    a, b = _number(stored), _number(wanted)
    if a is None or b is None:
        a, b = index_text(stored), index_text(wanted)  # ISO datetimes and text compare as text
    return {"gt": a > b, "gte": a >= b, "lt": a < b, "lte": a <= b}[op]  # type: ignore[operator]


# --- durable storage -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tables (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT, created_at TEXT NOT NULL,
    edited_at TEXT NOT NULL, schema_revision INTEGER NOT NULL DEFAULT 1, deleted_at TEXT
);
CREATE TABLE IF NOT EXISTS fields (
    table_id TEXT NOT NULL, id INTEGER NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
    options TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL, edited_at TEXT NOT NULL,
    deleted_at TEXT, PRIMARY KEY (table_id, id)
);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, table_id TEXT NOT NULL, id TEXT NOT NULL UNIQUE, data TEXT NOT NULL,
    errors TEXT, created_at TEXT NOT NULL, edited_at TEXT NOT NULL, schema_revision_id INTEGER NOT NULL,
    deleted_at TEXT
);
CREATE INDEX IF NOT EXISTS records_by_table ON records (table_id, seq);
CREATE TABLE IF NOT EXISTS record_values (
    table_id TEXT NOT NULL, field_id INTEGER NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS record_values_lookup ON record_values (table_id, field_id, value, seq);
CREATE INDEX IF NOT EXISTS record_values_by_seq ON record_values (seq);
"""


def _row_record(row: sqlite3.Row) -> Rec:
    record = {
        "id": row["id"],
        "data": json.loads(row["data"]),
        "created_at": row["created_at"],
        "edited_at": row["edited_at"],
        "schema_revision_id": row["schema_revision_id"],
        "deleted_at": row["deleted_at"],
    }
    errors = json.loads(row["errors"]) if row["errors"] else None  # stored as "null" when there are none
    if errors:
        record["errors"] = errors
    return record


def _row_field(row: sqlite3.Row) -> Data:
    return {
        "id": row["id"], "type": row["type"], "name": row["name"], "options": json.loads(row["options"]),
        "config": json.loads(row["config"]), "created_at": row["created_at"], "edited_at": row["edited_at"],
        "deleted_at": row["deleted_at"],
    }


def _row_table(row: sqlite3.Row) -> Data:
    return {
        "id": row["id"], "name": row["name"], "description": row["description"], "created_at": row["created_at"],
        "edited_at": row["edited_at"], "kind": "table", "owner_account_id": ACCOUNT_ID,
        "owner_zapier_customuser_id": USER_ID, "parent_table_id": None,
    }


class RecordStore(SqliteStore):
    """SQLite persistence of tables, fields and records (see :class:`SqliteStore`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)


# --- the engine: tables, fields, records ---------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    table: Data
    revision: int
    fields: dict[int, Data]  # live fields by id

    def by_name(self, name: str) -> Data | None:
        return next((f for f in self.fields.values() if f["name"] == name), None)

    def key_of(self, name: str) -> str | None:
        found = self.by_name(name)
        return f"f{found['id']}" if found else None


def _field_id(key: Any, schema: Schema) -> int:
    match = _FIELD_KEY_RE.match(key) if isinstance(key, str) else None
    if match is None or int(match.group(1)) not in schema.fields:
        raise RefusedRequest(f"Unknown field id {str(key)[:40]!r}", {"field_id": str(key)[:40]})
    return int(match.group(1))


class RecordEngine:
    """The Tables API's behaviour over :class:`RecordStore`."""

    def __init__(self, store: RecordStore, configs: Sequence[TableConfig]) -> None:
        self.store = store
        self.configs = {c.name: c for c in configs}
        self.rows_read = 0  # records a query read from the store (a find by an indexed value reads only its hits)

    # -- tables and fields --

    def list_tables(self, limit: int, offset: int, q: str | None) -> tuple[list[Data], bool]:
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT * FROM tables WHERE deleted_at IS NULL ORDER BY created_at, id").fetchall()
        tables = [_row_table(r) for r in rows if not q or q.lower() in r["name"].lower()]
        return tables[offset : offset + limit], len(tables) > offset + limit

    def create_table(self, name: str, description: str | None) -> Data:
        now = utc_now_iso()
        tid = new_ulid()
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO tables (id, name, description, created_at, edited_at) VALUES (?, ?, ?, ?, ?)",
                         (tid, name, description, now, now))
            return _row_table(conn.execute("SELECT * FROM tables WHERE id = ?", (tid,)).fetchone())

    def delete_table(self, table_id: str) -> None:
        with self.store.transaction() as conn:
            self._schema(conn, table_id)
            conn.execute("UPDATE tables SET deleted_at = ? WHERE id = ?", (utc_now_iso(), table_id))

    def schema(self, table_id: str) -> Schema:
        with self.store.transaction() as conn:
            return self._schema(conn, table_id)

    def table_name(self, table_id: str) -> str:
        return self.schema(table_id).table["name"]

    def table_exists(self, table_id: str) -> bool:
        with self.store.transaction() as conn:
            row = conn.execute("SELECT 1 FROM tables WHERE id = ? AND deleted_at IS NULL", (table_id,)).fetchone()
        return row is not None

    def table_ids_by_name(self) -> dict[str, str]:
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT id, name FROM tables WHERE deleted_at IS NULL ORDER BY created_at").fetchall()
        return {r["name"]: r["id"] for r in rows}

    def create_fields(self, table_id: str, new_fields: list[Data]) -> list[Data]:
        now = utc_now_iso()
        with self.store.transaction() as conn:
            schema = self._schema(conn, table_id)
            last = conn.execute("SELECT max(id) FROM fields WHERE table_id = ?", (table_id,)).fetchone()[0]
            next_id = (last or 0) + 1
            created = []
            for n, f in enumerate(new_fields):
                name, ftype = f.get("name"), f.get("type")
                if not isinstance(name, str) or not name.strip() or len(name) > 255:
                    raise ApiError(400, f"new_fields[{n}].name must be a non-empty string")
                if ftype not in FIELD_TYPES:
                    raise ApiError(400, f"new_fields[{n}].type {str(ftype)[:40]!r} is not a supported field type")
                if schema.by_name(name) or any(c["name"] == name for c in created):
                    raise ApiError(400, f"new_fields[{n}]: a field named {name!r} already exists")
                conn.execute(
                    "INSERT INTO fields (table_id, id, name, type, options, config, created_at, edited_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (table_id, next_id, name, ftype, json.dumps(f.get("options") or {}),
                     json.dumps(f.get("config") or {}), now, now))
                created.append(_row_field(conn.execute(
                    "SELECT * FROM fields WHERE table_id = ? AND id = ?", (table_id, next_id)).fetchone()))
                next_id += 1
            if created:
                conn.execute("UPDATE tables SET schema_revision = schema_revision + 1, edited_at = ? WHERE id = ?",
                             (now, table_id))
        return created

    def delete_fields(self, table_id: str, field_ids: list[int]) -> None:
        now = utc_now_iso()
        with self.store.transaction() as conn:
            schema = self._schema(conn, table_id)
            for fid in field_ids:
                if fid not in schema.fields:
                    raise ApiError(404, f"unknown field {fid}")
            conn.executemany("UPDATE fields SET deleted_at = ? WHERE table_id = ? AND id = ?",
                             [(now, table_id, fid) for fid in field_ids])
            conn.execute("UPDATE tables SET schema_revision = schema_revision + 1 WHERE id = ?", (table_id,))

    # -- records --

    def create_many(self, table_id: str, items: list[Data]) -> list[Data]:
        """Create records; answer changesets. An unknown field id refuses the whole request."""
        now = utc_now_iso()
        with self.store.transaction() as conn:
            schema = self._schema(conn, table_id)
            changes = []
            for given in items:
                data, errors = self._validate(schema, given)
                data = _without_empty(data)
                record = {"id": new_ulid(), "data": data, "created_at": now, "edited_at": now,
                          "schema_revision_id": schema.revision, "deleted_at": None}
                if errors:
                    record["errors"] = errors
                self._insert(conn, table_id, record)
                changes.append(self._changeset(None, record))
        return changes

    def update_many(self, table_id: str, updates: list[tuple[str, Data]]) -> list[Data]:
        """Apply partial updates atomically; answer changesets (``changed_field_ids`` empty: no change)."""
        now = utc_now_iso()
        with self.store.transaction() as conn:
            schema = self._schema(conn, table_id)
            changes = []
            for rid, given in updates:
                old = self._existing(conn, table_id, rid)
                valid, errors = self._validate(schema, given)
                merged = _without_empty(old["data"] | valid)
                changed = sorted(int(k[1:]) for k in merged.keys() | old["data"].keys()
                                 if merged.get(k) != old["data"].get(k))
                new = {k: v for k, v in old.items() if k != "errors"} | ({"errors": errors} if errors else {})
                if changed:
                    new |= {"data": merged, "edited_at": now, "schema_revision_id": schema.revision}
                    self._replace(conn, table_id, new)
                changes.append(self._changeset(old, new, changed))
        return changes

    def get(self, table_id: str, rid: str) -> Rec:
        with self.store.transaction() as conn:
            self._schema(conn, table_id)
            return self._existing(conn, table_id, rid, trash=True)

    def delete_many(self, table_id: str, rids: list[str]) -> None:
        now = utc_now_iso()
        with self.store.transaction() as conn:
            self._schema(conn, table_id)
            for rid in rids:
                self._existing(conn, table_id, rid)
            conn.executemany("UPDATE records SET deleted_at = ?, edited_at = ? WHERE table_id = ? AND id = ?",
                             [(now, now, table_id, rid) for rid in rids])

    def restore(self, table_id: str, rid: str) -> Data:
        """A person restores a record from the trash (Zapier's UI): it is live again with its data as it was,
        ``edited_at`` the restore time. -> the changeset (every field counted as changed: the trigger fires)."""
        now = utc_now_iso()
        with self.store.transaction() as conn:
            self._schema(conn, table_id)
            old = self._existing(conn, table_id, rid, trash=True)
            if not old["deleted_at"]:
                raise ApiError(409, f"record {rid} is not in the trash")
            conn.execute("UPDATE records SET deleted_at = NULL, edited_at = ? WHERE table_id = ? AND id = ?",
                         (now, table_id, rid))
            new = old | {"deleted_at": None, "edited_at": now}
        return self._changeset(old, new, sorted(int(k[1:]) for k in new["data"]))

    def empty_trash(self, table_id: str) -> int:
        """The trash emptied (by a person, or Zapier's retention): trashed records are gone for good."""
        with self.store.transaction() as conn:
            self._schema(conn, table_id)
            seqs = [r[0] for r in conn.execute("SELECT seq FROM records WHERE table_id = ? AND deleted_at IS NOT NULL",
                                               (table_id,))]
            conn.executemany("DELETE FROM record_values WHERE seq = ?", [(q,) for q in seqs])
            conn.executemany("DELETE FROM records WHERE seq = ?", [(q,) for q in seqs])
        return len(seqs)

    def query(self, table_id: str, body: Data, trash: str) -> tuple[list[Rec], Data]:
        limit = body.get("limit", PAGE_DEFAULT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX:
            raise ApiError(400, f"limit must be an integer from 1 to {PAGE_MAX}")
        cursor_query = body.get("cursor_query") or {}
        if not isinstance(cursor_query, dict):
            raise ApiError(400, "cursor_query must be an object")
        start = decode_cursor(cursor_query["start_cursor"]) if cursor_query.get("start_cursor") else {}
        with self.store.transaction() as conn:
            schema = self._schema(conn, table_id)
            filters = self._filters(schema, body.get("filters") or [])
            orders = self._orders(schema, body.get("orders") or [])
            trash_sql = {"exclude": " AND deleted_at IS NULL", "only": " AND deleted_at IS NOT NULL",
                         "include": ""}[trash]
            indexed = [(fid, op, v) for fid, op, v in filters if op in ("exact", "in")]
            if indexed:
                fid, op, wanted = indexed[0]
                values = [index_text(w) for w in (wanted if op == "in" else [wanted])]
                marks = ",".join("?" * len(values))
                rows = conn.execute(
                    f"SELECT r.* FROM records r WHERE r.seq IN (SELECT seq FROM record_values WHERE table_id = ?"
                    f" AND field_id = ? AND value IN ({marks})) AND r.seq > ?{trash_sql} ORDER BY r.seq",
                    [table_id, fid, *values, start.get("seq", 0)]).fetchall()
                page_rows = iter(rows)
            else:
                page_rows = self._scan(conn, table_id, start.get("seq", 0) if not orders else 0, trash_sql)
            page_rows = self._counted(page_rows)
            matching = (r for r in page_rows if all(
                _matches(op, json.loads(r["data"]).get(f"f{fid}"), v) for fid, op, v in filters))
            if orders:
                rows = list(matching)
                for fid, direction in reversed(orders):
                    rows.sort(key=lambda r, k=f"f{fid}": _sort_key(json.loads(r["data"]).get(k)),
                              reverse=direction == "desc")
                offset = start.get("offset", 0)
                page = rows[offset : offset + limit]
                more = len(rows) > offset + limit
                end = {"offset": offset + limit}
            else:
                page = list(itertools.islice(matching, limit + 1))
                more = len(page) > limit
                page = page[:limit]
                end = {"seq": page[-1]["seq"]} if page else start
        pagination = {"start_cursor": encode_cursor(start) if start else None,
                      "end_cursor": encode_cursor(end) if page else None, "has_more": more, "has_less": bool(start)}
        return [_row_record(r) for r in page], pagination

    # -- internals --

    def _counted(self, rows: Iterator[sqlite3.Row]) -> Iterator[sqlite3.Row]:
        for row in rows:
            self.rows_read += 1  # under the store lock (the query's transaction)
            yield row

    def _scan(self, conn: sqlite3.Connection, table_id: str, after: int, trash_sql: str) -> Iterator[sqlite3.Row]:
        while True:
            rows = conn.execute(f"SELECT * FROM records WHERE table_id = ? AND seq > ?{trash_sql} ORDER BY seq"
                                " LIMIT 500", (table_id, after)).fetchall()
            yield from rows
            if len(rows) < 500:
                return
            after = rows[-1]["seq"]

    def _schema(self, conn: sqlite3.Connection, table_id: str) -> Schema:
        if not _ULID_RE.match(table_id):
            raise ApiError(404, f"unknown table {table_id[:40]!r}")
        row = conn.execute("SELECT * FROM tables WHERE id = ? AND deleted_at IS NULL", (table_id,)).fetchone()
        if row is None:
            raise ApiError(404, f"unknown table {table_id}")
        fields = conn.execute("SELECT * FROM fields WHERE table_id = ? AND deleted_at IS NULL ORDER BY id",
                              (table_id,)).fetchall()
        return Schema(_row_table(row), row["schema_revision"], {f["id"]: _row_field(f) for f in fields})

    @staticmethod
    def _validate(schema: Schema, given: Data) -> tuple[Data, Data]:
        """The values that fit their fields, and per-field errors for those that do not."""
        if not isinstance(given, dict):
            raise ApiError(400, "record data must be an object keyed by field id")
        data, errors = {}, {}
        for key, value in given.items():
            fid = _field_id(key, schema)
            stored, problem = check_value(schema.fields[fid]["type"], value)
            if problem is None:
                data[key] = stored
            else:
                errors[key] = {"s": "error", "e": problem, "h": f"{schema.fields[fid]['name']}: {problem}", "v": value}
        return data, errors

    @staticmethod
    def _filters(schema: Schema, filters: Any) -> list[tuple[int, str, Any]]:
        if not isinstance(filters, list):
            raise ApiError(400, "filters must be a list")
        out = []
        for n, f in enumerate(filters):
            if not isinstance(f, dict) or f.get("operator") not in OPERATORS:
                raise ApiError(400, f"filters[{n}]: expected {{key, operator, value}} with a known operator")
            if f["operator"] == "in" and (not isinstance(f.get("value"), list) or len(f["value"]) > PAGE_MAX):
                raise ApiError(400, f"filters[{n}]: 'in' needs a list of at most {PAGE_MAX} values")
            out.append((_field_id(f.get("key"), schema), f["operator"], f.get("value")))
        return out

    @staticmethod
    def _orders(schema: Schema, orders: Any) -> list[tuple[int, str]]:
        if not isinstance(orders, list):
            raise ApiError(400, "orders must be a list")
        out = []
        for n, o in enumerate(orders):
            if not isinstance(o, dict) or o.get("direction", "asc") not in ("asc", "desc"):
                raise ApiError(400, f"orders[{n}]: expected {{key, direction: asc|desc}}")
            out.append((_field_id(o.get("key"), schema), o.get("direction", "asc")))
        return out

    def _insert(self, conn: sqlite3.Connection, table_id: str, record: Rec) -> None:
        seq = conn.execute(
            "INSERT INTO records (table_id, id, data, errors, created_at, edited_at, schema_revision_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (table_id, record["id"], json.dumps(record["data"]), json.dumps(record.get("errors") or None),
             record["created_at"], record["edited_at"], record["schema_revision_id"])).lastrowid
        self._index(conn, table_id, seq, record["data"])

    def _replace(self, conn: sqlite3.Connection, table_id: str, record: Rec) -> None:
        seq = conn.execute("SELECT seq FROM records WHERE id = ?", (record["id"],)).fetchone()[0]
        conn.execute("UPDATE records SET data = ?, errors = ?, edited_at = ?, schema_revision_id = ? WHERE seq = ?",
                     (json.dumps(record["data"]), json.dumps(record.get("errors") or None), record["edited_at"],
                      record["schema_revision_id"], seq))
        conn.execute("DELETE FROM record_values WHERE seq = ?", (seq,))
        self._index(conn, table_id, seq, record["data"])

    @staticmethod
    def _index(conn: sqlite3.Connection, table_id: str, seq: int, data: Data) -> None:
        conn.executemany(
            "INSERT INTO record_values (table_id, field_id, value, seq) VALUES (?, ?, ?, ?)",
            [(table_id, int(k[1:]), index_text(v), seq) for k, v in data.items()
             if v is not None and not isinstance(v, dict | list)])

    @staticmethod
    def _existing(conn: sqlite3.Connection, table_id: str, rid: Any, *, trash: bool = False) -> Rec:
        if not isinstance(rid, str) or not _ULID_RE.match(rid):
            raise ApiError(404, f"unknown record {str(rid)[:40]!r}")
        row = conn.execute("SELECT * FROM records WHERE table_id = ? AND id = ?", (table_id, rid)).fetchone()
        if row is None or (row["deleted_at"] and not trash):
            raise ApiError(404, f"unknown record {rid}")
        return _row_record(row)

    @staticmethod
    def _changeset(old: Rec | None, new: Rec, changed: list[int] | None = None) -> Data:
        return {"change_id": new_ulid(), "old": old, "new": new,
                "changed_field_ids": changed if old is not None else None, "record_id": new["id"]}


def is_empty_cell(value: Any) -> bool:
    """A value Zapier shows as an empty cell and leaves out of a record's ``data``."""
    return value is None or value == "" or value == []


def _without_empty(data: Data) -> Data:
    return {k: v for k, v in data.items() if not is_empty_cell(v)}


def _sort_key(value: Any) -> tuple[int, Any]:
    number = _number(value) if not isinstance(value, str) else None
    if value is None:
        return (2, "")
    return (0, number) if number is not None else (1, str(index_text(value)))


# --- trigger delivery ----------------------------------------------------------------------------------


@dataclass
class Delivery:
    url: str
    table_id: str
    record_id: str
    payload: Data
    attempt: int = 1


def trigger_payload(record: Rec, names: Mapping[str, str]) -> Data:
    """What a Zap's "new or updated record" trigger hands to its webhook step: the fields by name, the
    record id as ``id`` when the record has no ``id`` value (no such field, or the cell is empty: left out of
    ``data``), and Zapier's ``edited_at``."""
    payload = {names.get(k, k): v for k, v in record["data"].items()}
    payload.setdefault("id", record["id"])
    payload["edited_at"] = record["edited_at"]
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
        # Fault knob (soak / chaos tests): the share of delivery attempts lost in transit (never POSTed,
        # logged with error "dropped"). A dropped attempt is a failed one: Autoreplay re-sends it when
        # configured (``autoreplay``), as Zapier does on paid plans; without it, it is lost.
        self.drop_share = 0.0
        self._drop_rng = random.Random()
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
                "dropped": self._counts["dropped"],
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
        with self._cond:
            drop = self.drop_share > 0 and self._drop_rng.random() < self.drop_share
            if drop:
                self._counts["dropped"] += 1
        status, error = (None, "dropped") if drop else self._post(delivery)
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


class RateLimiter:
    """At most ``limit`` requests per ``window_s`` per key (a sliding window); None: unlimited."""

    def __init__(self, limit: int | None, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self._lock = threading.Lock()
        self._seen: dict[str, deque[float]] = {}

    def take(self, key: str) -> float | None:
        """None when allowed, else the seconds until a request would be."""
        if self.limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key, deque())
            while seen and seen[0] <= now - self.window_s:
                seen.popleft()
            if len(seen) >= self.limit:
                return seen[0] + self.window_s - now
            seen.append(now)
            return None


class ServiceStats:
    def __init__(self, table_ids: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._table_ids = list(table_ids)
        self._writes: Counter[str] = Counter({t: 0 for t in self._table_ids})
        self._same_version: Counter[str] = Counter({t: 0 for t in self._table_ids})
        self._requests = 0

    def reset(self) -> None:
        with self._lock:
            self._writes = Counter({t: 0 for t in self._table_ids})
            self._same_version = Counter({t: 0 for t in self._table_ids})
            self._requests = 0

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def count_writes(self, table_id: str, n: int) -> None:
        with self._lock:
            self._writes[table_id] += n

    def count_same_version(self, table_id: str, n: int) -> None:
        with self._lock:
            self._same_version[table_id] += n

    def snapshot(self) -> Data:
        with self._lock:
            return {"writes": dict(self._writes), "same_version_writes": dict(self._same_version),
                    "api_requests": self._requests}


def _version_time(value: Any) -> Any:
    """A record's ``updated_at`` at millisecond precision (as the sync compares it); else the value as is."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return value
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC).replace(microsecond=parsed.microsecond // 1000 * 1000)
    return value


def same_version_updates(changes: Sequence[Data], updated_at_key: str | None) -> int:
    """Updates that left a record's ``updated_at`` where it was (changed or not): a write of the version the
    record already held - the sync's echo, unless a person edited a cell without touching ``updated_at``."""
    if updated_at_key is None:
        return 0
    same = 0
    for c in changes:
        before = c["old"]["data"].get(updated_at_key) if c["old"] is not None else None
        if before is not None and _version_time(before) == _version_time(c["new"]["data"].get(updated_at_key)):
            same += 1
    return same


@dataclass
class _Fault:
    status: int
    count: int
    retry_after: int | None
    until: float | None = None  # time.monotonic() deadline: the fault lasts until then (count not used)
    hang_s: float = 0.0  # wait this long before answering (past the client's timeout: a hang)
    method: str | None = None  # only requests of this HTTP method (None: every request)


class FaultInjector:
    """Makes the next N records-API requests (or every request for ``for_s`` seconds) answer a given
    status, optionally after hanging ``hang_s`` seconds first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fault: _Fault | None = None
        self._served = 0

    def stats(self) -> Data:
        with self._lock:
            if self._fault and self._fault.until is not None:
                return {"served": self._served, "left": 1 if time.monotonic() < self._fault.until else 0}
            return {"served": self._served, "left": self._fault.count if self._fault else 0}

    def arm(self, status: int, count: int, retry_after: int | None, *, for_s: float | None = None,
            hang_s: float = 0.0, method: str | None = None) -> None:
        with self._lock:
            until = time.monotonic() + for_s if for_s is not None else None
            self._fault = _Fault(status, count, retry_after, until, hang_s, method)

    def clear(self) -> None:
        with self._lock:
            self._fault = None

    def take(self, method: str | None = None) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or (fault.method is not None and fault.method != method):
                return None
            if fault.until is not None:
                if time.monotonic() >= fault.until:
                    self._fault = None
                    return None
            elif fault.count <= 0:
                return None
            else:
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


def _list_of(body: Data, key: str, limit: int = BATCH_MAX) -> list[Any]:
    items = body.get(key)
    if not isinstance(items, list) or not 1 <= len(items) <= limit:
        raise ApiError(400, f"{key} must be a list of 1 to {limit} items")
    return items


def _record_data(item: Any, where: str) -> Data:
    data = item.get("data") if isinstance(item, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, f'{where} must be {{"data": {{"f<id>": value}}}}')
    if len(data) > MAX_FIELDS:
        raise ApiError(400, f"{where}.data has more than {MAX_FIELDS} fields")
    return data


def _trash() -> str:
    trash = request.args.get("trash", "exclude")
    if trash not in ("exclude", "include", "only"):
        raise ApiError(400, "trash must be exclude, include or only")
    return trash


def _int_arg(name: str, default: int, high: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) > high:
        raise ApiError(400, f"{name} must be an integer from 0 to {high}")
    return int(value)


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




def _refused(exc: RefusedRequest) -> Response:
    return jsonify(data=[], meta={"errors": [exc.error]})


# --- the Flask app -------------------------------------------------------------------------------------


@dataclass
class ServiceContext:
    engine: RecordEngine
    dispatcher: TriggerDispatcher
    client_id: str
    client_secret: str
    static_token: str | None
    stats: ServiceStats
    limiter: RateLimiter
    token_ttl_s: int = TOKEN_TTL_S
    faults: FaultInjector = field(default_factory=FaultInjector)
    triggers: dict[str, str | None] = field(default_factory=dict)  # by table name
    tokens: dict[str, float] = field(default_factory=dict)  # issued token -> expiry (time.time())
    stopped: bool = False
    inboxes: InboxService | None = None  # trigger inboxes (infra/local/trigger_inbox_service.py)

    def after_change(self, table_id: str, changes: Sequence[Data]) -> None:
        """Count the writes and queue one trigger delivery per changed record."""
        records = [c["new"] for c in changes if c["old"] is None or c["changed_field_ids"]]
        self.stats.count_writes(table_id, len(records))
        for record in records if self.inboxes else ():
            self.inboxes.publish(table_id, record)  # type: ignore[union-attr]
        schema = self.engine.schema(table_id)
        self.stats.count_same_version(table_id, same_version_updates(changes, schema.key_of("updated_at")))
        url = self.triggers.get(schema.table["name"])
        names = {f"f{fid}": f["name"] for fid, f in schema.fields.items()}
        for record in records if url else ():
            self.dispatcher.enqueue(Delivery(url, table_id, record["id"], trigger_payload(record, names)))

    def issue_token(self) -> str:
        token = "zlt-" + secrets.token_urlsafe(32)
        now = time.time()
        self.tokens = {t: exp for t, exp in self.tokens.items() if exp > now} | {token: now + self.token_ttl_s}
        return token

    def token_ok(self, given: str) -> bool:
        if self.static_token and hmac.compare_digest(given.encode(), self.static_token.encode()):
            return True
        expiry = self.tokens.get(given)
        return expiry is not None and expiry > time.time()


def _check_auth(ctx: ServiceContext) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() not in ("bearer", "jwt") or not ctx.token_ok(given.strip()):
        raise ApiError(401, "missing, invalid or expired token", {"WWW-Authenticate": "Bearer"})


# Tables API, trigger inboxes and the app metadata the inbox setup reads: all need a token.
_GATED = (API_PREFIX + "/", INBOX_PATH, META_PATH + "/implementations")
_TABLE_IN_PATH = re.compile(re.escape(API_PREFIX) + r"/tables/([0-9A-Z]{26})(?:/|$)")


def _gate(ctx: ServiceContext) -> None:
    """Runs before every Tables API request: count, read the body, faults, auth, rate limit."""
    ctx.stats.count_request()
    request.get_data(cache=True)  # read the body first: an early error must not leave it unread
    if ctx.stopped:
        raise ApiError(503, "service is stopping")
    fault = ctx.faults.take(request.method)
    if fault is not None:
        if fault.hang_s:
            time.sleep(fault.hang_s)
        if fault.status == 200:  # refused inside a 200, as Zapier does: meta.errors, nothing changed
            raise RefusedRequest("injected refusal", {"fault": "injected"})
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        raise ApiError(fault.status, f"injected fault {fault.status}", headers)
    _check_auth(ctx)
    table = _TABLE_IN_PATH.match(request.path)
    wait = ctx.limiter.take(table.group(1)) if table else None
    if wait is not None:
        raise ApiError(429, f"rate limit: {ctx.limiter.limit} requests per {ctx.limiter.window_s:g}s per table",
                       {"Retry-After": str(max(1, math.ceil(wait))), "X-RateLimit-Limit": str(ctx.limiter.limit),
                        "X-RateLimit-Remaining": "0"})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify(errors=[{"status": status, "title": message}], error=message)
    response.status_code = status
    response.headers.update(dict(headers or {}))
    return response


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.errorhandler(RefusedRequest)
    def _refused_request(exc: RefusedRequest) -> Response:
        return _refused(exc)

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


def _register_token_endpoint(app: Flask, ctx: ServiceContext) -> None:
    @app.post(TOKEN_PATH)
    def token() -> Response | tuple[Response, int]:
        form = request.form
        if form.get("grant_type") != "client_credentials":
            return jsonify(error="unsupported_grant_type"), 400
        ok_id = hmac.compare_digest(form.get("client_id", "").encode(), ctx.client_id.encode())
        ok_secret = hmac.compare_digest(form.get("client_secret", "").encode(), ctx.client_secret.encode())
        if not (ok_id and ok_secret):
            return jsonify(error="invalid_client"), 401
        return jsonify(access_token=ctx.issue_token(), token_type="Bearer", expires_in=ctx.token_ttl_s,
                       scope=form.get("scope", "external"))


def _register_tables_api(app: Flask, ctx: ServiceContext) -> None:
    engine = ctx.engine
    tables = API_PREFIX + "/tables"
    records = tables + "/<table_id>/records"

    @app.before_request
    def _before() -> None:
        if request.path.startswith(_GATED):
            _gate(ctx)

    @app.get(tables)
    def list_tables() -> Response:
        found, more = engine.list_tables(_int_arg("limit", 100, 1000) or 100, _int_arg("offset", 0, 10**9),
                                         request.args.get("q"))
        offset = _int_arg("offset", 0, 10**9) + len(found)
        return jsonify(data=found, links={"next": f"{request.base_url}?offset={offset}" if more else None})

    @app.post(tables)
    def create_table() -> tuple[Response, int]:
        body = _object_body()
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "name must be a non-empty string")
        return jsonify(data=engine.create_table(name, body.get("description"))), 201

    @app.get(tables + "/<table_id>")
    def get_table(table_id: str) -> Response:
        return jsonify(data=engine.schema(table_id).table)

    @app.delete(tables + "/<table_id>")
    def delete_table(table_id: str) -> tuple[str, int]:
        engine.delete_table(table_id)
        return "", 204

    @app.get(tables + "/<table_id>/fields")
    def list_fields(table_id: str) -> Response:
        return jsonify(data=list(engine.schema(table_id).fields.values()))

    @app.post(tables + "/<table_id>/fields")
    def create_fields(table_id: str) -> tuple[Response, int]:
        created = engine.create_fields(table_id, _list_of(_object_body(), "new_fields", MAX_FIELDS))
        return jsonify(data=[{"new": f, "old": None, "kind": "created"} for f in created],
                       meta={"did_change": bool(created)}), 201

    @app.delete(tables + "/<table_id>/fields")
    def delete_fields(table_id: str) -> tuple[str, int]:
        ids = _list_of(_object_body(), "field_ids", MAX_FIELDS)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError(400, "field_ids must be integers")
        engine.delete_fields(table_id, ids)
        return "", 204

    @app.post(records + "/query")
    def query(table_id: str) -> Response:
        body = _object_body() if request.get_data(cache=True) else {}
        found, pagination = engine.query(table_id, body, _trash())
        return jsonify(data=found, meta={"pagination": pagination})

    @app.get(records + "/<rid>")
    def get_record(table_id: str, rid: str) -> Response:
        return jsonify(data=engine.get(table_id, rid))

    @app.post(records)
    def create_records(table_id: str) -> tuple[Response, int]:
        items = _list_of(_object_body(), "new_records")
        changes = engine.create_many(table_id, [_record_data(i, f"new_records[{n}]") for n, i in enumerate(items)])
        ctx.after_change(table_id, changes)
        return jsonify(data=changes), 201

    @app.patch(records)
    def update_records(table_id: str) -> Response:
        updates = []
        for n, item in enumerate(_list_of(_object_body(), "updated_records")):
            rid = item.get("id") if isinstance(item, dict) else None
            updates.append((rid, _record_data(item, f"updated_records[{n}]")))
        changes = engine.update_many(table_id, updates)
        ctx.after_change(table_id, changes)
        return jsonify(data=changes)

    @app.delete(records)
    def delete_records(table_id: str) -> tuple[str, int]:
        rids = _list_of(_object_body(), "record_ids")
        engine.delete_many(table_id, rids)
        ctx.stats.count_writes(table_id, len(rids))
        return "", 204

    @app.get("/api/v0/sdk/zapier/api/v4/profile/")
    def profile() -> Response:
        return jsonify(id=USER_ID, public_id=str(USER_ID), email="local@example.invalid")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def anything_else(path: str) -> tuple[str, int]:
        """The SDK's telemetry and anything else Zapier would answer: quietly accepted, not acted on."""
        if path.startswith(API_PREFIX.lstrip("/") + "/") or path.startswith("_admin/"):
            raise ApiError(404, f"no such endpoint: {request.method} /{path[:80]}")
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
        status = _admin_number(body, "status", lambda v: isinstance(v, int) and (400 <= v <= 599 or v == 200))
        method = body.get("method")
        if method not in (None, "GET", "POST", "PATCH", "DELETE"):
            raise ApiError(400, "invalid 'method'")
        count = _admin_number(body, "count", lambda v: isinstance(v, int) and 0 <= v <= 1_000_000)
        retry_after = body.get("retry_after")
        if retry_after is not None:
            retry_after = _admin_number(body, "retry_after", lambda v: isinstance(v, int) and 0 <= v <= 86_400)
        for_s = body.get("for_s")
        if for_s is not None:
            for_s = _admin_number(body, "for_s", lambda v: 0 < v <= 3600)
        hang_s = _admin_number(body, "hang_s", lambda v: 0 <= v <= 600) if "hang_s" in body else 0.0
        ctx.faults.arm(status, count, retry_after, for_s=for_s, hang_s=hang_s, method=method)
        return jsonify(status=status, count=count, retry_after=retry_after, for_s=for_s, hang_s=hang_s, method=method)

    @app.delete("/_admin/faults")
    def clear_faults() -> tuple[str, int]:
        ctx.faults.clear()
        return "", 204

    @app.get("/_admin/stats")
    def stats() -> Response:
        return jsonify(ctx.stats.snapshot() | {"deliveries": ctx.dispatcher.stats(), "faults": ctx.faults.stats(),
                                               "query_rows_read": ctx.engine.rows_read})

    @app.post("/_admin/stats/reset")
    def reset_stats() -> tuple[str, int]:
        ctx.stats.reset()
        ctx.dispatcher.reset()
        ctx.engine.rows_read = 0
        return "", 204

    @app.get("/_admin/deliveries")
    def deliveries() -> Response:
        return jsonify(data=ctx.dispatcher.outcomes())

    @app.put("/_admin/tables/<table_id>/trigger")
    def set_trigger(table_id: str) -> Response:
        name = ctx.engine.table_name(table_id)
        body = _object_body()
        url = body.get("url")
        valid = url is None or (isinstance(url, str) and url.startswith(("http://", "https://")))
        if set(body) != {"url"} or not valid:
            raise ApiError(400, 'expected {"url": "http(s)://..." | null}')
        ctx.triggers[name] = url
        return jsonify(table_id=table_id, table=name, url=url)

    @app.post("/_admin/tables/<table_id>/records/<rid>/restore")
    def restore(table_id: str, rid: str) -> Response:
        change = ctx.engine.restore(table_id, rid)
        ctx.after_change(table_id, [change])
        return jsonify(data=change["new"])

    @app.post("/_admin/tables/<table_id>/trash/empty")
    def empty_trash(table_id: str) -> Response:
        return jsonify(removed=ctx.engine.empty_trash(table_id))

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
    _register_token_endpoint(app, ctx)
    _register_admin(app, ctx)
    if ctx.inboxes is not None:
        app.register_blueprint(inbox_blueprint(ctx.inboxes))
    _register_tables_api(app, ctx)  # last: it holds the catch-all route
    return app



# --- running it ----------------------------------------------------------------------------------------


SERVER_THREADS = 32  # requests served at once (a hung request, see the faults, holds one)


class _KeepAliveServer:
    """The service's HTTP server: waitress, HTTP/1.1 with keep-alive, as zapier.com answers. (Werkzeug's
    development server closes every connection, which would add a TCP handshake to each of our requests
    that the real API does not cost.) Its event loop runs in one thread; stopping closes every connection
    in that same thread."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self.server: BaseWSGIServer = create_server(
            app, host=host, port=port, threads=SERVER_THREADS, ident="zapier-tables-local",
            expose_tracebacks=False, channel_timeout=120)
        self.port: int = self.server.effective_port  # type: ignore[attr-defined]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tables-service", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sockets = self.server._map  # waitress keeps its channels in the server's socket map
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.05, map=sockets, count=1)
        # Workers first: a finishing request wakes the loop through the trigger, which must still be open.
        self.server.task_dispatcher.shutdown(timeout=2)
        for channel in list(sockets.values()):
            if channel is not self.server:
                channel.handle_close()  # an open connection, or waitress's wake-up trigger
        self.server.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


class TablesService:
    """A running service: ``url``, ``stop()``; also a context manager."""

    def __init__(self, server: _KeepAliveServer, ctx: ServiceContext, host: str) -> None:
        self._server = server
        self.ctx = ctx
        display_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{display_host}:{server.port}"
        self.port = server.port
        self._stopped = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def client_id(self) -> str:
        return self.ctx.client_id

    @property
    def client_secret(self) -> str:
        return self.ctx.client_secret

    def table_ids(self) -> dict[str, str]:
        """The live tables' ids by name."""
        return self.ctx.engine.table_ids_by_name()

    def stats(self) -> Data:
        ctx = self.ctx
        return ctx.stats.snapshot() | {"deliveries": ctx.dispatcher.stats(), "faults": ctx.faults.stats(),
                                       "query_rows_read": ctx.engine.rows_read}

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
        self._server.stop()
        self.ctx.dispatcher.stop()
        if self.ctx.inboxes is not None:
            self.ctx.inboxes.close()
        self.ctx.engine.store.close()


def start_tables_service(
    db_path: str | Path,
    tables: Sequence[TableConfig],
    token: str | None = None,
    secret_header: str = "X-Zsync-Secret",
    secret: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    autoreplay: Sequence[float] = (),
    *,
    client_id: str = "zsync-local",
    client_secret: str | None = None,
    rate_limit: int | None = RATE_LIMIT,
    rate_window_s: float = RATE_WINDOW_S,
    token_ttl_s: int = TOKEN_TTL_S,
    max_body_bytes: int = MAX_BODY_BYTES,
    delivery_timeout_s: float = 10.0,
    delivery_workers: int = 4,
    inbox_quarantine_after: int = QUARANTINE_AFTER,
) -> TablesService:
    """Start the service in background threads and return once it accepts connections.

    ``tables`` configure behaviour per table *name* (trigger URL); the tables themselves are
    created through the API (``zsync setup zapier``, :func:`infra.deploy.tables_setup.ensure_tables`).
    Callers authenticate with ``client_id``/``client_secret`` at ``/oauth/token/`` or with the static
    ``token`` (a token "made by the user"); ``rate_limit=None`` turns the per-table rate limit off;
    ``inbox_quarantine_after``: leases a trigger-inbox message may have before it is quarantined.
    """
    if host not in _LOOPBACK:
        log.warning("tables service bound to %s: its /_admin endpoints have no authentication", host)
    engine = RecordEngine(RecordStore(Path(db_path)), tables)
    dispatcher = TriggerDispatcher(secret_header, secret, autoreplay, delivery_timeout_s, delivery_workers)
    ctx = ServiceContext(
        engine,
        dispatcher,
        client_id,
        client_secret or secrets.token_urlsafe(24),
        token,
        ServiceStats([]),
        RateLimiter(rate_limit, rate_window_s),
        token_ttl_s=token_ttl_s,
        triggers={t.name: t.trigger_url for t in tables},
        inboxes=InboxService(Path(db_path).with_suffix(".inboxes.sqlite3"), engine.table_exists,
                             quarantine_after=inbox_quarantine_after),
    )
    try:
        server = _KeepAliveServer(create_app(ctx, max_body_bytes), host, port)
    except BaseException:
        dispatcher.stop()
        engine.store.close()
        raise
    return TablesService(server, ctx, host)


# --- CLI -----------------------------------------------------------------------------------------------

_CONFIG_HELP = """\
config file (JSON):
  {
    "client_id": "zsync-local",
    "client_secret": "<default: $ZSYNC_ZAPIER_CLIENT_SECRET>",
    "token": "<optional static token; default: $ZSYNC_TABLES_TOKEN>",
    "rate_limit": 100, "rate_window_s": 5,
    "secret_header": "X-Zsync-Secret",
    "secret": "<sent with each trigger delivery; default: $ZSYNC_WEBHOOK_SECRET>",
    "autoreplay": [300, 1800, 3600, 10800, 21600],
    "tables": [
      {"name": "agent_jobs",
       "trigger_url": "http://127.0.0.1:9000/agent_jobs_to_supabase"}
    ]
  }
"""


@dataclass(frozen=True)
class CliConfig:
    token: str | None
    client_id: str
    client_secret: str
    rate_limit: int | None
    rate_window_s: float
    secret_header: str
    secret: str | None
    autoreplay: tuple[float, ...]
    tables: tuple[TableConfig, ...]


def load_config(path: Path) -> CliConfig:
    from shared.platform.settings import DEFAULT_SECRET_HEADER

    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), list):
        raise ValueError('config must be a JSON object with a "tables" list')
    known = {"name", "trigger_url"}
    for n, t in enumerate(raw["tables"]):
        if not isinstance(t, dict) or "name" not in t or set(t) - known:
            extra = sorted(set(t) - known) if isinstance(t, dict) else []
            raise ValueError(f"tables[{n}]: expected {{\"name\", \"trigger_url\"?}}"
                             + (f"; unknown key(s) {extra} (Zapier fills in no field: stamp_updated_at is gone)"
                                if extra else ""))
    tables = tuple(TableConfig(**t) for t in raw["tables"])
    client_secret = raw.get("client_secret") or os.environ.get("ZSYNC_ZAPIER_CLIENT_SECRET")
    if not client_secret:
        raise ValueError('no client secret: set "client_secret" in the config or ZSYNC_ZAPIER_CLIENT_SECRET')
    return CliConfig(
        token=raw.get("token") or os.environ.get("ZSYNC_TABLES_TOKEN"),
        client_id=raw.get("client_id") or "zsync-local",
        client_secret=client_secret,
        rate_limit=raw.get("rate_limit", RATE_LIMIT),
        rate_window_s=float(raw.get("rate_window_s", RATE_WINDOW_S)),
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
        client_id=config.client_id,
        client_secret=config.client_secret,
        rate_limit=config.rate_limit,
        rate_window_s=config.rate_window_s,
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

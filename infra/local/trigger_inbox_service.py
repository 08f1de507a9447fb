"""Local stand-in for Zapier's trigger inboxes, mounted on the local Zapier Tables service.

Implements ``/api/v0/sdk/trigger-inbox/api/v1/inboxes`` (and the same at the public API's prefixes,
:data:`PUBLIC_INBOX_PATHS`) as ``@zapier/zapier-sdk`` calls it (both
generations: ``PUT`` ensure with ``name`` (0.67.0) and ``POST`` create with ``key``; list filters by
``key`` or ``name``), the two app-metadata endpoints used to discover the Tables trigger's action key,
and the delivery side: :meth:`InboxService.publish` (called by the Tables service after each create or
changing update) puts one message in each active inbox subscribed to that table and POSTs a wake-up to
the inbox's ``notification_url`` from a background thread: the documented body ``{"inbox_id",
"received_message_count", "redelivery": false}``, no credentials, no data (wake-ups to one inbox that
wait to be sent are coalesced; the count adds up). Under fault injection they can be dropped
(``POST /_admin/inbox/faults {"drop_notifications": n}``).

Storage: SQLite (WAL, one connection, one lock), so inboxes and unacked messages survive a restart.
Leases keep the documented bounds (``/work/shared/reference/zapier-public-api.md`` 2.8-2.10), and answer
anything else 400: ``lease_limit`` an integer 1-100 (default 10), ``lease_seconds`` an integer 1-3600
(default 300); ack/release take ``lease_id`` and optionally 1-100 ``message_ids``. An unacked message comes
back when its lease expires, with ``lease_count`` + 1 and ``possible_duplicate_data``; a release still
counts as a lease; ack/release of a lease with nothing left to settle (expired, already settled, or
unknown) answers 400 ``lease_expired``. A message leased ``quarantine_after`` times (Zapier publishes no
number; default :data:`QUARANTINE_AFTER`, or ``/_admin/inbox/faults {"quarantine_after": n}``) is quarantined:
it stays in the list of messages, never leased again. Leases hand out the oldest first (``newest_first``: the
other way; Zapier documents no order).
Authentication is the host app's: every ``/api/`` request passes the Tables service's gate.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from flask import Blueprint, Response, jsonify, request

from infra.local.sqlite_store import SqliteStore

log = logging.getLogger(__name__)

INBOX_PATH = "/api/v0/sdk/trigger-inbox/api/v1/inboxes"
# The public API's two documented prefixes (zapier-public-api.md 2.0): served too, over the same inboxes.
PUBLIC_INBOX_PATHS = ("/trigger-inbox/api/v1/inboxes", "/trigger-inbox/v1/inboxes")
META_PATH = "/api/v0/sdk/zapier/api/v4"
TABLES_VERSION = "TableCLIAPI@1.0.0"
# The Tables app's triggers, described as zapier.com lists them (zapier-public-api.md section 3); their
# keys are not published: these are the stand-in's. DELETES_TRIGGER also delivers deletes (payload below).
DELETES_TRIGGER = "new_updated_or_deleted_record"
TABLES_ACTIONS = [
    {"key": "new_record", "name": "New Record", "type": "read",
     "description": "Triggers when a new record is added to a table."},
    {"key": "updated_record", "name": "Updated Record", "type": "read",
     "description": "Triggers when a record is updated on a table."},
    {"key": "new_or_updated_record", "name": "New or Updated Record", "type": "read",
     "description": "Triggers when a record is added or updated on a table."},
    {"key": DELETES_TRIGGER, "name": "New, Updated or Deleted Record", "type": "read",
     "description": "Triggers when a record is added, updated, or deleted in a table."},
    {"key": "create_record", "name": "Create Record", "type": "write", "description": "Creates a record."},
]
DEFAULT_LEASE_S = 300
MAX_LEASE_S = 3600
DEFAULT_LEASE_LIMIT = 10
MAX_LEASE_LIMIT = 100
MAX_SETTLE_IDS = 100
# Leases a message may have before it is quarantined. Zapier does not publish its number: the lowest that
# still lets shared.services.inbox_consumer dead-letter a poison message itself (on its 6th lease, lease_count > 5).
QUARANTINE_AFTER = 6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inboxes (
    id TEXT PRIMARY KEY, key TEXT UNIQUE, status TEXT NOT NULL, paused_reason TEXT,
    notification_url TEXT, subscription TEXT NOT NULL, table_id TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inbox_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, inbox_id TEXT NOT NULL,
    created_at TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'available',
    lease_id TEXT, leased_until REAL, lease_count INTEGER NOT NULL DEFAULT 0, error_message TEXT);
CREATE INDEX IF NOT EXISTS inbox_messages_inbox ON inbox_messages (inbox_id, seq);
"""


class InboxApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _problem(status: int, detail: str, code: str = "invalid") -> InboxApiError:
    return InboxApiError(status, {"errors": [{"code": code, "detail": detail}]})


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Notifier:
    """POSTs wake-ups ``{"inbox_id", "received_message_count", "redelivery"}`` from one thread; wake-ups to
    one (URL, inbox) waiting to be sent are coalesced (their counts add up); drops on fault."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued: dict[tuple[str, str], tuple[int, bool]] = {}  # (url, inbox) -> (received, redelivery?)
        self._drop = 0
        self.drop_share = 0.0  # chaos (bench/soak.py): lose this share of the wake-ups at random
        self._drop_rng = random.Random()
        self.counts = {"sent": 0, "failed": 0, "dropped": 0}
        self._timeout_s = timeout_s
        self._busy = 0
        self._thread = threading.Thread(target=self._work, name="inbox-notifier", daemon=True)
        self._thread.start()

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._drop = n

    def notify(self, url: str, inbox_id: str, received: int = 1, redelivery: bool = False) -> None:
        """Queue a wake-up. ``redelivery``: Zapier's manual re-send after a delivery outage (its count is a
        placeholder: the caller passes 1)."""
        key = (url, inbox_id)
        with self._lock:
            if self._drop > 0 or (self.drop_share and self._drop_rng.random() < self.drop_share):
                self._drop = max(0, self._drop - 1)
                self.counts["dropped"] += 1
                return
            if key in self._queued:
                count, again = self._queued[key]
                self._queued[key] = (count + received, again or redelivery)
                return
            self._queued[key] = (received, redelivery)
            self._busy += 1
        self._queue.put(key)

    def pending(self) -> int:
        with self._lock:
            return self._busy

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=self._timeout_s + 2)

    def _work(self) -> None:
        while (key := self._queue.get()) is not None:
            url, inbox_id = key
            with self._lock:
                count, redelivery = self._queued.pop(key, (1, False))
            ok = False
            body = {"inbox_id": inbox_id, "received_message_count": count, "redelivery": redelivery}
            try:  # no header of ours, no data: a wake-up
                response = requests.post(url, json=body, timeout=self._timeout_s, allow_redirects=False)
                ok = response.status_code < 300
                response.close()
            except requests.RequestException:
                pass
            with self._lock:
                self.counts["sent" if ok else "failed"] += 1
                self._busy -= 1


class InboxService:
    """Inboxes and their messages, durable in SQLite."""

    def __init__(self, path: Path, table_exists: Callable[[str], bool], notifier_timeout_s: float = 10.0,
                 quarantine_after: int = QUARANTINE_AFTER) -> None:
        self.table_exists = table_exists  # the Tables service's tables (made through its API, so looked up live)
        self.quarantine_after = quarantine_after
        self.drop_delete_events = False  # fault: delete events are lost (the trash check is the safety net)
        self.newest_first = False  # fault: leases hand out the newest messages first (Zapier documents no order)
        self._store = SqliteStore(path, _SCHEMA)
        self._lock = self._store._lock
        self._conn = self._store._conn
        self._tx = self._store.transaction
        self.notifier = Notifier(notifier_timeout_s)

    def close(self) -> None:
        self.notifier.stop()
        self._store.close()

    # --- inboxes ----------------------------------------------------------------------------------------
    @staticmethod
    def _inbox_json(row: sqlite3.Row) -> dict[str, Any]:
        return {"id": row["id"], "key": row["key"], "name": row["key"], "created_at": row["created_at"],
                "status": row["status"], "paused_reason": row["paused_reason"],
                "notification_url": row["notification_url"], "subscription": json.loads(row["subscription"])}

    def _subscription(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        sub = body.get("subscription")
        if not isinstance(sub, dict):
            raise _problem(400, "subscription: expected an object")
        app_key, action = sub.get("app_key"), sub.get("action_key")
        if not isinstance(app_key, str) or not app_key.startswith("TableCLIAPI@"):
            raise _problem(400, f"subscription.app_key: unknown app {app_key!r}")
        if action not in {a["key"] for a in TABLES_ACTIONS if a["type"] == "read"}:
            raise _problem(400, f"subscription.action_key: {action!r} is not a trigger of {app_key}")
        inputs = sub.get("inputs") or {}
        table_id = inputs.get("table_id") if isinstance(inputs, dict) else None
        if not isinstance(table_id, str) or not self.table_exists(table_id):
            raise _problem(400, f"subscription.inputs.table_id: unknown table {table_id!r}")
        clean = {"app_key": app_key, "action_key": action, "inputs": dict(inputs),
                 "connection_id": sub.get("connection_id")}
        return clean, table_id

    @staticmethod
    def _url(body: dict[str, Any]) -> str | None:
        url = body.get("notification_url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise _problem(400, "notification_url: expected an http(s) URL or null")
        return url

    def ensure(self, body: dict[str, Any], *, update_url: bool) -> tuple[dict[str, Any], int]:
        """Create, or return the inbox with this key/name (409 if its subscription differs)."""
        key = body.get("key", body.get("name"))
        if not isinstance(key, str) or not key or len(key) > 200:
            raise _problem(400, "key: expected a non-empty name")
        sub, table_id = self._subscription(body)
        url = self._url(body)
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM inboxes WHERE key = ?", (key,)).fetchone()
            if row is not None:
                if json.loads(row["subscription"]) != sub:
                    raise _problem(409, f'An inbox named "{key}" already exists with a different subscription.',
                                   "conflict")
                if update_url and "notification_url" in body and row["notification_url"] != url:
                    conn.execute("UPDATE inboxes SET notification_url = ? WHERE id = ?", (url, row["id"]))
                    row = conn.execute("SELECT * FROM inboxes WHERE id = ?", (row["id"],)).fetchone()
                return self._inbox_json(row), 200
            inbox_id = str(uuid.uuid4())
            conn.execute("INSERT INTO inboxes (id, key, status, notification_url, subscription, table_id, created_at)"
                         " VALUES (?, ?, 'active', ?, ?, ?, ?)",
                         (inbox_id, key, url, json.dumps(sub), table_id, _now_iso()))
            row = conn.execute("SELECT * FROM inboxes WHERE id = ?", (inbox_id,)).fetchone()
            return self._inbox_json(row), 201

    def list(self, key: str | None, status: str | None, limit: int, offset: int) -> dict[str, Any]:
        sql, args = "SELECT * FROM inboxes WHERE 1=1", []
        if key is not None:
            sql, args = sql + " AND key = ?", [*args, key]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        with self._tx() as conn:
            rows = conn.execute(sql + " ORDER BY created_at, id", args).fetchall()
        page = rows[offset:offset + limit]
        more = offset + limit < len(rows)
        return {"count": len(rows), "next": str(offset + limit) if more else None,
                "previous": str(max(offset - limit, 0)) if offset else None,
                "results": [self._inbox_json(r) for r in page]}

    def _row(self, conn: sqlite3.Connection, inbox_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM inboxes WHERE id = ?", (inbox_id,)).fetchone()
        if row is None:
            raise _problem(404, f"no inbox {inbox_id}", "not_found")
        return row

    def get(self, inbox_id: str) -> dict[str, Any]:
        with self._tx() as conn:
            return self._inbox_json(self._row(conn, inbox_id))

    def update(self, inbox_id: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self._url(body)
        with self._tx() as conn:
            self._row(conn, inbox_id)
            if "notification_url" in body:
                conn.execute("UPDATE inboxes SET notification_url = ? WHERE id = ?", (url, inbox_id))
            return self._inbox_json(self._row(conn, inbox_id))

    def delete(self, inbox_id: str) -> dict[str, Any]:
        with self._tx() as conn:
            inbox = self._inbox_json(self._row(conn, inbox_id))
            conn.execute("DELETE FROM inbox_messages WHERE inbox_id = ?", (inbox_id,))
            conn.execute("DELETE FROM inboxes WHERE id = ?", (inbox_id,))
        return inbox | {"status": "deleting"}

    def set_status(self, inbox_id: str, status: str, reason: str | None) -> dict[str, Any]:
        with self._tx() as conn:
            self._row(conn, inbox_id)
            conn.execute("UPDATE inboxes SET status = ?, paused_reason = ? WHERE id = ?", (status, reason, inbox_id))
            return self._inbox_json(self._row(conn, inbox_id))

    # --- messages ---------------------------------------------------------------------------------------
    @staticmethod
    def _message_json(row: sqlite3.Row, payload: bool = False) -> dict[str, Any]:
        out = {"id": row["id"], "created_at": row["created_at"], "status": row["status"],
               "message_attributes": {"lease_count": row["lease_count"], "error_message": row["error_message"],
                                      "possible_duplicate_data": row["lease_count"] > 1}}
        if payload:
            out["payload"] = json.loads(row["payload"])
        return out

    def _expire(self, conn: sqlite3.Connection, inbox_id: str) -> None:
        conn.execute("UPDATE inbox_messages SET status = 'available', lease_id = NULL, leased_until = NULL "
                     "WHERE inbox_id = ? AND status = 'leased' AND leased_until < ?", (inbox_id, time.time()))

    def end_leases(self, inbox_id: str) -> None:  # tests: every lease of the inbox runs out now
        with self._tx() as conn:
            self._row(conn, inbox_id)
            conn.execute("UPDATE inbox_messages SET leased_until = 0 WHERE inbox_id = ? AND leased_until", (inbox_id,))
            self._expire(conn, inbox_id)

    def messages(self, inbox_id: str, limit: int) -> dict[str, Any]:
        with self._tx() as conn:
            self._row(conn, inbox_id)
            self._expire(conn, inbox_id)
            rows = conn.execute("SELECT * FROM inbox_messages WHERE inbox_id = ? ORDER BY seq LIMIT ?",
                                (inbox_id, limit)).fetchall()
        return {"next": None, "previous": None, "results": [self._message_json(r) for r in rows]}

    def lease(self, inbox_id: str, limit: int, seconds: int) -> dict[str, Any]:
        with self._tx() as conn:
            inbox = self._row(conn, inbox_id)
            self._expire(conn, inbox_id)
            rows = conn.execute("SELECT * FROM inbox_messages WHERE inbox_id = ? AND status = 'available' ORDER BY "
                                f"seq {'DESC' if self.newest_first else ''} LIMIT ?", (inbox_id, limit)).fetchall()
            attrs = {"status": inbox["status"], "paused_reason": inbox["paused_reason"]}
            if not rows and inbox["status"] == "paused":
                raise InboxApiError(409, {"detail": "Inbox is paused and fully drained", "inbox_attributes": attrs})
            if not rows:
                return {"lease_id": None, "leased_until": None, "results": [], "inbox_attributes": attrs}
            lease_id = str(uuid.uuid4())
            until = time.time() + seconds
            leased = []
            for row in rows:
                count = row["lease_count"] + 1
                if count > self.quarantine_after:
                    conn.execute("UPDATE inbox_messages SET status = 'quarantined', error_message = ? WHERE seq = ?",
                                 (f"leased {row['lease_count']} times without an ack", row["seq"]))
                    continue
                conn.execute("UPDATE inbox_messages SET status = 'leased', lease_id = ?, leased_until = ?, "
                             "lease_count = ? WHERE seq = ?", (lease_id, until, count, row["seq"]))
                leased.append(conn.execute("SELECT * FROM inbox_messages WHERE seq = ?", (row["seq"],)).fetchone())
        if not leased:  # every message found was quarantined: nothing is leased
            return {"lease_id": None, "leased_until": None, "results": [], "inbox_attributes": attrs}
        return {"lease_id": lease_id,
                "leased_until": datetime.fromtimestamp(until, UTC).isoformat().replace("+00:00", "Z"),
                "results": [self._message_json(r, payload=True) for r in leased], "inbox_attributes": attrs}

    def settle(self, inbox_id: str, body: dict[str, Any], op: str) -> dict[str, Any]:
        lease_id = body.get("lease_id")
        ids = body.get("message_ids")
        if not _is_uuid(lease_id):
            raise _problem(400, f"lease_id: required, a UUID (got {str(lease_id)[:60]!r})")
        if ids is not None and (not isinstance(ids, list) or not 1 <= len(ids) <= MAX_SETTLE_IDS
                                or not all(_is_uuid(i) for i in ids)):
            raise _problem(400, f"message_ids: expected a list of 1 to {MAX_SETTLE_IDS} message ids (UUIDs)")
        with self._tx() as conn:
            self._row(conn, inbox_id)
            rows = conn.execute("SELECT * FROM inbox_messages WHERE inbox_id = ? AND lease_id = ? "
                                "AND status = 'leased'",
                                (inbox_id, lease_id)).fetchall()
            if ids is not None:
                rows = [r for r in rows if r["id"] in set(ids)]
            if not rows or any(r["leased_until"] < time.time() for r in rows):  # expired, settled or unknown
                raise _problem(400, f"lease {lease_id} has expired", "lease_expired")
            out = []
            for row in rows:
                if op == "ack":
                    conn.execute("DELETE FROM inbox_messages WHERE seq = ?", (row["seq"],))
                    out.append(self._message_json(row) | {"status": "acked"})
                else:
                    conn.execute("UPDATE inbox_messages SET status = 'available', lease_id = NULL, leased_until = NULL"
                                 " WHERE seq = ?", (row["seq"],))
                    out.append(self._message_json(row) | {"status": "available"})
        return {f"{op}ed_id" if op == "ack" else "released_id": lease_id, "results": out}

    # --- delivery ---------------------------------------------------------------------------------------
    def put(self, inbox_id: str, payload: dict[str, Any]) -> str:
        """Add one message (publish, and the admin endpoint tests use for poison/duplicate messages)."""
        message_id = str(uuid.uuid4())
        with self._tx() as conn:
            inbox = self._row(conn, inbox_id)
            conn.execute("INSERT INTO inbox_messages (id, inbox_id, created_at, payload) VALUES (?, ?, ?, ?)",
                         (message_id, inbox_id, _now_iso(), json.dumps(payload)))
        if inbox["notification_url"]:
            self.notifier.notify(inbox["notification_url"], inbox_id)
        return message_id

    def _subscribed(self, table_id: str) -> list[tuple[str, str]]:
        """(inbox id, trigger key) of the active inboxes subscribed to ``table_id``."""
        with self._tx() as conn:
            rows = conn.execute("SELECT id, subscription FROM inboxes WHERE table_id = ? AND status = 'active'",
                                (table_id,)).fetchall()
        return [(r["id"], json.loads(r["subscription"]).get("action_key")) for r in rows]

    def publish(self, table_id: str, record: dict[str, Any]) -> None:
        """A record was created or changed: one message in each active inbox subscribed to its table. The
        deletes-capable trigger's payload also carries ``"event": "added"|"updated"`` and ``deleted_at``."""
        payload = {"id": record["id"], "data": record["data"], "created_at": record.get("created_at"),
                   "edited_at": record.get("edited_at", record.get("updated_at"))}
        event = "added" if record.get("created_at") == payload["edited_at"] else "updated"
        for inbox_id, action in self._subscribed(table_id):
            self.put(inbox_id, payload | ({"event": event, "deleted_at": None} if action == DELETES_TRIGGER else {}))

    def publish_delete(self, table_id: str, record: dict[str, Any]) -> None:
        """A record went to the trash: one message in each active inbox of the deletes-capable trigger. Its
        payload (Zapier's is not published; the stand-in's choice, docs/local-stand-ins.md): the record as it
        was, ``deleted_at`` set, ``"event": "deleted"``."""
        payload = {"id": record["id"], "data": record["data"], "created_at": record.get("created_at"),
                   "edited_at": record.get("edited_at"), "deleted_at": record.get("deleted_at"), "event": "deleted"}
        if self.drop_delete_events:
            return
        for inbox_id, action in self._subscribed(table_id):
            if action == DELETES_TRIGGER:
                self.put(inbox_id, payload)

    def stats(self) -> dict[str, Any]:
        with self._tx() as conn:
            rows = conn.execute("SELECT status, count(*) AS n FROM inbox_messages GROUP BY status").fetchall()
        by_status = {r["status"]: r["n"] for r in rows}
        return {"messages": by_status, "waiting": by_status.get("available", 0) + by_status.get("leased", 0),
                "notifications": dict(self.notifier.counts, pending=self.notifier.pending())}


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _problem(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _problem(400, "expected a JSON object")
    return body


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _int_arg(value: Any, name: str, low: int, high: int, default: int) -> int:
    """A query-string integer (text of digits), ``default`` when absent."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise _problem(400, f"{name}: expected an integer from {low} to {high}, got {str(value)[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise _problem(400, f"{name}: expected an integer from {low} to {high}, got {number}")
    return number


def _body_int(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    """A JSON body's integer member: a JSON integer within the bounds (no text, no boolean, no float),
    ``default`` when the member is absent."""
    if name not in body:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _problem(400, f"{name}: expected an integer from {low} to {high}, got {json.dumps(value)[:40]}")
    return value


def inbox_blueprint(service: InboxService, public_paths: tuple[str, ...] = PUBLIC_INBOX_PATHS) -> Blueprint:
    """The inbox API (at :data:`INBOX_PATH`, the SDK's, and at each of ``public_paths``: one handler, one
    store, the same bounds), the app-metadata endpoints and the ``/_admin/inbox`` endpoints (no auth of its
    own: register it on the Tables service app, whose gate authenticates every inbox request)."""
    bp = Blueprint("trigger_inbox", __name__)

    def route(method: str, suffix: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(view: Callable[..., Any]) -> Callable[..., Any]:
            for prefix in (INBOX_PATH, *public_paths):
                bp.add_url_rule(prefix + suffix, view_func=view, methods=[method])
            return view
        return register

    @bp.errorhandler(InboxApiError)
    def _error(exc: InboxApiError) -> tuple[Response, int]:
        return jsonify(exc.body), exc.status

    @bp.get(META_PATH + "/implementations-meta/lookup/")
    def lookup() -> Response:
        return jsonify(next=None, previous=None, results=[
            {"id": TABLES_VERSION, "slug": "zapier_tables", "name": "Zapier Tables",
             "current_implementation_id": TABLES_VERSION}])

    @bp.get(META_PATH + "/implementations/")
    def implementations() -> Response:
        selected = request.args.get("selected_apis", "")
        if selected.split("@")[0] != "TableCLIAPI":
            return jsonify(results=[])
        return jsonify(results=[{"selected_api": TABLES_VERSION,
                                 "actions": [a | {"selected_api": TABLES_VERSION} for a in TABLES_ACTIONS]}])

    @route("GET")
    def list_inboxes() -> Response:
        key = request.args.get("key", request.args.get("name"))
        limit = _int_arg(request.args.get("limit"), "limit", 1, 1000, 100)
        offset = _int_arg(request.args.get("offset"), "offset", 0, 10**9, 0)
        return jsonify(service.list(key, request.args.get("status"), limit, offset))

    @route("POST")
    def create_inbox() -> tuple[Response, int]:
        inbox, status = service.ensure(_body(), update_url=False)
        return jsonify(inbox), status

    @route("PUT")
    def ensure_inbox() -> tuple[Response, int]:
        inbox, status = service.ensure(_body(), update_url=True)
        return jsonify(inbox), status

    @route("GET", "/<inbox_id>")
    def get_inbox(inbox_id: str) -> Response:
        return jsonify(service.get(inbox_id))

    @route("PATCH", "/<inbox_id>")
    def update_inbox(inbox_id: str) -> Response:
        return jsonify(service.update(inbox_id, _body()))

    @route("DELETE", "/<inbox_id>")
    def delete_inbox(inbox_id: str) -> Response:
        return jsonify(service.delete(inbox_id))

    @route("POST", "/<inbox_id>/pause")
    def pause(inbox_id: str) -> Response:
        return jsonify(service.set_status(inbox_id, "paused", "user"))

    @route("POST", "/<inbox_id>/resume")
    def resume(inbox_id: str) -> Response:
        return jsonify(service.set_status(inbox_id, "active", None))

    @route("GET", "/<inbox_id>/messages")
    def list_messages(inbox_id: str) -> Response:
        return jsonify(service.messages(inbox_id, _int_arg(request.args.get("limit"), "limit", 1, 1000, 100)))

    @route("POST", "/<inbox_id>/messages/lease")
    def lease(inbox_id: str) -> Response:
        body = _body()
        limit = _body_int(body, "lease_limit", 1, MAX_LEASE_LIMIT, DEFAULT_LEASE_LIMIT)
        seconds = _body_int(body, "lease_seconds", 1, MAX_LEASE_S, DEFAULT_LEASE_S)
        return jsonify(service.lease(inbox_id, limit, seconds))

    @route("POST", "/<inbox_id>/messages/ack")
    def ack(inbox_id: str) -> Response:
        return jsonify(service.settle(inbox_id, _body(), "ack"))

    @route("POST", "/<inbox_id>/messages/release")
    def release(inbox_id: str) -> Response:
        return jsonify(service.settle(inbox_id, _body(), "release"))

    # --- admin (tests): fault injection, injected messages, paused reasons, stats -----------------
    @bp.post("/_admin/inbox/faults")
    def faults() -> Response:
        """``drop_notifications`` (n), ``quarantine_after`` (n), ``drop_delete_events``, ``newest_first`` (bool)."""
        body, out = _body(), {}
        for flag in ("drop_delete_events", "newest_first"):
            if flag in body:
                if not isinstance(body[flag], bool):
                    raise _problem(400, f"{flag}: expected true or false")
                setattr(service, flag, body[flag])
                out[flag] = body[flag]
        if "drop_notifications" in body or not {"quarantine_after", "drop_delete_events", "newest_first"} & set(body):
            out["drop_notifications"] = _body_int(body, "drop_notifications", 0, 10**6, 0)
            service.notifier.drop_next(out["drop_notifications"])
        if "quarantine_after" in body:
            service.quarantine_after = _body_int(body, "quarantine_after", 1, 10**6, QUARANTINE_AFTER)
            out["quarantine_after"] = service.quarantine_after
        return jsonify(out)

    @bp.post("/_admin/inboxes/<inbox_id>/messages")
    def inject(inbox_id: str) -> Response:
        body = _body()
        if not isinstance(body.get("payload"), dict):
            raise _problem(400, 'expected {"payload": {...}}')
        return jsonify(id=service.put(inbox_id, body["payload"]))

    @bp.post("/_admin/inboxes/<inbox_id>/pause")
    def admin_pause(inbox_id: str) -> Response:
        return jsonify(service.set_status(inbox_id, "paused", str(_body().get("reason", "unknown"))))

    @bp.post("/_admin/inboxes/<inbox_id>/redeliver")
    def redeliver(inbox_id: str) -> Response:
        """Zapier's re-send of a wake-up after an outage: ``redelivery: true``, count 1 (a placeholder)."""
        inbox = service.get(inbox_id)
        if not inbox["notification_url"]:
            raise _problem(400, "the inbox has no notification_url")
        service.notifier.notify(inbox["notification_url"], inbox_id, 1, redelivery=True)
        return jsonify(inbox_id=inbox_id, redelivery=True)

    @bp.post("/_admin/inboxes/<inbox_id>/end_leases")  # time passes: every lease of the inbox runs out now
    def end_leases(inbox_id: str) -> Response:
        return jsonify(inbox_id=inbox_id, ended=service.end_leases(inbox_id) is None)

    @bp.get("/_admin/inbox/stats")
    def stats() -> Response:
        return jsonify(service.stats())

    return bp

"""Tables, fields and records, durable: :class:`RecordStore` (the SQLite file, via
:class:`infra.local.sqlite_store.SqliteStore`) and :class:`RecordEngine`, the Tables API's behaviour over
it: tables and typed fields with schema revisions, records created/updated/deleted as changesets, the
trash (restore, empty), and queries (filters, orders, cursor paging; ``exact``/``in`` through an index of
field values)."""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.local.sqlite_store import SqliteStore
from infra.local.tables_service.errors import ApiError, RefusedRequest
from infra.local.tables_service.values import (
    FIELD_TYPES,
    OPERATORS,
    Data,
    Rec,
    check_value,
    decode_cursor,
    encode_cursor,
    index_text,
    is_empty_cell,
    matches,
    new_ulid,
    sort_key,
    utc_now_iso,
)

PAGE_DEFAULT = 100
PAGE_MAX = 1000
_ULID_RE = re.compile(r"^[0-9A-Z]{26}$")
_FIELD_KEY_RE = re.compile(r"^f(\d{1,9})$")
ACCOUNT_ID = 1
USER_ID = 1

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

    def __init__(self, store: RecordStore) -> None:
        self.store = store
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
                matches(op, json.loads(r["data"]).get(f"f{fid}"), v) for fid, op, v in filters))
            if orders:
                rows = list(matching)
                for fid, direction in reversed(orders):
                    rows.sort(key=lambda r, k=f"f{fid}": sort_key(json.loads(r["data"]).get(k)),
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


def _without_empty(data: Data) -> Data:
    return {k: v for k, v in data.items() if not is_empty_cell(v)}

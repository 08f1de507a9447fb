"""A Zapier Tables trigger event's payload, read (its shape is not published: read tolerantly).

:func:`read_payload` reads an added or updated record (a record ``{"id", "data"}``, optionally under
``"record"``, or the fields flat; fields by name or by field id ``f<n>``); :func:`read_delete` recognises a
delete event of the deletes-capable trigger ("Triggers when a record is added, updated, or deleted in a
table."). Zapier's record id is given back in its ULID form (a UUID-form id, as the public API publishes
ids, is converted here: zsync keeps ULIDs, :mod:`shared.adapters.zapier_ids`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.adapters.zapier_ids import to_ulid

_FIELD_ID = re.compile(r"^f(\d+)$")


class UnreadablePayload(ValueError):
    """A message payload that is not a Tables record we can read; ``problems`` name what and where."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


@dataclass(frozen=True)
class TriggerRecord:
    record_id: str | None
    edited_at: str | None
    fields: dict[str, Any]  # by field name

    def as_delivery(self) -> dict[str, Any]:
        """What a Zap would POST: the record's fields flat, ``id`` = record id when it has none (no ``id``
        field, or an empty cell), and ``edited_at`` (Zapier's time of the change: the sync measures lag from
        it and versions a record without ``updated_at`` at it)."""
        out = dict(self.fields)
        if self.record_id is not None and out.get("id") in (None, ""):
            out["id"] = self.record_id
        if self.edited_at is not None:
            out["edited_at"] = self.edited_at
        return out


_META = frozenset({"id", "record_id", "data", "fields", "created_at", "edited_at", "updated_at",
                   "schema_revision_id", "errors", "deleted_at", "table_id"})


def read_payload(payload: Mapping[str, Any], field_names: Mapping[str, str] | None = None) -> TriggerRecord:
    """Read a Tables trigger event's payload (shape not documented): a record ``{"id", "data": {...}}``
    (optionally under ``"record"``), or the fields flat. Fields by name, or by field id ``f<n>`` mapped
    through ``field_names`` (``{"f3": "status"}`` or ``{"3": "status"}``)."""
    if not isinstance(payload, Mapping):
        raise UnreadablePayload([{"field": "payload", "problem": "not a JSON object"}])
    body: Mapping[str, Any] = payload
    if isinstance(payload.get("record"), Mapping):
        body = payload["record"]
    data = body.get("data", body.get("fields"))
    flat = data is None
    if flat:
        data = {k: v for k, v in body.items() if k not in _META or k == "id"}
    if not isinstance(data, Mapping):
        problem = f"expected an object, got {type(data).__name__}"
        raise UnreadablePayload([{"field": "payload.data", "problem": problem}])
    fields: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for key, value in data.items():
        match = _FIELD_ID.match(str(key))
        if match:
            names = field_names or {}
            name = names.get(key) or names.get(match.group(1))
            if name is None:
                problems.append({"field": f"payload.data.{key}",
                                 "problem": "field id not in the table's fields (unknown field)"})
                continue
            fields[name] = value
        else:
            fields[str(key)] = value
    if problems:
        raise UnreadablePayload(problems)
    # A record-shaped payload's "id" is Zapier's record id; in a flat payload "id" is a field (ours).
    rid = body.get("record_id") if flat else body.get("id")
    record_id = to_ulid(rid) if isinstance(rid, str) and rid else None
    edited = body.get("edited_at", body.get("updated_at"))
    if not fields:
        problem = "no record fields found (expected data or flat fields)"
        raise UnreadablePayload([{"field": "payload", "problem": problem}])
    return TriggerRecord(record_id=record_id, edited_at=edited if isinstance(edited, str) else None, fields=fields)


# --- delete events ---------------------------------------------------------------------------------------

_EVENT_KEYS = ("event", "event_type", "type", "action", "operation", "change_type")


@dataclass(frozen=True)
class TriggerDelete:
    """A record deleted in Tables, as the deletes-capable trigger delivered it."""

    record_id: str | None  # Zapier's record id (ULID form)
    fields: dict[str, Any]  # the record's fields by name, as it was (may be empty)
    deleted_at: str | None  # Zapier's time of the delete (or of the event, when it carries none)


def _record_shaped(payload: Mapping[str, Any]) -> Mapping[str, Any] | None:
    body = payload.get("record") if isinstance(payload.get("record"), Mapping) else payload
    return body if isinstance(body.get("data", body.get("fields")), Mapping) else None


def is_delete_event(payload: Any) -> bool:
    """A delete: the record carries a non-empty ``deleted_at``, or a record-shaped event names a delete in an
    event-type member (``event``, ``event_type``, ``type``, ...; in a flat payload those are fields)."""
    if not isinstance(payload, Mapping):
        return False
    body = _record_shaped(payload)
    for where in (payload, body or {}):
        if where.get("deleted_at") not in (None, ""):
            return True
    if body is None:
        return False
    return any(isinstance(where.get(k), str) and "delet" in where[k].lower()
               for where in (payload, body) for k in _EVENT_KEYS)


def read_delete(payload: Any, field_names: Mapping[str, str] | None = None) -> TriggerDelete | None:
    """The delete ``payload`` announces, or None when it is not a delete event. Raises
    :class:`UnreadablePayload` for a delete that names no record."""
    if not is_delete_event(payload):
        return None
    body = _record_shaped(payload) or payload
    try:
        record = read_payload(payload, field_names)
        fields, record_id, edited = record.fields, record.record_id, record.edited_at
    except UnreadablePayload as exc:
        if any("field id" in p["problem"] for p in exc.problems):
            raise
        rid = body.get("id", body.get("record_id"))
        fields, record_id, edited = {}, to_ulid(rid) if isinstance(rid, str) and rid else None, None
    if record_id is None and fields.get("id") in (None, ""):
        raise UnreadablePayload([{"field": "payload.id", "problem": "a delete event that names no record"}])
    deleted = next((w.get("deleted_at") for w in (body, payload) if isinstance(w.get("deleted_at"), str)), None)
    return TriggerDelete(record_id, fields, deleted or edited)

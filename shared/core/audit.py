"""Audit entries the sync writes to Supabase's ``audit_log`` (append-only).

Entries have stable ids derived from what they record, so a redelivered or replayed event never adds a
second entry. They are written in the same transaction as the change they describe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from shared.core.mapping import row_to_json
from shared.core.outcome import Outcome
from shared.core.spec import Direction, FunctionSpec

ACTOR_TYPE = "zapier_sync"
SKIPPED_ACTION = "sync_skipped_stale_data"
FAILED_ACTION = "sync_failed"
SYNC_DIRECTION = {Direction.TO_SUPABASE: "tables_to_supabase", Direction.TO_TABLES: "supabase_to_tables"}


def _stable_id(*parts: str) -> str:
    return "zsync-" + hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:40]


ORIGINS = ("live", "replay", "reconcile", "repair")


def _entry(fn: FunctionSpec, action: str, record_id: str | None, now: datetime, metadata: dict[str, Any],
           severity: str, *id_parts: str) -> dict[str, Any]:
    """The audit_log row every entry shares: stable id from ``id_parts``, the function as actor."""
    return {
        "id": _stable_id(fn.name, action, *id_parts),
        "timestamp": now.astimezone(UTC).isoformat(),
        "actor": f"zsync/{fn.name}",
        "actor_type": ACTOR_TYPE,
        "action": action,
        "resource_type": fn.table.resource_type,
        "resource_id": record_id,
        "metadata": {"sync_direction": SYNC_DIRECTION[fn.direction], "function": fn.name, **metadata},
        "severity": severity,
    }


def _lag(now: datetime, changed_at: datetime | None, source_ts: datetime | None) -> dict[str, Any]:
    return {
        "changed_at": changed_at.astimezone(UTC).isoformat() if changed_at else None,
        "lag_seconds": round((now - changed_at).total_seconds(), 3) if changed_at else None,
        "record_age_seconds": round((now - source_ts).total_seconds(), 3) if source_ts else None,
    }


def sync_entry(fn: FunctionSpec, row: Mapping[str, Any], outcome: Outcome, now: datetime,
               stored: Mapping[str, Any] | None = None, *, changed_at: datetime | None = None,
               origin: str = "live", changed_at_source: str | None = None,
               merge: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``<table>_synced`` (applied, or merged) or ``sync_skipped_stale_data`` (stored version was newer).

    ``lag_seconds`` is delivery lag: ``now`` minus ``changed_at``, when the change happened on the source
    side as the system saw it (Zapier's ``edited_at`` or the arrival time; the outbox capture time for
    Supabase -> Tables); None when unknown. It is never derived from the record's own version timestamp,
    which is kept apart as ``record_age_seconds``. ``origin``: live delivery, replay (dead-letter queue),
    reconcile, or repair (the sync pushing a newer version it found on the other side). ``merge`` (outcome
    ``merged``, ``row`` the merged record): which fields came from which side, as ``metadata.merged``
    ``{"supabase": [...], "tables": [...], "both_later": {field: side kept}}``."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}")
    spec = fn.table
    source_ts: datetime | None = row.get(spec.version) if spec.version else row.get("timestamp")
    metadata: dict[str, Any] = {
        "outcome": outcome.value,
        "origin": origin,
        "source_timestamp": source_ts.isoformat() if source_ts else None,
        "changed_at_source": changed_at_source if changed_at else None,
        **_lag(now, changed_at, source_ts),
    }
    if stored is not None and spec.version:
        metadata["stored_updated_at"] = stored.get(spec.version)
    if merge is not None:
        metadata["merged"] = {k: merge.get(k) for k in ("supabase", "tables", "both_later", "base_version")}
    synced = outcome in (Outcome.APPLIED, Outcome.MERGED)
    action = spec.synced_action if synced else SKIPPED_ACTION
    version = source_ts.isoformat() if source_ts else ""
    entry = _entry(fn, action, row["id"], now, metadata, "debug" if outcome is Outcome.APPLIED else "info",
                   str(row["id"]), version, row_to_json(row))
    if outcome is Outcome.MERGED:
        # One merge, one entry: both directions compute the same merged record (zsync.merge3 is symmetric), so
        # when both meet the conflict at once the second entry has the first's id and is not added.
        entry["id"] = _stable_id("merged", spec.name, str(row["id"]), version, row_to_json(row))
    return entry


def failed_entry(fn: FunctionSpec, body: bytes, problems: list[dict[str, str]], now: datetime,
                 record_id: str | None = None, status: int = 400, declared_bytes: int | None = None,
                 keep_body: bool = False) -> dict[str, Any]:
    """``sync_failed``: a delivery that was rejected (bad input) or could not be applied. The id is stable
    per (function, status, body, declared size), so a redelivery is audited once but distinct bodies whose
    bytes were not read (413) are not merged. ``keep_body``: the delivery itself goes into
    ``metadata.delivery`` (its first 50,000 characters), for a delivery nobody else keeps (an inbox message
    is acknowledged, a dead letter deleted): what a person needs to repair and re-send it."""
    digest = hashlib.sha256(body).hexdigest()
    metadata: dict[str, Any] = {"status": status, "problems": problems[:20], "body_sha256": digest,
                                "body_bytes": len(body)}
    if keep_body:
        metadata["delivery"] = body.decode("utf-8", "replace").replace("\x00", "")[:50_000]
    return _entry(fn, FAILED_ACTION, record_id, now, metadata, "error",
                  str(status), digest, "" if declared_bytes is None else str(declared_bytes))


def delete_entry(fn: FunctionSpec, record_id: str, version: datetime, now: datetime, outcome: Outcome, *,
                 changed_at: datetime | None = None, origin: str = "live") -> dict[str, Any]:
    """``<table>_synced`` with ``metadata.operation = "delete"``: a delete carried to the other side (or,
    ``skipped_stale``, not carried because the other side held a newer version). ``version``: the delete's
    version (the tombstone's, or Zapier's ``deleted_at``); lag runs from ``changed_at``, when the delete
    happened as the system saw it (Zapier's ``deleted_at``, the outbox capture time), never from a version
    that may be the deleted record's old ``updated_at``."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}")
    action = fn.table.synced_action if outcome is Outcome.APPLIED else SKIPPED_ACTION
    metadata = {"operation": "delete", "outcome": outcome.value, "origin": origin,
                "source_timestamp": version.isoformat(), **_lag(now, changed_at, None)}
    return _entry(fn, action, record_id, now, metadata, "info", "delete", record_id, version.isoformat())


def parked_entry(fn: FunctionSpec, record_id: str, problems: list[dict[str, str]], tables_record: Mapping[str, Any],
                 incoming: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """``sync_failed`` for a record parked for a person: everything needed to repair it by hand (the
    unreadable Tables fields as they are, what was wrong, the version that was not written over them)."""
    tables_json = row_to_json(tables_record)
    not_written = row_to_json(incoming)
    metadata = {
        "status": 409,
        "resolution": "parked: the Zapier Tables record is unreadable and may be newer; it was not "
                      "overwritten. Fix the fields named in problems in Tables (its next delivery syncs it).",
        "problems": problems[:20],
        "tables_record": tables_json[:50_000],
        "not_written": not_written[:50_000],
    }
    return _entry(fn, FAILED_ACTION, record_id, now, metadata, "error", "parked", record_id, tables_json, not_written)

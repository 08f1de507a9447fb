"""The two sync operations every function performs, independent of HTTP (replay and reconcile call them
too):

* :func:`apply_from_tables` - a record a Zap sent from Zapier Tables -> Supabase (Zaps 3A, 3C, 3E, 3F);
* :func:`apply_from_supabase` - a Supabase Database Webhook payload -> Zapier Tables (Zaps 3B, 3D, 3G).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

import psycopg
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField

from shared import audit, conflict, supabase_db
from shared.conflict import Outcome
from shared.logs import log_event
from shared.mapping import InvalidRecord, parse_supabase_record, parse_tables_record, to_tables_fields
from shared.settings import Settings, TablesWriter
from shared.spec import FUNCTIONS, Direction, FunctionSpec, TableSpec
from shared.zapier_tables import (
    CatchHookWriter,
    Record,
    TablesClient,
    TablesDuplicate,
    catch_hook_writer_from_settings,
    client_from_settings,
)


class ConfigurationError(RuntimeError):
    """The deployment is missing a setting this function needs (never caused by the request)."""


class SupabaseWebhook(BaseModel):
    """What a Supabase Database Webhook POSTs (see ../shared/reference/supabase-webhooks.md)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["INSERT", "UPDATE", "DELETE"]
    table: str
    schema_: str = PydanticField(alias="schema")
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None


class SyncResult(BaseModel):
    outcome: Outcome
    function: str
    table: str
    id: str | None = None
    detail: str | None = None
    lag_ms: float | None = None  # delivery lag (see shared.audit.sync_entry); None when the change time is unknown


EDITED_AT = "edited_at"  # top-level key of a Zap delivery: when Zapier saw the record change


def _lag_ms(changed_at: datetime | None, now: datetime) -> float | None:
    return round((now - changed_at).total_seconds() * 1000, 1) if changed_at else None


def change_time(payload: Mapping[str, Any], received_at: datetime) -> tuple[datetime, str]:
    """When a Tables -> Supabase change happened as the system saw it: Zapier's ``edited_at`` when the
    delivery carries one (ISO 8601 with a zone), else its arrival. -> (time, "edited_at" | "received")."""
    raw = payload.get(EDITED_AT)
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.strip())
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(UTC), EDITED_AT
    return received_at, "received"


@dataclass
class SyncContext:
    """What the functions of one process share: settings and lazily built clients."""

    settings: Settings
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("zsync"))

    @cached_property
    def db(self) -> supabase_db.Database:
        if self.settings.database_url is None:
            raise ConfigurationError("ZSYNC_DATABASE_URL is not set")
        return supabase_db.Database(
            self.settings.database_url.get_secret_value(),
            max_size=self.settings.db_pool_max,
            connect_timeout_s=self.settings.db_connect_timeout_s,
            retry_budget_s=self.settings.retry_budget_s,
        )

    @cached_property
    def tables(self) -> TablesClient:
        try:
            return client_from_settings(self.settings)
        except ValueError as exc:  # a required setting is missing
            raise ConfigurationError(str(exc)) from None

    @cached_property
    def hooks(self) -> CatchHookWriter:
        try:
            return catch_hook_writer_from_settings(self.settings)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def table_id(self, spec: TableSpec) -> str:
        try:
            return self.settings.table_ids[spec.name]
        except KeyError:
            raise ConfigurationError(f"ZSYNC_TABLE_IDS has no Zapier table id for {spec.name!r}") from None


def unwrap_tables_payload(payload: Mapping[str, Any]) -> Any:
    """A Zap sends the record's fields flat; ``{"record": {...}}`` (optionally with ``edited_at``) too."""
    if "record" in payload and set(payload) <= {"record", EDITED_AT}:
        return payload["record"]
    return payload


def apply_from_tables(ctx: SyncContext, fn: FunctionSpec, record: Mapping[str, Any],
                      received_at: datetime | None = None, *, changed_at: datetime | None = None,
                      changed_at_source: str = "received", origin: str = "live") -> SyncResult:
    """Parse a Tables record and apply it to Supabase under the conflict rule. Raises InvalidRecord.

    ``changed_at``: when the change happened (:func:`change_time`); defaults to the arrival time."""
    spec = fn.table
    now = received_at or datetime.now(UTC)
    changed = changed_at or now
    row = parse_tables_record(spec, record, received_at=now)

    def work(conn: psycopg.Connection) -> Outcome:
        if spec.append_only:
            return Outcome.APPLIED if supabase_db.append_audit(conn, row) else Outcome.UNCHANGED
        outcome, stored = supabase_db.sync_upsert(conn, spec, row)
        result = Outcome(outcome)
        if result in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
            supabase_db.append_audit(conn, audit.sync_entry(fn, row, result, datetime.now(UTC), stored,
                                                            changed_at=changed, changed_at_source=changed_at_source,
                                                            origin=origin))
        if result is Outcome.SKIPPED_STALE and Direction.TO_TABLES in spec.directions:
            # Tables sent an older version than Supabase holds: push Supabase's back so Tables converges
            # even if the webhook for the newer version was lost.
            supabase_db.announce(conn, spec, row["id"])
        return result

    outcome = ctx.db.run(work)
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=row["id"],
                      lag_ms=_lag_ms(changed, datetime.now(UTC)))


def apply_from_supabase(ctx: SyncContext, fn: FunctionSpec, hook: SupabaseWebhook, *,
                        origin: str = "live") -> SyncResult:
    """Apply a Database Webhook's record to Zapier Tables if newer. Raises InvalidRecord.

    Lag is measured from the change's capture in the outbox (the Supabase transaction)."""
    spec = fn.table
    if hook.table != spec.name or hook.schema_ != "public":
        raise InvalidRecord([{
            "field": "table",
            "problem": f"payload is for {hook.schema_}.{hook.table}; this function syncs public.{spec.name}",
        }])
    if hook.type == "DELETE":
        old_id = (hook.old_record or {}).get("id")
        return SyncResult(outcome=Outcome.IGNORED, function=fn.name, table=spec.name,
                          id=old_id if isinstance(old_id, str) else None, detail="DELETE events are not synced")
    if hook.record is None:
        raise InvalidRecord([{"field": "record", "problem": f"{hook.type} payload has no record"}])
    row = parse_supabase_record(spec, hook.record)
    fields = to_tables_fields(spec, row)
    captured: list[datetime | None] = [None]

    def work(conn: psycopg.Connection) -> Outcome:
        supabase_db.lock_record(conn, spec, row["id"])
        captured[0] = supabase_db.outbox_capture_time(conn, spec, row["id"], row.get(spec.version or ""))
        if ctx.settings.tables_writer is TablesWriter.CATCH_HOOK:
            ctx.hooks.send(spec.name, fields)
            outcome = Outcome.APPLIED
        else:
            outcome = _write_if_newer(ctx, conn, fn, row, fields)
        if outcome in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
            supabase_db.append_audit(conn, audit.sync_entry(fn, row, outcome, datetime.now(UTC),
                                                            changed_at=captured[0], changed_at_source="outbox",
                                                            origin=origin))
        supabase_db.ack_outbox(conn, spec, row["id"], row.get(spec.version or ""), outcome.value)
        return outcome

    outcome = ctx.db.run(work)
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=row["id"],
                      lag_ms=_lag_ms(captured[0], datetime.now(UTC)))


def _remove_duplicates(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, table_id: str,
                       record_id: str) -> Record:
    """Several Tables records carry one id (a create retried after a lost response, or a hand-made copy):
    keep the one with the newest version, delete the others."""
    records = list(ctx.tables.iter_records(table_id, filters={"id": record_id}))

    def row_of(record: Record) -> dict[str, Any] | None:
        try:
            return parse_tables_record(spec, record.data)
        except InvalidRecord:
            return None

    keep = records[0]
    for candidate in records[1:]:
        a, b = row_of(candidate), row_of(keep)
        if a is not None and (b is None or conflict.compare(conn, spec, a, b) > 0):
            keep = candidate
    removed = [r.id for r in records if r.id != keep.id]
    for rid in removed:
        ctx.tables.delete(table_id, rid, missing_ok=True)
    log_event(ctx.logger, logging.WARNING, "tables_duplicates_removed", record_id=record_id, kept=keep.id,
              removed=removed)
    return keep


def _write_if_newer(ctx: SyncContext, conn: psycopg.Connection, fn: FunctionSpec, row: Mapping[str, Any],
                    fields: dict[str, Any]) -> Outcome:
    spec = fn.table
    table_id = ctx.table_id(spec)
    try:
        existing = ctx.tables.find_by_field(table_id, "id", row["id"])
    except TablesDuplicate:
        existing = _remove_duplicates(ctx, conn, spec, table_id, row["id"])
    if existing is None:
        ctx.tables.create(table_id, fields)
        return Outcome.APPLIED
    try:
        current = parse_tables_record(spec, existing.data)
    except InvalidRecord as exc:
        log_event(ctx.logger, logging.WARNING, "tables_record_unreadable", record_id=row["id"],
                  problems=exc.problems, resolution="overwritten with the Supabase version")
        current = None
    outcome = conflict.outcome_of(conflict.compare(conn, spec, row, current))
    if outcome is Outcome.APPLIED:
        ctx.tables.update(table_id, existing.id, fields)
    elif outcome is Outcome.SKIPPED_STALE and current is not None:
        # Tables holds a newer version than this webhook carried: make sure Supabase has it too (its own
        # Zap delivery may have been lost). Conditional, so a no-op when Supabase is already current.
        pushed, _ = supabase_db.sync_upsert(conn, spec, current)
        if pushed == Outcome.APPLIED:
            back = FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)]
            supabase_db.append_audit(conn, audit.sync_entry(back, current, Outcome.APPLIED, datetime.now(UTC),
                                                            origin="repair"))
    return outcome

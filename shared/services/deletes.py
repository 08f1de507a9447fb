"""Deletes, both ways: a delete made in Zapier Tables (the trash check) applied to Supabase, a Supabase DELETE
carried to Tables, and the rule between a delete and a change: the later wins, a restore comes back
(docs/deletes.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from shared.adapters import supabase_db
from shared.core import audit
from shared.core.mapping import (
    InvalidRecord,
    coerce_id,
    normalize_timestamp,
)
from shared.core.outcome import Outcome
from shared.core.spec import FUNCTIONS, Direction, FunctionSpec, TableSpec
from shared.platform.logs import log_event
from shared.platform.settings import TablesWriter
from shared.services.sync import (
    SupabaseWebhook,
    SyncContext,
    SyncResult,
    _readable,
    _run_recorded,
    _tables_edited_at,
    push_back,
)

if TYPE_CHECKING:  # imported where used: a *_to_supabase function never loads the Tables client (cold start)
    from shared.adapters.zapier_tables import Record


def apply_tables_delete(ctx: SyncContext, spec: TableSpec, record_id: str, deleted_at: datetime) -> SyncResult:
    """A record deleted in Zapier Tables (found in its trash, with Zapier's ``deleted_at``): delete the
    Supabase row unless Supabase holds a newer version, and keep a tombstone so the Tables copy's stale
    deliveries (and reconcile) never bring it back. When Supabase's version is newer it wins and is
    pushed back to Tables. Audited as ``<table>_synced`` with ``metadata.operation = "delete"``."""
    fn = FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)]
    if not spec.sync_deletes or spec.append_only:
        return SyncResult(outcome=Outcome.IGNORED, function=fn.name, table=spec.name, id=record_id,
                          detail=f"deletes are not synced for {spec.name}")
    deleted_at = deleted_at.astimezone(UTC)

    def work(conn: psycopg.Connection) -> Outcome:
        supabase_db.lock_record(conn, spec, record_id)
        result = Outcome(supabase_db.apply_tables_delete(conn, spec, record_id, deleted_at))
        supabase_db.forget_tables(conn, spec, [record_id])  # its Tables copy is gone: a write finds it first
        if result in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
            supabase_db.append_audit(conn, audit.delete_entry(fn, record_id, deleted_at, datetime.now(UTC), result,
                                                              changed_at=deleted_at))
        if result is Outcome.SKIPPED_STALE and Direction.TO_TABLES in spec.directions:
            supabase_db.announce(conn, spec, record_id)
        return result

    outcome = ctx.db.run(work)
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=record_id)


def _deleted_id(spec: TableSpec, hook: SupabaseWebhook) -> str:
    old = hook.old_record or {}
    try:
        return coerce_id(old.get("id"), spec.field("id").max_length or 128)
    except ValueError as exc:
        raise InvalidRecord([{"field": "old_record.id", "problem": str(exc)}]) from None


def _delete_from_supabase(ctx: SyncContext, fn: FunctionSpec, record_id: str) -> SyncResult:
    """A DELETE webhook: delete the Tables copy, unless the row exists again in Supabase (a later insert
    superseded the delete) or the Tables copy holds a version newer than the delete (it wins: pushed to
    Supabase, where it is newer than the tombstone)."""
    spec = fn.table
    if not spec.sync_deletes:
        return _ignore_delete(ctx, fn, record_id, f"deletes are not synced for {spec.name}")
    if ctx.settings.tables_writer is TablesWriter.CATCH_HOOK:
        return _ignore_delete(ctx, fn, record_id, "the catch-hook writer cannot delete Tables records")
    table_id = ctx.table_id(spec)
    trashed: list[str] = []  # Zapier ids of the copies this delivery moved to the trash

    def work(conn: psycopg.Connection) -> tuple[Outcome, datetime | None]:
        tomb = supabase_db.tombstone_version(conn, spec, record_id)
        if tomb is None:  # not deleted (any more): a later write superseded this delete
            return Outcome.UNCHANGED, None
        records = list(ctx.tables.iter_records(table_id, filters={"id": record_id}))
        outcome = Outcome.UNCHANGED
        restored = supabase_db.sync_trashed_ids(conn, spec, [r.id for r in records])
        for rec in records:
            current = _readable(ctx, spec, rec)
            if current is not None and rec.id in restored:
                # A copy the sync trashed is live again: a person restored it after the delete, a later change.
                push_back(ctx, conn, spec, restored_row(spec, current, tomb, _tables_edited_at(rec)))
                return Outcome.SKIPPED_STALE, tomb
            if current is not None and current.get(spec.version or "") and \
                    supabase_db.version_cmp(conn, spec, current, {"id": record_id, spec.version: tomb}) > 0:
                # Edited in Tables after the delete: that later write wins and goes back to Supabase.
                push_back(ctx, conn, spec, current)
                return Outcome.SKIPPED_STALE, tomb
        for rec in records:
            ctx.tables.delete(table_id, rec.id, missing_ok=True)  # meta.errors: TablesRejected, not acked
            trashed.append(rec.id)
            outcome = Outcome.APPLIED
        return outcome, tomb

    def record(conn: psycopg.Connection, outcome: Outcome, tomb: datetime | None) -> None:
        if trashed:  # the sync's own delete: never taken for a person's delete in the trash
            supabase_db.note_sync_trashed(conn, spec, record_id, trashed)
            supabase_db.forget_tables(conn, spec, [record_id])
        if tomb is None:
            return
        if outcome in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
            captured = supabase_db.outbox_capture_time(conn, spec, record_id, tomb)  # the delete's transaction
            supabase_db.append_audit(conn, audit.delete_entry(fn, record_id, tomb, datetime.now(UTC), outcome,
                                                              changed_at=captured))
        supabase_db.ack_outbox(conn, spec, record_id, tomb, outcome.value)

    outcome = _run_recorded(ctx, lambda conn: supabase_db.lock_record(conn, spec, record_id), work, record)
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=record_id)


def restored_row(spec: TableSpec, row: Mapping[str, Any], tomb: datetime, edited_at: datetime | None) -> dict[str, Any]:
    """``row`` of a Tables record restored from the trash after its delete (the sync's own trashed copy, live
    again): a new change, versioned after the delete - greatest(its version, Zapier's edited_at, tombstone +
    1 ms), as a re-insert in Supabase is (zsync.maintain_updated_at) - so the tombstone does not refuse it."""
    version = spec.version or "updated_at"
    ms = timedelta(milliseconds=1)
    floor = tomb.replace(microsecond=tomb.microsecond // 1000 * 1000) + ms
    later = max(t for t in (row.get(version), edited_at, floor) if t is not None)
    return dict(row, **{version: later})


def _ignore_delete(ctx: SyncContext, fn: FunctionSpec, record_id: str, why: str) -> SyncResult:
    """A DELETE this function does not carry to Tables: acknowledged (``ignored``) so the sweeper does not
    re-send it for ever, and logged."""
    spec = fn.table

    def work(conn: psycopg.Connection) -> None:
        tomb = supabase_db.tombstone_version(conn, spec, record_id)
        if tomb is not None:  # none: re-inserted since, that insert's delivery acknowledges the delete
            supabase_db.ack_outbox(conn, spec, record_id, tomb, Outcome.IGNORED.value)

    ctx.db.run(work)
    log_event(ctx.logger, logging.WARNING, "delete_ignored", table=spec.name, record_id=record_id, reason=why)
    return SyncResult(outcome=Outcome.IGNORED, function=fn.name, table=spec.name, id=record_id, detail=why)


def later_tables_delete(conn: psycopg.Connection, spec: TableSpec, version: datetime | None,
                        trashed: Sequence[Record]) -> datetime | None:
    """Of the trashed Tables records of one id, the latest ``deleted_at`` of a delete made in Tables (not the
    sync's own, zsync.sync_trashed) when it is not before ``version`` (the Supabase version about to be
    written there): that delete is the later change and wins. None: no such delete, write the version."""
    deletes: dict[str, datetime] = {}
    for rec in trashed:
        try:
            at = normalize_timestamp(rec.deleted_at)
        except ValueError:
            continue
        if at is not None:
            deletes[rec.id] = at
    if deletes:
        for own in supabase_db.sync_trashed_ids(conn, spec, list(deletes)):
            deletes.pop(own, None)
    if not deletes:
        return None
    latest = max(deletes.values())
    if version is not None and version.replace(microsecond=version.microsecond // 1000 * 1000) > \
            latest.replace(microsecond=latest.microsecond // 1000 * 1000):
        return None  # Supabase's version is newer than the delete: it wins and is re-created in Tables
    return latest


def delete_won(conn: psycopg.Connection, spec: TableSpec, record_id: str, deleted_at: datetime) -> Outcome:
    """A delete made in Tables at ``deleted_at`` is later than the version being delivered there: apply it to
    Supabase (zsync.apply_tables_delete, audited like the trash check) instead of re-creating the record.
    -> ``deleted``, or ``unchanged`` when Supabase's row changed meanwhile to a version newer than the delete
    (that newer version's own outbox entry delivers it)."""
    back = FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)]
    result = Outcome(supabase_db.apply_tables_delete(conn, spec, record_id, deleted_at))
    if result is Outcome.APPLIED:
        supabase_db.append_audit(conn, audit.delete_entry(back, record_id, deleted_at, datetime.now(UTC), result,
                                                          changed_at=deleted_at))
    return Outcome.UNCHANGED if result is Outcome.SKIPPED_STALE else Outcome.DELETED

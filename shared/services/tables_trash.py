"""Deletes made in Zapier Tables: the scheduled trash check.

Zapier Tables keeps deleted records in its trash with ``deleted_at`` (``POST .../records/query?trash=only``,
on the SDK's path: the public API v2 documents no ``trash``). Where ``zsync wire zapier`` subscribed the
inboxes to the deletes-capable trigger, a delete arrives at once through the inbox
(:mod:`shared.services.inbox_consumer`, through :func:`apply_deletes` below); this check stays on as the
safety net for a lost or unreadable delete event, or inboxes on the new-or-updated trigger.
:func:`check_trash` lists a table's trash and hands every record deleted since the last check to
:func:`shared.services.deletes.apply_tables_delete`, which deletes the Supabase row and keeps a tombstone (so
a stale Zap / inbox delivery or reconcile never brings it back) - unless Supabase holds a version newer than
the delete, which then wins and is pushed back.

Which trashed records are "new": the query API filters and orders only by fields (``f<n>``), not by
``deleted_at``, so the whole trash is paged through (one request per 1000 trashed records), but only the
records whose ``deleted_at`` is at or after the table's watermark minus :data:`OVERLAP` are applied. The
watermark (the latest ``deleted_at`` seen) and the time of the last complete check are kept in
``zsync.trash_watermarks``; ``zsync doctor`` warns when no check ran recently. The overlap re-reads deletes
near the watermark (a delete whose ``deleted_at`` was stamped before a later one became visible); applying
one twice is a no-op (``unchanged``), so a second run changes nothing.

Not a delete in Tables, skipped:

* a trashed record whose ``id`` field has a live (not trashed) record in the table: a duplicate the sync
  removed, or a record re-created since (e.g. a newer Supabase version that won over the delete);
* a trashed record whose Supabase row was (re)inserted and has not reached Tables yet (an unacknowledged
  INSERT in the outbox, ``zsync.trash_insert_pending``): the trashed record is a copy of an earlier
  incarnation (e.g. the Tables copy the sync deleted after a Supabase delete); re-read within the overlap;
* a trashed record whose ``id`` field (or ``deleted_at``) cannot be read: logged (``trash_record_unreadable``).

A trashed record that never reached Supabase still gets a tombstone (``zsync.apply_tables_delete`` answers
``unchanged``): a delivery of it still queued somewhere (a Zap retry, a trigger inbox) then cannot create
the row afterwards. A tombstone is cleared by any later insert of the id, so it blocks nothing else.

Where it runs: every minute in production (an EventBridge schedule invokes each two-way table's
``*_to_supabase`` Lambda with ``{"zsync": "check_trash"}``, see ``functions/lambda_adapter.py``); a signed
POST of that body to the function's URL runs it too (Cloud Run / Cloud Scheduler); the local stack runs it
every few seconds. Tables with ``sync_deletes=False`` and ``audit_log`` (append-only) are never checked.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.adapters import supabase_db
from shared.core.mapping import coerce_id, normalize_timestamp
from shared.core.outcome import Outcome
from shared.core.spec import Direction, TableSpec
from shared.platform.logs import log_event
from shared.services.deletes import apply_tables_delete
from shared.services.sync import SyncContext, is_empty_id

CHECK_TRASH = "check_trash"  # the body / scheduled event {"zsync": "check_trash"}
OVERLAP = timedelta(minutes=2)
PAGE = 1000


@dataclass
class TrashResult:
    """What one check found in a table's trash."""

    table: str
    checked: bool = True  # False: deletes are not synced for this table (nothing was read)
    trashed: int = 0  # records in the trash
    considered: int = 0  # of those, deleted at or after the watermark minus the overlap
    applied: int = 0  # deleted in Supabase (tombstoned, audited)
    unchanged: int = 0  # already deleted / never synced (tombstone kept)
    kept_newer: int = 0  # Supabase held a newer version: kept and pushed back to Tables
    still_live: int = 0  # the id has a live Tables record: not a delete
    insert_pending: int = 0  # the Supabase row was (re)inserted and has not reached Tables yet: not a delete
    unreadable: int = 0  # no readable id / deleted_at: skipped, logged
    since: str | None = None
    watermark: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def deletes_checked(spec: TableSpec) -> bool:
    """Whether Tables deletes of this table are applied to Supabase (the schedule covers exactly these)."""
    return spec.sync_deletes and not spec.append_only and Direction.TO_SUPABASE in spec.directions \
        and spec.version is not None


def _watermark(ctx: SyncContext, spec: TableSpec) -> datetime | None:
    return ctx.db.run(lambda conn: conn.execute("SELECT zsync.trash_watermark(%s)", (spec.name,)).fetchone()[0])


def _deletes_by_id(ctx: SyncContext, spec: TableSpec, found: list[tuple[str, str | None, datetime]]
                   ) -> dict[str, datetime]:
    """Our id -> the latest deleted_at of its trashed records, leaving out the records the sync trashed itself
    (zsync.sync_trashed: the copy of a record deleted in Supabase, a duplicate): never a person's delete."""
    zids = [z for _, z, _ in found if z is not None]
    own = ctx.db.run(lambda conn: supabase_db.sync_trashed_ids(conn, spec, zids)) if zids else set()
    wanted: dict[str, datetime] = {}
    for rid, zid, deleted_at in found:
        if zid not in own:
            wanted[rid] = max(deleted_at, wanted.get(rid, deleted_at))
    return wanted


def apply_deletes(ctx: SyncContext, spec: TableSpec, found: list[tuple[str, str | None, datetime]]) -> dict[str, str]:
    """Apply deletes made in Tables, each ``(our id, Zapier's record id, deleted_at)``, as the trash check
    does: the sync's own deletes are left out; an id with a live Tables record (``still_live``) or an
    insert not yet in Tables (``insert_pending``) is not a delete; the rest go to
    :func:`apply_tables_delete` (``applied``, ``kept_newer``: Supabase's newer version won, or ``unchanged``:
    already applied, so a delete seen by both the trigger and the trash check is applied once).
    -> our id -> that verdict (a :class:`TrashResult` counter's name). Also used by the trigger inbox's
    delete events (:mod:`shared.services.inbox_consumer`)."""
    wanted = _deletes_by_id(ctx, spec, found)
    live = {r.data.get("id") for r in ctx.tables.find_many(ctx.table_id(spec), "id", list(wanted))} \
        if wanted else set()
    pending = set(ctx.db.run(lambda conn: [r[0] for r in conn.execute(
        "SELECT zsync.trash_insert_pending(%s, %s)", (spec.name, sorted(wanted))).fetchall()])) if wanted else set()
    verdicts: dict[str, str] = {}
    for rid in sorted(wanted):
        if rid in live:
            verdicts[rid] = "still_live"
        elif rid in pending:
            verdicts[rid] = "insert_pending"
        else:
            outcome = apply_tables_delete(ctx, spec, rid, wanted[rid]).outcome
            verdicts[rid] = {Outcome.APPLIED: "applied", Outcome.SKIPPED_STALE: "kept_newer"}.get(outcome, "unchanged")
    return verdicts


def check_trash(ctx: SyncContext, spec: TableSpec, since: datetime | None = None, *,
                overlap: timedelta = OVERLAP) -> TrashResult:
    """Apply to Supabase the deletes made in ``spec``'s Zapier table since ``since`` (default: the stored
    watermark minus ``overlap``; the whole trash on the first run). Idempotent. See the module docstring."""
    result = TrashResult(spec.name)
    if not deletes_checked(spec):
        result.checked = False
        return result
    table_id = ctx.table_id(spec)
    started = datetime.now(UTC)  # a delete made while the pages are read is after this (see the watermark)
    if since is None:
        mark = _watermark(ctx, spec)
        since = mark - overlap if mark is not None else None
    result.since = since.isoformat() if since else None
    id_max = spec.field("id").max_length or 128
    newest: datetime | None = None
    found: list[tuple[str, str | None, datetime]] = []  # (our id, Zapier's record id, deleted_at)
    for record in ctx.tables.iter_records(table_id, PAGE, trash="only"):
        result.trashed += 1
        try:
            deleted_at = normalize_timestamp(record.deleted_at)
            if deleted_at is None:
                raise ValueError("deleted_at is missing")
        except ValueError as exc:
            result.unreadable += 1
            log_event(ctx.logger, logging.WARNING, "trash_record_unreadable", table=spec.name,
                      tables_record=record.id, problem=f"deleted_at: {exc}")
            continue
        newest = deleted_at if newest is None else max(newest, deleted_at)
        if since is not None and deleted_at < since:
            continue
        result.considered += 1
        try:  # an empty id cell: the record went to Supabase under its Zapier id (shared.services.sync.tables_row)
            rid = coerce_id(record.id if is_empty_id(record.data.get("id")) else record.data.get("id"), id_max)
        except ValueError as exc:
            result.unreadable += 1
            log_event(ctx.logger, logging.WARNING, "trash_record_unreadable", table=spec.name,
                      tables_record=record.id, problem=f"id: {exc}")
            continue
        found.append((rid, record.id, deleted_at))
    for verdict in apply_deletes(ctx, spec, found).values():
        setattr(result, verdict, getattr(result, verdict) + 1)
    # Never past the check's start: a delete made during the check on a page already read has a deleted_at
    # after the start (the overlap covers the clocks' skew), so the next check reads it.
    newest = min(newest, started) if newest else None
    result.watermark = newest.isoformat() if newest else None
    ctx.db.run(lambda conn: conn.execute("SELECT zsync.trash_checked(%s, %s, %s, %s)",
                                         (spec.name, newest, result.considered, result.applied)))
    # An idle check (nothing new in the trash) logs at DEBUG: every 5 s locally, it would push the real
    # deliveries out of `zsync logs`. Doctor reads the last run from zsync.trash_watermarks, not the log.
    log_event(ctx.logger, logging.DEBUG if idle_check(result.as_dict()) else logging.INFO,
              "trash_checked", **result.as_dict())
    return result


def idle_check(answer: dict[str, Any]) -> bool:
    """Whether a trash check changed nothing and found nothing wrong: no error, no delete applied or kept back
    by a newer version, nothing unreadable. Deletes it re-reads inside the watermark's overlap, already applied
    (``unchanged``) or still waiting (``still_live``, ``insert_pending``), are the same on every check."""
    return not any(answer.get(key) for key in ("error", "applied", "kept_newer", "unreadable"))


def run_check(function_name: str, ctx: SyncContext | None = None) -> tuple[dict[str, Any], bool]:
    """The scheduled entry point (Lambda schedule event, signed POST): check the trash of the table of
    ``function_name`` (a ``*_to_supabase`` function). -> (answer, ok). Failures are logged, not raised:
    the next run (a minute later) retries, and the watermark only moves after a complete check."""
    import psycopg
    from psycopg_pool import PoolTimeout

    from shared.adapters import supabase_db
    from shared.adapters.zapier_errors import TablesError
    from shared.core.spec import FUNCTIONS
    from shared.platform.settings import get_settings
    from shared.services.deliveries import context_for
    from shared.services.sync import ConfigurationError

    fn = FUNCTIONS[function_name]
    ctx = ctx or context_for(fn, get_settings())
    base = {"function": fn.name, "table": fn.table.name, "outcome": CHECK_TRASH}
    if fn.direction is not Direction.TO_SUPABASE:
        return base | {"error": "the trash check runs in the table's *_to_supabase function"}, False
    try:
        result = check_trash(ctx, fn.table)
    except (supabase_db.DatabaseUnavailable, psycopg.Error, PoolTimeout, TablesError, ConfigurationError) as exc:
        log_event(ctx.logger, logging.ERROR, "trash_check_failed", table=fn.table.name,
                  error_type=type(exc).__name__, error=str(exc)[:300])
        return base | {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}, False
    return base | result.as_dict(), True

"""Supabase -> Zapier Tables (Zaps 3B, 3D, 3G) for one record: find its Tables copy, compare versions, write
when newer, record the outcome once (the outbox batch, :mod:`shared.services.outbox_batch`, does the same for
many records at once).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from shared.adapters import supabase_db
from shared.core import audit
from shared.core.mapping import (
    InvalidRecord,
    parse_supabase_record,
    to_tables_fields,
)
from shared.core.outcome import Outcome, outcome_of
from shared.core.spec import Direction, FunctionSpec, TableSpec
from shared.platform.logs import log_event
from shared.platform.settings import TablesWriter
from shared.services import conflict
from shared.services.deletes import _delete_from_supabase, _deleted_id, delete_won, later_tables_delete
from shared.services.sync import (
    SupabaseWebhook,
    SyncContext,
    SyncResult,
    _lag_ms,
    _remove_duplicates,
    _run_recorded,
    _tables_edited_at,
    _unreadable_is_older,
    idless_record,
    push_back,
    tables_row,
    tables_version_row,
)

if TYPE_CHECKING:  # imported where used: a *_to_supabase function never loads the Tables client (cold start)
    from shared.adapters.zapier_tables import Record


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
        return _delete_from_supabase(ctx, fn, _deleted_id(spec, hook))
    if hook.record is None:
        raise InvalidRecord([{"field": "record", "problem": f"{hook.type} payload has no record"}])
    row = parse_supabase_record(spec, hook.record)
    captured: list[datetime | None] = [None]
    replaced: dict[str, supabase_db.Replaced] = {}  # the Tables record the write replaced
    known: dict[str, supabase_db.Known] = {}  # what the find or the write showed of the Tables copy
    hook = ctx.settings.tables_writer is TablesWriter.CATCH_HOOK

    def work(conn: psycopg.Connection) -> tuple[Outcome, Any]:
        nonlocal row
        if not hook:
            # Supabase moved on since this delivery was queued (a later write, a merge): the later row goes to
            # Tables, never this one over it - a stale write would overwrite a Tables edit the later row holds
            # (merged in), and its echo would then look like a change. Its own delivery finds Tables equal.
            later = supabase_db.later_row(conn, spec, row)
            if later is not None:
                row = parse_supabase_record(spec, later)
        captured[0] = supabase_db.outbox_capture_time(conn, spec, row["id"], row.get(spec.version or ""))
        fields = to_tables_fields(spec, row)
        if hook:
            ctx.hooks.send(spec.name, fields)
            return Outcome.APPLIED, None
        return _write_if_newer(ctx, conn, fn, row, fields, replaced, known)

    def record(conn: psycopg.Connection, outcome: Outcome, extra: Any) -> None:
        merged = extra if isinstance(extra, MergeDecision) else None
        if outcome in (Outcome.APPLIED, Outcome.SKIPPED_STALE, Outcome.MERGED):
            supabase_db.append_audit(conn, audit.sync_entry(fn, merged.row if merged else row, outcome,
                                                            datetime.now(UTC), changed_at=captured[0],
                                                            changed_at_source="outbox", origin=origin,
                                                            merge=merged.info if merged else None))
        if extra is not None and merged is None:
            supabase_db.append_audit(conn, extra)  # the parked entry
        if merged is not None:
            apply_merged(conn, spec, merged, replaced.get(row["id"]))
        elif outcome in (Outcome.APPLIED, Outcome.UNCHANGED) and not hook:
            supabase_db.agree(conn, spec, [row], replaced)  # Tables holds this row now
        if outcome is Outcome.QUEUED:  # the Tables edit is not taken in yet: no base for a blind write
            known.clear()
            supabase_db.forget_tables(conn, spec, [row["id"]])
        supabase_db.remember_tables(conn, spec, known)
        if outcome is not Outcome.QUEUED:  # (queued: left to a Tables edit's deliveries, see merged_outcome)
            supabase_db.ack_outbox(conn, spec, row["id"], row.get(spec.version or ""), outcome.value)

    def recovered(conn: psycopg.Connection, outcome: Outcome, extra: Any) -> None:
        if hook:
            return
        # what the write's answer showed may be older than what Tables has had since (see outbox_batch._record)
        supabase_db.forget_tables(conn, spec, [row["id"]])
        if outcome in (Outcome.APPLIED, Outcome.MERGED):
            requeue_overwritten(conn, spec, [row])

    outcome = _run_recorded(ctx, lambda conn: supabase_db.lock_record(conn, spec, row["id"]), work, record,
                            recovered)
    if outcome is Outcome.QUEUED:  # left to a recent Tables edit's deliveries: fetch them now
        pull_deliveries_for(ctx, fn)
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=row["id"],
                      lag_ms=_lag_ms(captured[0], datetime.now(UTC)))


@dataclass
class MergeDecision:
    """What zsync.merge_decide made of a record (see :func:`decide_merges`)."""

    action: str  # none | same | supabase | tables | merged
    row: dict[str, Any] | None  # the winning (tables) or merged record, as a Supabase row
    info: dict[str, Any] | None  # merged: which fields came from where


def decide_merges(conn: psycopg.Connection, spec: TableSpec,
                  items: Sequence[tuple[Mapping[str, Any], datetime | None, Mapping[str, Any]]]) -> list[MergeDecision]:
    """The field-level merge for ``(Tables record as read, Zapier's edited_at, Supabase row)`` items, in one
    call (zsync.merge_decide_many: the rule both directions share; ``none`` where the record has no base or
    the merge is off)."""
    return [MergeDecision(action, parse_supabase_record(spec, merged) if merged else None, info)
            for action, merged, info in supabase_db.merge_decide_many(conn, spec, list(items))]


def merged_outcome(decision: MergeDecision, outcome: Outcome) -> Outcome:
    """The outcome of a Supabase row meeting its Tables copy, given the merge's decision (``outcome``: the
    whole-record rule's, kept when the merge has nothing to say): same content -> unchanged; Tables did not
    change since the base -> the row is written (applied); only Tables changed -> its record wins
    (skipped_stale, pushed back at the version it counts for); both changed -> merged; left to the deliveries
    of a recent Tables edit (deferred) -> queued: nothing written, the outbox entry stays pending."""
    return {"same": Outcome.UNCHANGED, "supabase": Outcome.APPLIED, "tables": Outcome.SKIPPED_STALE,
            "merged": Outcome.MERGED, "deferred": Outcome.QUEUED}.get(decision.action, outcome)


def apply_merged(conn: psycopg.Connection, spec: TableSpec, decision: MergeDecision,
                 replaced: supabase_db.Replaced | None = None) -> None:
    """After the merged record was written to Tables: apply it to Supabase (zsync.sync_apply: it holds the
    Supabase row's fields, so it comes out applied - merged again only if the row changed meanwhile - and is
    not queued back); both sides hold it (zsync.agree), with ``replaced``, the Tables record the write replaced,
    as any write's: a person's edit that landed between the find and the write was overwritten there, and is
    merged on that record when its delivery comes (without it, the merge's own echo counted as an edit made on
    that person's, its values winning back - the suite's soak lost three fields so)."""
    assert decision.row is not None
    supabase_db.sync_apply(conn, spec, decision.row)
    supabase_db.agree(conn, spec, [decision.row], {decision.row["id"]: replaced} if replaced else None)


def _tables_version(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, current: dict[str, Any],
                    edited_at: datetime | None, incoming: Mapping[str, Any]) -> dict[str, Any]:
    """The Tables record's version: its ``updated_at``, or Zapier's ``edited_at`` when it was edited after
    the version it shares with ``incoming`` without advancing ``updated_at`` (same rule as zsync.sync_apply)."""
    version = spec.version or ""
    ours, theirs = current.get(version), incoming.get(version)
    if edited_at is None or ours is None or theirs is None:
        return current
    ms = timedelta(milliseconds=1)
    same_base = ours.replace(microsecond=ours.microsecond // 1000 * 1000) == \
        theirs.replace(microsecond=theirs.microsecond // 1000 * 1000)
    if same_base and edited_at - ours >= ms and supabase_db.version_cmp(conn, spec, current, incoming) != 0:
        return dict(current, **{version: max(edited_at, theirs + ms)})
    return current


@dataclass
class Blind:
    """What :func:`write_blind` did: ``written``: id -> what each write replaced (the known copy) and its own
    ``edited_at``; ``known``: id -> the copy each write's answer shows; ``fallback``: ids for the find path."""

    written: dict[str, supabase_db.Replaced]
    known: dict[str, supabase_db.Known]
    fallback: list[str]
    unchanged: list[str] = field(default_factory=list)  # the known copy is this version already: no write
    stopped: Exception | None = None  # Tables unavailable: the chunks from there on are not written


def known_copy(spec: TableSpec, record: Record, read: supabase_db.Known | None = None) -> supabase_db.Known | None:
    """The answer to the sync's own write, as :func:`supabase_db.remember_tables` keeps it (None when it
    cannot be read as a row: such a record is found again next time). ``read``: the record as the find before
    the write read it, remembered before the answer (an edit made in Tables when the sync did not know it yet)."""
    try:
        return supabase_db.Known(record.id, tables_row(spec, record), _tables_edited_at(record), ours=True,
                                 read=read if read is not None and not read.ours else None)
    except InvalidRecord:
        return None


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def write_blind(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, table_id: str,
                rows: Mapping[str, tuple[Mapping[str, Any], dict[str, Any]]],
                call: Callable[[Callable[[], Any]], Any] = lambda f: f()) -> Blind:
    """Issue 21 item 3: write the records whose Tables copy is known (zsync.blind_plan) by Zapier id, <= 100
    per PATCH, without a find: one request for a single change (none when the known copy is this version).
    What the find guarded, the merge keeps: each write passes the known copy to :func:`supabase_db.agree` as the
    record it replaced, so a person's edit made in Tables since (overwritten there: Zapier has no conditional
    update) is merged against that copy when its delivery arrives, and written back where it wins. The whole
    record is sent: a PATCH of only the changed fields would leave a Tables record that mixes a person's newer
    cells with Supabase's older ``updated_at``, and its echo would read as a cell edit at Zapier's time. A PATCH
    refused because a record is gone (deleted in Tables, a wrong id: Zapier refuses the whole request) forgets
    the chunk's ids and hands it to the find path (the trash and the delete rules); a refused value hands it
    there too (which finds the record that is refused). ``rows``: id -> (the row, its Tables fields). Only a
    row later than the known copy is written blind; a known copy that is later (Tables moved on: a delayed or
    re-sent change) takes the find, whose rule pushes Tables' version back."""
    from shared.adapters.zapier_errors import TablesNotFound, TablesRejected, TablesUnavailable
    from shared.adapters.zapier_tables import BATCH_MAX, chunks

    fields = {rid: f for rid, (_, f) in rows.items()}
    plan = supabase_db.blind_plan(conn, spec, list(rows)) if spec.version else {}
    known: dict[str, dict[str, Any]] = {}
    for rid in plan:
        with contextlib.suppress(InvalidRecord):  # (a copy that is not a row any more: the find reads it)
            known[rid] = parse_supabase_record(spec, dict(plan[rid].row))
    plan = {rid: k for rid, k in plan.items() if rid in known}
    order = list(known)
    later = dict(zip(order, conflict.compare_many(conn, spec, [(rows[rid][0], known[rid]) for rid in order]),
                     strict=True))
    # a version Tables already had (applied from it, or written there) while the known copy is older: that copy
    # lags (a delivery that did not move it): found first, never written over itself (zsync.tables_had)
    had = supabase_db.tables_had(conn, spec, {rid: rows[rid][0].get(spec.version or "") for rid in order
                                              if later[rid] > 0}) if spec.version else set()
    later.update({rid: -1 for rid in had})
    result = Blind({}, {}, [rid for rid in rows if rid not in plan or later[rid] < 0])
    # the known copy is this very version (a redelivery): nothing to write
    result.unchanged = [rid for rid in order if later[rid] == 0 and to_tables_fields(spec, known[rid]) == fields[rid]]
    ids = [rid for rid in order if later[rid] > 0 or (later[rid] == 0 and rid not in result.unchanged)]
    for chunk in chunks(ids, BATCH_MAX):
        if result.stopped or not supabase_db.announce_blind(
                ctx.db, spec, {r: (plan[r], rows[r][0].get(spec.version or "")) for r in chunk}):
            result.fallback += chunk  # (not announced: the find path, which needs no announcement)
            continue
        try:
            # keyed by the known copies it replaces, not by this process's memory: the same write retried
            # after its answer or its transaction was lost (a crash, a restart) replays the first answer
            answer = call(lambda chunk=chunk: ctx.tables.update_many(
                table_id, [(plan[r].tables_id, fields[r]) for r in chunk],
                read_at={plan[r].tables_id: _iso(plan[r].edited_at) for r in chunk}))
        except TablesNotFound:
            supabase_db.forget_tables(conn, spec, chunk)
            log_event(ctx.logger, logging.INFO, "blind_write_refused", table=spec.name, records=len(chunk),
                      resolution="a record is gone or its id is wrong: found again, with the trash")
            result.fallback += chunk
            continue
        except TablesRejected:
            result.fallback += chunk
            continue
        except TablesUnavailable as exc:
            result.stopped = exc
            result.fallback += chunk
            continue
        by_tid = {rec.id: rec for rec in answer or []}
        for r in chunk:
            rec = by_tid.get(plan[r].tables_id)
            written_at = _tables_edited_at(rec) if rec is not None else None
            result.written[r] = supabase_db.Replaced(known[r], plan[r].edited_at, written_at, blind=True)
            copy = known_copy(spec, rec) if rec is not None else None
            if copy is not None:
                result.known[r] = copy
            else:  # the answer cannot be read as a row: find it next time
                supabase_db.forget_tables(conn, spec, [r])
    return result


def _write_if_newer(ctx: SyncContext, conn: psycopg.Connection, fn: FunctionSpec, row: Mapping[str, Any],
                    fields: dict[str, Any], replaced: dict[str, supabase_db.Replaced] | None = None,
                    known: dict[str, supabase_db.Known] | None = None) -> tuple[Outcome, Any]:
    """-> (outcome, a ``sync_failed`` entry to record when the Tables record was parked, or the
    :class:`MergeDecision` of a merged record). ``replaced`` / ``known`` are filled for the caller to record
    (:func:`supabase_db.agree`, :func:`supabase_db.remember_tables`)."""
    spec = fn.table
    table_id = ctx.table_id(spec)
    known = {} if known is None else known
    blind = write_blind(ctx, conn, spec, table_id, {row["id"]: (row, fields)})
    if blind.stopped:
        raise blind.stopped
    if row["id"] in blind.unchanged:  # Tables' known copy is this version already (a redelivery)
        return Outcome.UNCHANGED, None
    if row["id"] in blind.written:  # one PATCH by Zapier id (see write_blind)
        if replaced is not None:
            replaced[row["id"]] = blind.written[row["id"]]
        known.update(blind.known)
        return Outcome.APPLIED, None
    # One lookup, the trash included: a record deleted in Tables is not re-created by an older version.
    found = ctx.tables.find_many(table_id, "id", [row["id"]], trash="include")
    live = [r for r in found if not r.deleted_at]
    existing = (live[0] if len(live) == 1 else _remove_duplicates(ctx, conn, spec, table_id, row["id"])) \
        if live else None
    idless = False
    if existing is None:
        existing = idless_record(ctx, table_id, row["id"])
        idless = existing is not None
    if existing is None:
        trashed = [r for r in found if r.deleted_at]
        deleted_at = later_tables_delete(conn, spec, row.get(spec.version or ""), trashed)
        if deleted_at is not None:  # deleted in Tables after this version: not re-created there
            return delete_won(conn, spec, row["id"], deleted_at), None
        created = ctx.tables.create(table_id, fields)
        if (copy := known_copy(spec, created)) is not None:
            known[row["id"]] = copy
        return Outcome.APPLIED, None
    edited_at = _tables_edited_at(existing)
    try:
        current: dict[str, Any] | None = tables_version_row(ctx, spec, existing)
    except InvalidRecord as exc:
        if _unreadable_is_older(spec, existing, edited_at, row):
            log_event(ctx.logger, logging.WARNING, "tables_record_unreadable", record_id=row["id"],
                      problems=exc.problems, resolution="overwritten with the newer Supabase version")
            ctx.tables.update(table_id, existing.id, fields)
            return Outcome.APPLIED, None
        log_event(ctx.logger, logging.ERROR, "tables_record_unreadable", record_id=row["id"],
                  problems=exc.problems, resolution="parked: not overwritten (it may be newer); sync_failed written")
        return Outcome.PARKED, audit.parked_entry(fn, row["id"], exc.problems, existing.data, row, datetime.now(UTC))
    as_read = current
    if not idless:  # (as the batch does: the record as read)
        known[row["id"]] = supabase_db.Known(existing.id, as_read, edited_at)
    current = _tables_version(ctx, conn, spec, current, edited_at, row)
    outcome = outcome_of(conflict.compare(conn, spec, row, current))
    decision = MergeDecision("none", None, None)
    if outcome is not Outcome.UNCHANGED and not idless:
        decision = decide_merges(conn, spec, [(as_read, edited_at, row)])[0]
        outcome = merged_outcome(decision, outcome)
        if decision.action in ("tables", "merged"):
            supabase_db.lock_rows(conn, spec, [row["id"]])  # before the Tables write, as the batch does
    if outcome is Outcome.UNCHANGED and idless:
        outcome = Outcome.APPLIED  # the same version: write it whole, which puts the id into the record
    if outcome is Outcome.QUEUED:
        log_event(ctx.logger, logging.INFO, "merge_deferred", record_id=row["id"], info=decision.info)
        return outcome, None
    if outcome in (Outcome.APPLIED, Outcome.MERGED):  # the row, or the merge of both (never of an id-less record)
        merge = decision if outcome is Outcome.MERGED else None
        if merge is not None:
            assert merge.row is not None
            fields = to_tables_fields(spec, merge.row)
        written = ctx.tables.update(table_id, existing.id, fields)
        if not idless and (copy := known_copy(spec, written, known.get(row["id"]))) is not None:
            known[row["id"]] = copy
        if replaced is not None:  # a person's edit this write overwrote is merged on what it replaced
            replaced[row["id"]] = supabase_db.Replaced(as_read, edited_at, _tables_edited_at(written))
        return outcome, merge
    if outcome is Outcome.SKIPPED_STALE and current is not None:
        # Tables holds a newer version than this webhook carried: make sure Supabase has it too (its own
        # Zap delivery may have been lost). Conditional, so a no-op when Supabase is already current. Sent as
        # its delivery would be (the record as read, with Zapier's edited_at): zsync.sync_apply versions a cell
        # edit as _tables_version did, and knows the updated_at Tables' copy still carries.
        push_back(ctx, conn, spec, as_read, edited_at)
    return outcome, None


def requeue_overwritten(conn: psycopg.Connection, spec: TableSpec, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """After the sync wrote ``rows`` to Tables: a row Supabase has moved on from with no change of its own
    pending was applied from Tables in the meantime - which only happens when the write's transaction was lost
    and its outcome recorded in a fresh one, without the record's lock - so our write overwrote that Tables edit
    there: Supabase's row is queued for Tables again. -> the ids queued."""
    version = spec.version or ""
    queued = []
    for row in sorted(rows, key=lambda r: r["id"]):
        later = supabase_db.later_row(conn, spec, row)
        if later is None:
            continue
        at = parse_supabase_record(spec, later).get(version)
        if supabase_db.outbox_state(conn, spec, row["id"], at) != "pending":
            supabase_db.announce(conn, spec, row["id"])
            queued.append(row["id"])
    return queued


def pull_deliveries_for(ctx: SyncContext, fn: FunctionSpec) -> None:
    """Records were left to the deliveries of recent Tables edits (``merge_deferred``): ask for the table's
    *_to_supabase inbox to be drained now rather than at its next wake-up (``SyncContext.pull_deliveries``).
    What those deliveries decide queues the records for Tables again."""
    if ctx.pull_deliveries is not None and Direction.TO_SUPABASE in fn.table.directions:
        ctx.pull_deliveries(f"{fn.table.name}_to_supabase")

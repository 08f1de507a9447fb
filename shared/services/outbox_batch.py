"""Supabase -> Zapier Tables in batches: the outbox is the *_to_tables functions' work queue.

A Database Webhook only wakes the function up. :func:`drain_outbox` claims the pending outbox entries of
its table (``zsync.claim_outbox``: ``FOR UPDATE SKIP LOCKED``, so parallel invocations never take the same
entries; a record another transaction works on is skipped with ``pg_try_advisory_xact_lock``), reads each
record's current row once (several changes of one record coalesce into its newest version), finds the
existing Tables records with one ``in`` query per 1,000 ids, compares versions
(:func:`shared.services.conflict.compare_many`: by time here, ties in one ``zsync.version_cmp_many`` call), writes
with batch create/update (<= 100 records per request) under one shared time budget for 429 / Retry-After
(:func:`shared.adapters.zapier_retry.shared_budget`), then records every outcome (one audit insert, one ack per
batch) in the same transaction. Records whose write did not fit in the
budget are not acknowledged: they stay pending (claimed again, or re-sent by the sweeper), never lost and
never written twice.

Per record the outcome and audit entry are the single path's (:func:`shared.services.to_tables.apply_from_supabase`):
the same conflict rule, ``edited_at`` versioning, duplicate removal, parking of unreadable Tables records,
pushing a newer Tables version back, deletes (handed to the single path), exactly-once recording, and
``changed_at`` from the outbox capture time. A single pending change costs what the single path costs
(one find, one write): no added latency when idle.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from shared.adapters import supabase_db
from shared.core import audit
from shared.core.mapping import InvalidRecord, parse_supabase_record, to_tables_fields
from shared.core.outcome import Outcome, outcome_of
from shared.core.spec import Direction, FunctionSpec
from shared.platform.logs import log_event
from shared.platform.settings import TablesWriter
from shared.services import conflict
from shared.services.deletes import _delete_from_supabase, delete_won, later_tables_delete
from shared.services.sync import (
    SupabaseWebhook,
    SyncContext,
    SyncResult,
    _lag_ms,
    _remove_duplicates,
    _tables_edited_at,
    _unreadable_is_older,
    idless_record,
    push_back,
    tables_version_row,
)
from shared.services.to_tables import (
    MergeDecision,
    _tables_version,
    apply_from_supabase,
    apply_merged,
    decide_merges,
    known_copy,
    merged_outcome,
    pull_deliveries_for,
    requeue_overwritten,
    write_blind,
)

if TYPE_CHECKING:
    from shared.adapters.zapier_tables import Record

T = TypeVar("T")
LOCKED_RETRIES = 20  # rounds to wait (50 ms each) for records another invocation holds before leaving them
LOCKED_WAIT_S = 0.05


@dataclass
class _Item:
    id: str
    row: dict[str, Any]
    fields: dict[str, Any]
    captured: datetime | None


@dataclass
class _Plan:
    """What one batch decided; recorded (audit, acks) exactly once."""

    items: dict[str, _Item] = field(default_factory=dict)
    outcomes: dict[str, tuple[Outcome, dict[str, Any] | None]] = field(default_factory=dict)  # id -> (outcome, parked)
    merges: dict[str, MergeDecision] = field(default_factory=dict)  # id -> the merged record written to Tables
    replaced: dict[str, supabase_db.Replaced] = field(default_factory=dict)  # id -> what our write replaces
    known: dict[str, supabase_db.Known] = field(default_factory=dict)  # id -> the Tables copy as read / written
    failed: list[tuple[str, dict[str, Any], list[dict[str, str]], int]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # row deleted without a tombstone: nothing to send
    deletes: list[str] = field(default_factory=list)  # deleted (tombstone): the single delete path
    locked: int = 0  # claimed records another transaction was working on
    claimed: int = 0
    stopped: str | None = None  # why writes stopped early (budget): the rest stays pending
    requests: int = 0
    more: bool = True  # after recording: the table still has entries a claim could take now
    hook: bool = False  # written with the catch-hook writer (unconfirmed): no base recorded


@dataclass
class DrainResult:
    # per record, its first delivery in this drain (a later round may find the version it pushed back)
    results: dict[str, SyncResult] = field(default_factory=dict)
    batches: int = 0
    pending_left: bool = False  # stopped early (Tables budget / locked records): entries stay pending
    stopped: str | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results.values() if r.outcome is outcome)


def _webhook_body(spec_name: str, raw: dict[str, Any]) -> bytes:
    return json.dumps({"type": "UPDATE", "table": spec_name, "schema": "public", "record": raw,
                       "old_record": None}, sort_keys=True, default=str).encode()


def _plan_items(fn: FunctionSpec, owned: list[tuple[str, datetime | None, dict | None, datetime | None]],
                plan: _Plan) -> None:
    """``owned``: (record id, capture time, current row | None, tombstone | None) of the records locked here."""
    spec = fn.table
    for rid, captured, raw, tomb in owned:
        if raw is None:
            if spec.sync_deletes and tomb is not None:
                plan.deletes.append(rid)
            else:
                plan.gone.append(rid)
            continue
        try:
            row = parse_supabase_record(spec, raw)
            fields = to_tables_fields(spec, row)
        except InvalidRecord as exc:
            plan.failed.append((rid, raw, exc.problems, 400))
            continue
        plan.items[rid] = _Item(rid, row, fields, captured)


def _patient(call: Callable[[], T], deadline: float) -> T:
    """Run a Tables call; a 429/5xx whose Retry-After still fits in the batch's shared budget is waited out
    and the call made again (the client's own attempts per call are few)."""
    from shared.adapters.zapier_errors import TablesUnavailable

    while True:
        try:
            return call()
        except TablesUnavailable as exc:
            wait = exc.retry_after
            if wait is None or time.monotonic() + wait + 0.05 >= deadline:
                raise
            time.sleep(wait)


def _write(ctx: SyncContext, conn: psycopg.Connection, fn: FunctionSpec, plan: _Plan, deadline: float) -> None:
    """Decide and write every planned record (Tables calls inside the caller's shared budget)."""
    from shared.adapters.zapier_errors import TablesRejected, TablesUnavailable
    from shared.adapters.zapier_tables import BATCH_MAX, chunks

    spec = fn.table
    items = list(plan.items.values())
    if not items:
        return
    if ctx.settings.tables_writer is TablesWriter.CATCH_HOOK:
        plan.hook = True
        for item in items:
            try:
                ctx.hooks.send(spec.name, item.fields)
            except TablesUnavailable as exc:
                plan.stopped = str(exc)[:300]
                return
            plan.outcomes[item.id] = (Outcome.APPLIED, None)
        return
    table_id = ctx.table_id(spec)
    # Records whose Tables copy is known: one PATCH by Zapier id per 100, no find (write_blind)
    blind = write_blind(ctx, conn, spec, table_id, {i.id: (i.row, i.fields) for i in items},
                        lambda call: _patient(call, deadline))
    for rid, rep in blind.written.items():
        plan.outcomes[rid], plan.replaced[rid] = (Outcome.APPLIED, None), rep
    plan.outcomes.update({rid: (Outcome.UNCHANGED, None) for rid in blind.unchanged})
    plan.known.update(blind.known)
    items = [plan.items[rid] for rid in blind.fallback]
    if blind.stopped or not items:
        plan.stopped = str(blind.stopped)[:300] if blind.stopped else None
        return
    try:
        # The trash too (same one request): a record deleted in Tables is not re-created by an older version.
        found = _patient(lambda: ctx.tables.find_many(table_id, "id", [i.id for i in items], trash="include"),
                         deadline)
    except TablesUnavailable as exc:
        plan.stopped = str(exc)[:300]
        return
    by_id: dict[str, list[Record]] = {}
    in_trash: dict[str, list[Record]] = {}
    for rec in found:
        (in_trash if rec.deleted_at else by_id).setdefault(str(rec.data.get("id")), []).append(rec)

    creates: list[_Item] = []
    updates: list[tuple[_Item, str]] = []
    pairs: list[tuple[_Item, dict[str, Any]]] = []
    as_read: dict[str, tuple[dict[str, Any], datetime | None]] = {}  # Tables' record before _tables_version
    idless: set[str] = set()
    for item in items:
        recs = by_id.get(item.id, [])
        if not recs:
            deleted_at = later_tables_delete(conn, spec, item.row.get(spec.version or ""), in_trash.get(item.id, []))
            if deleted_at is not None:  # deleted in Tables after this version: the delete wins
                plan.outcomes[item.id] = (delete_won(conn, spec, item.id, deleted_at), None)
                continue
            try:
                found_idless = _patient(lambda item=item: idless_record(ctx, table_id, item.id), deadline)
            except TablesUnavailable as exc:
                plan.stopped = str(exc)[:300]
                return
            if found_idless is None:
                creates.append(item)
                continue
            recs = by_id[item.id] = [found_idless]
            idless.add(item.id)
        existing = recs[0] if len(recs) == 1 else _remove_duplicates(ctx, conn, spec, table_id, item.id)
        edited_at = _tables_edited_at(existing)
        try:
            current = tables_version_row(ctx, spec, existing)
        except InvalidRecord as exc:
            if _unreadable_is_older(spec, existing, edited_at, item.row):
                log_event(ctx.logger, logging.WARNING, "tables_record_unreadable", record_id=item.id,
                          problems=exc.problems, resolution="overwritten with the newer Supabase version")
                updates.append((item, existing.id))
            else:
                log_event(ctx.logger, logging.ERROR, "tables_record_unreadable", record_id=item.id,
                          problems=exc.problems,
                          resolution="parked: not overwritten (it may be newer); sync_failed written")
                plan.outcomes[item.id] = (Outcome.PARKED, audit.parked_entry(
                    fn, item.id, exc.problems, existing.data, item.row, datetime.now(UTC)))
            continue
        as_read[item.id] = (current, edited_at)
        if item.id not in idless:
            plan.known[item.id] = supabase_db.Known(existing.id, current, edited_at)
        current = _tables_version(ctx, conn, spec, current, edited_at, item.row)
        pairs.append((item, current))
        by_id[item.id] = [existing]  # the one kept (duplicates removed)
    outcomes = [outcome_of(cmp) for cmp in
                 conflict.compare_many(conn, spec, [(item.row, current) for item, current in pairs])]
    # The field-level merge, where both versions differ (one call; "none" without a base: the rule above)
    asked = [i for i, ((item, _), o) in enumerate(zip(pairs, outcomes, strict=True))
             if o is not Outcome.UNCHANGED and item.id not in idless]
    decisions = dict(zip(asked, decide_merges(conn, spec, [(*as_read[pairs[i][0].id], pairs[i][0].row)
                                                           for i in asked]), strict=True))
    for i, decision in decisions.items():
        outcomes[i] = merged_outcome(decision, outcomes[i])
    stale = [item.id for (item, _), o in zip(pairs, outcomes, strict=True)
             if o in (Outcome.SKIPPED_STALE, Outcome.MERGED)]
    if len(stale) > 1:  # the pushes below lock these rows: take them in id order first, as every writer does
        supabase_db.lock_rows(conn, spec, stale)
    for i, ((item, _current), outcome) in enumerate(zip(pairs, outcomes, strict=True)):
        decision = decisions.get(i, MergeDecision("none", None, None))
        if outcome in (Outcome.APPLIED, Outcome.MERGED):
            plan.replaced[item.id] = supabase_db.Replaced(*as_read[item.id])  # what the write below replaces
        if outcome is Outcome.UNCHANGED and item.id in idless:
            outcome = Outcome.APPLIED  # the same version: write it whole, which puts the id into the record
        if outcome is Outcome.MERGED and decision.row is not None:  # fields from both: M goes to both sides
            plan.merges[item.id] = decision
            updates.append((_Item(item.id, decision.row, to_tables_fields(spec, decision.row), item.captured),
                            by_id[item.id][0].id))
            continue
        if outcome is Outcome.APPLIED:
            updates.append((item, by_id[item.id][0].id))
            continue
        if outcome is Outcome.SKIPPED_STALE:
            # Tables holds a newer version: make sure Supabase has it too (same as the single path).
            push_back(ctx, conn, spec, *as_read[item.id])  # as its delivery would be (see to_tables)
        if outcome is Outcome.QUEUED:  # left to a recent Tables edit's deliveries (see merged_outcome)
            log_event(ctx.logger, logging.INFO, "merge_deferred", record_id=item.id, info=decision.info)
        plan.outcomes[item.id] = (outcome, None)

    def send(chunk: list[Any], create: bool) -> None:
        if create:
            made = _patient(lambda: ctx.tables.create_many(table_id, [i.fields for i in chunk]), deadline)
            plan.known.update({i.id: c for i, r in zip(chunk, made or [], strict=False) if (c := known_copy(spec, r))})
        else:
            written = _patient(lambda: ctx.tables.update_many(table_id, [(rid, i.fields) for i, rid in chunk]),
                               deadline)
            by_rid = {rec.id: rec for rec in written or []}
            for item, rid in chunk:
                if rid in by_rid and item.id in plan.replaced:  # (an id-less record's write replaced nothing kept)
                    plan.replaced[item.id] = plan.replaced[item.id]._replace(written_at=_tables_edited_at(by_rid[rid]))
                if rid in by_rid and item.id not in idless and (copy := known_copy(
                        spec, by_rid[rid], plan.known.get(item.id))):
                    plan.known[item.id] = copy

    for create, work in ((True, creates), (False, updates)):
        for chunk in chunks(work, BATCH_MAX):
            if plan.stopped:
                return
            try:
                send(chunk, create)
            except TablesUnavailable as exc:  # the shared budget ran out: the rest stays pending
                plan.stopped = str(exc)[:300]
                return
            except TablesRejected:
                # Zapier refused a value in this batch (the whole batch is refused): find which, one by one.
                for one in chunk:
                    rid = one.id if create else one[0].id
                    try:
                        send([one], create)
                    except TablesRejected as exc:
                        item = one if create else one[0]
                        problems = [{"field": "dependency", "problem": f"{type(exc).__name__}: {str(exc)[:200]}"}]
                        plan.failed.append((rid, item.row, problems, 503))
                        continue
                    except TablesUnavailable as exc:
                        plan.stopped = str(exc)[:300]
                        return
                    plan.outcomes[rid] = (Outcome.MERGED if rid in plan.merges else Outcome.APPLIED, None)
                continue
            for one in chunk:
                rid = (one if create else one[0]).id
                plan.outcomes[rid] = (Outcome.MERGED if rid in plan.merges else Outcome.APPLIED, None)


def _record(conn: psycopg.Connection, fn: FunctionSpec, plan: _Plan, origin: str, exclude: list[str],
            recovered: bool = False) -> None:
    """Audit entries and acks of one batch in one call (plus failure counts); sets ``plan.more``: whether a
    claim could take anything now besides ``exclude`` and what this batch hands on (failed, parked, deletes).
    ``recovered`` (the drain's transaction was lost): the locks taken again, :func:`requeue_overwritten`."""
    spec = fn.table
    if recovered:
        for rid in sorted(plan.outcomes):
            supabase_db.lock_record(conn, spec, rid)
    now = datetime.now(UTC)
    entries: list[dict[str, Any]] = []
    acks: list[tuple[str, datetime | None, str]] = [(rid, None, "row_deleted") for rid in plan.gone]
    bases: list[dict[str, Any]] = []  # rows Tables now holds as Supabase does
    for rid, (outcome, parked) in plan.outcomes.items():
        item = plan.items[rid]
        merged = plan.merges.get(rid) if outcome is Outcome.MERGED else None
        if outcome in (Outcome.APPLIED, Outcome.SKIPPED_STALE, Outcome.MERGED):
            entries.append(audit.sync_entry(fn, merged.row if merged and merged.row else item.row, outcome, now,
                                            changed_at=item.captured, changed_at_source="outbox", origin=origin,
                                            merge=merged.info if merged else None))
        if merged is not None:
            apply_merged(conn, spec, merged, plan.replaced.get(rid))
        elif outcome in (Outcome.APPLIED, Outcome.UNCHANGED) and not plan.hook:
            bases.append(item.row)
        if parked is not None:
            entries.append(parked)
        if outcome is not Outcome.QUEUED and not (recovered and outcome is Outcome.SKIPPED_STALE):
            # (queued: pending for the sweeper; skipped_stale recovered: its push-back was in the lost transaction)
            acks.append((rid, item.row.get(spec.version or ""), outcome.value))
    for rid, row, problems, status in plan.failed:
        entries.append(audit.failed_entry(fn, _webhook_body(spec.name, row), problems, now, rid, status))
    # a deferred record's Tables edit is not taken in yet: its copy is no base for a blind write (found again)
    queued = {rid for rid, (o, _) in plan.outcomes.items() if o is Outcome.QUEUED}
    handed_on = [rid for rid, _, _, _ in plan.failed] + plan.deletes + [
        rid for rid, (outcome, _) in plan.outcomes.items() if outcome is Outcome.PARKED] + sorted(queued)
    supabase_db.agree(conn, spec, bases, {rid: plan.replaced[rid] for rid in
                                          (r["id"] for r in bases) if rid in plan.replaced})
    supabase_db.remember_tables(conn, spec, {rid: k for rid, k in plan.known.items() if rid not in queued})
    supabase_db.forget_tables(conn, spec, sorted(queued))
    if recovered:
        # their answers may be older than Tables is now (a delivery applied meanwhile): next write finds first
        supabase_db.forget_tables(conn, spec, sorted(set(plan.outcomes) - queued))
        requeue_overwritten(conn, spec, [plan.items[rid].row for rid, (o, _) in plan.outcomes.items()
                                         if o in (Outcome.APPLIED, Outcome.MERGED)])
    plan.more = supabase_db.record_outbox_batch(conn, spec, entries, acks, exclude + handed_on)
    for rid, _, problems, _ in plan.failed:  # counted on the record's entries, parked after a few
        reason = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)[:2000]
        if supabase_db.outbox_failed(conn, spec, rid, reason):
            log_event(logging.getLogger("zsync"), logging.ERROR, "outbox_parked", table=spec.name, id=rid,
                      reason=reason)


def _drain_once(ctx: SyncContext, fn: FunctionSpec, limit: int, exclude: list[str], origin: str,
                budget_s: float) -> _Plan:
    from shared.adapters.zapier_retry import shared_budget

    spec = fn.table
    done: list[_Plan] = []

    def attempt(conn: psycopg.Connection) -> _Plan:
        if done:  # the writes are made: record them, never write again - a recovery (the locks went with it)
            _record(conn, fn, done[0], origin, exclude, recovered=True)
            return done[0]
        plan = _Plan()
        claimed = supabase_db.claim_outbox_rows(conn, spec, limit, exclude)  # + locks + rows, one call
        plan.claimed = len(claimed)
        owned = []
        for rid, _, captured, locked, raw, tomb in claimed:
            if locked:
                owned.append((rid, captured, raw, tomb))
            else:
                plan.locked += 1
        _plan_items(fn, owned, plan)
        with shared_budget(budget_s):
            _write(ctx, conn, fn, plan, time.monotonic() + budget_s)
        done.append(plan)
        _record(conn, fn, plan, origin, exclude)
        return plan

    try:
        return ctx.db.run(attempt)
    except (supabase_db.DatabaseUnavailable, psycopg.Error):
        if not done:
            raise
        ctx.db.run(lambda conn: _record(conn, fn, done[0], origin, exclude, recovered=True))
        return done[0]


def _deliver_delete(ctx: SyncContext, fn: FunctionSpec, rid: str) -> SyncResult:
    """A delete handed to the single delete path. Zapier refusing it (a 4xx, or ``meta.errors`` in a 200) is
    counted on the record's outbox entries (parked after a few, as a refused write) and answered ``failed``;
    Tables unreachable leaves it pending. Never acknowledged as applied."""
    from shared.adapters.zapier_errors import TablesError, TablesRejected

    try:
        return _delete_from_supabase(ctx, fn, rid)
    except TablesError as exc:
        reason = f"dependency: {type(exc).__name__}: {str(exc)[:200]}"
        if isinstance(exc, TablesRejected):  # audited and counted as the one-record path does (a 502)
            body = json.dumps({"type": "DELETE", "table": fn.table.name, "schema": "public", "record": None,
                               "old_record": {"id": rid}}, sort_keys=True).encode()
            problems = [{"field": "dependency", "problem": f"{type(exc).__name__}: {str(exc)[:200]}"}]
            entry = audit.failed_entry(fn, body, problems, datetime.now(UTC), rid, 502)

            def work(conn: psycopg.Connection) -> None:
                supabase_db.append_audit(conn, entry)
                supabase_db.outbox_failed(conn, fn.table, rid, reason)

            ctx.db.run(work)
        log_event(ctx.logger, logging.ERROR, "delete_failed", table=fn.table.name, record_id=rid, reason=reason)
        return SyncResult(outcome=Outcome.FAILED, function=fn.name, table=fn.table.name, id=rid, detail=reason)


def drain_outbox(ctx: SyncContext, fn: FunctionSpec, *, origin: str = "live", limit: int | None = None,
                 budget_s: float | None = None) -> DrainResult:
    """Deliver the pending outbox changes of ``fn``'s table to Tables in batches until none is left that
    this invocation can take, or the time budget (``outbox_drain_budget_s``, at most ``retry_budget_s``, by
    default) is spent."""
    if fn.direction is not Direction.TO_TABLES:
        raise ValueError(f"{fn.name} does not sync to Zapier Tables")
    limit = limit or ctx.settings.outbox_claim_limit
    budget = min(ctx.settings.retry_budget_s, ctx.settings.outbox_drain_budget_s) if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    result = DrainResult()
    handled: list[str] = []  # failed, parked or handed on: not claimed again in this invocation
    idle_rounds = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result.pending_left = True
            break
        plan = _drain_once(ctx, fn, limit, handled, origin, remaining)
        result.batches += 1
        now = datetime.now(UTC)
        for rid, (outcome, _) in plan.outcomes.items():
            item = plan.items[rid]
            result.results.setdefault(rid, SyncResult(outcome=outcome, function=fn.name, table=fn.table.name,
                                                      id=rid, lag_ms=_lag_ms(item.captured, now)))
        for rid, _, problems, status in plan.failed:
            result.results[rid] = SyncResult(outcome=Outcome.REJECTED if status < 500 else Outcome.FAILED,
                                             function=fn.name, table=fn.table.name, id=rid,
                                             detail="; ".join(p["problem"] for p in problems)[:300])
            handled.append(rid)
        for rid in plan.gone:
            result.results[rid] = SyncResult(outcome=Outcome.IGNORED, function=fn.name, table=fn.table.name, id=rid,
                                             detail="row deleted without a tombstone: nothing to send")
        for rid in plan.deletes:
            result.results[rid] = _deliver_delete(ctx, fn, rid)
            handled.append(rid)
        handled += [rid for rid, (outcome, _) in plan.outcomes.items() if outcome in (Outcome.PARKED, Outcome.QUEUED)]
        if plan.stopped:
            result.pending_left, result.stopped = True, plan.stopped
            log_event(ctx.logger, logging.WARNING, "outbox_batch_stopped", table=fn.table.name, reason=plan.stopped,
                      delivered=len(plan.outcomes))
            break
        if plan.claimed == 0 or not plan.more:  # nothing left a claim could take: no second round trip
            break
        progressed = plan.outcomes or plan.failed or plan.gone or plan.deletes
        if not progressed:  # every claimed record was held by another invocation: wait for it a little
            idle_rounds += 1
            if idle_rounds > LOCKED_RETRIES:
                result.pending_left = True
                break
            time.sleep(LOCKED_WAIT_S)
        else:
            idle_rounds = 0
    if any(r.outcome is Outcome.QUEUED for r in result.results.values()):
        pull_deliveries_for(ctx, fn)
    return result


def deliver(ctx: SyncContext, fn: FunctionSpec, hook: SupabaseWebhook, *, origin: str = "live") -> SyncResult:
    """A Database Webhook to a *_to_tables function with batches on: drain the table's outbox, and answer
    for the webhook's own record: its outcome when this drain delivered it; ``queued`` when another invocation
    holds it or the drain's budget ran out before it (it stays pending in the outbox: no dead letter);
    ``unchanged`` when it was delivered already (no Tables call). A record not in the outbox at all (a
    hand-sent payload) takes the single path, as do deletes and the catch-hook writer."""
    spec = fn.table
    if hook.type == "DELETE" or hook.table != spec.name or hook.schema_ != "public" or hook.record is None \
            or ctx.settings.tables_writer is TablesWriter.CATCH_HOOK:  # a catch hook takes one record per POST
        return apply_from_supabase(ctx, fn, hook, origin=origin)
    row = parse_supabase_record(spec, hook.record)  # a bad payload is a 400, as on the single path
    drained = drain_outbox(ctx, fn, origin=origin)
    mine = drained.results.get(row["id"])
    if mine is not None:
        return mine
    state = ctx.db.run(lambda conn: supabase_db.outbox_state(conn, spec, row["id"], row.get(spec.version or "")))
    if state == "pending":  # another invocation holds it, or the budget ran out: the outbox keeps it
        detail = (f"left pending in the outbox (Tables: {drained.stopped[:200]}); the next wake-up or the sweeper "
                  "delivers it" if drained.stopped else "being delivered by another invocation")
        return SyncResult(outcome=Outcome.QUEUED, function=fn.name, table=spec.name, id=row["id"], detail=detail)
    if state == "delivered":
        return SyncResult(outcome=Outcome.UNCHANGED, function=fn.name, table=spec.name, id=row["id"],
                          detail="delivered in a batch")
    return apply_from_supabase(ctx, fn, hook, origin=origin)


# --- the Database Webhook's wake-up: no secret, no data, rate-limited per instance -------------------------------


@dataclass
class _Gate:
    """One per function and process: whether a wake-up drain runs, whether another wake-up arrived meanwhile,
    and when the last drain round started."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    running: bool = False
    again: bool = False
    last_start: float = float("-inf")


_gates: dict[str, _Gate] = {}
_gates_lock = threading.Lock()


def _gate(name: str) -> _Gate:
    with _gates_lock:
        return _gates.setdefault(name, _Gate())


@dataclass
class WakeReport:
    """What a wake-up did, in counts only: the caller is not authenticated, so no id and no data."""

    coalesced: bool = False  # another wake-up's drain was running: it drains once more for this one
    rounds: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    pending_left: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"coalesced": self.coalesced, "rounds": self.rounds, "counts": dict(sorted(self.counts.items())),
                "pending_left": self.pending_left}


def wake(ctx: SyncContext, fn: FunctionSpec) -> WakeReport:
    """An unauthenticated wake-up (``?zsync_wake=outbox``): drain ``fn``'s own outbox and nothing else.

    Nothing of the request is read, so a caller can only make the function deliver what Supabase already
    queued, with the function's own credentials. Rate limit, per instance and function: one drain at a time
    (a wake-up that arrives while one runs is answered at once and makes the running one drain again when it
    finishes, so no change committed before any wake-up waits for the sweeper), and drain rounds start at least
    ``outbox_wake_min_interval_s`` apart (a flood costs at most 1 / that claim queries a second). The whole call
    stays inside ``outbox_drain_budget_s`` (under pg_net's webhook timeout); what it leaves is pending for the
    next wake-up or the sweeper."""
    if fn.direction is not Direction.TO_TABLES:
        raise ValueError(f"{fn.name} does not sync to Zapier Tables")
    settings = ctx.settings
    gate = _gate(fn.name)
    report = WakeReport()
    with gate.lock:
        if gate.running:
            gate.again = True
            report.coalesced = True
            return report
        gate.running = True
    deadline = time.monotonic() + settings.outbox_drain_budget_s
    try:
        while True:
            wait = gate.last_start + settings.outbox_wake_min_interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            gate.last_start = time.monotonic()
            remaining = deadline - gate.last_start
            drained = drain_outbox(ctx, fn, budget_s=max(remaining, 0.1))
            report.rounds += 1
            for result in drained.results.values():
                report.counts[result.outcome.value] = report.counts.get(result.outcome.value, 0) + 1
            report.pending_left = drained.pending_left
            with gate.lock:
                if not gate.again or time.monotonic() >= deadline:
                    report.pending_left = report.pending_left or gate.again
                    gate.running = gate.again = False
                    return report
                gate.again = False
    except BaseException:
        with gate.lock:
            gate.running = False
        raise

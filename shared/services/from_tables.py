"""Zapier Tables -> Supabase (Zaps 3A, 3C, 3E, 3F): a record a Zap or a trigger inbox delivered, one at a time
(:func:`apply_from_tables`) or many of one table at once (:func:`apply_many_from_tables`: inbox leases, replay
rounds, reconcile), applied under the version rule in one transaction with its audit entries; a record the
database refuses is isolated and parked (:func:`shared.services.sync.isolate`), never holding back the others.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from shared.adapters import lease_ledger, supabase_db
from shared.core import audit
from shared.core.mapping import (
    InvalidRecord,
    check_version_skew,
    parse_supabase_record,
    parse_tables_record,
    time_ahead,
)
from shared.core.outcome import Outcome
from shared.core.spec import Direction, FunctionSpec, TableSpec
from shared.services.sync import (
    EDITED_AT,
    RECORD_ERRORS,
    SyncContext,
    SyncResult,
    _body,
    _edited_at,
    _lag_ms,
    change_time,
    db_problems,
    isolate,
    unwrap_tables_payload,
)

if TYPE_CHECKING:  # imported where used: a *_to_supabase function never loads the Tables client (cold start)
    pass

# Outcomes audited as a change: applied (the later version), merged (fields from both sides: the merged record,
# which Supabase now holds and its outbox sends to Tables), skipped_stale.
AUDITED = (Outcome.APPLIED, Outcome.MERGED, Outcome.SKIPPED_STALE)


def _parse_delivery(ctx: SyncContext, spec: TableSpec, record: Mapping[str, Any], arrived: datetime,
                    now: datetime) -> tuple[dict[str, Any], datetime | None]:
    """A delivered Tables record -> (row, Zapier's ``edited_at``), refused (InvalidRecord) when either time is
    further ahead of ``now`` than ``max_future_skew_s``: ``edited_at`` can become the version (a cell edit)."""
    row = parse_tables_record(spec, record, received_at=version_time(record, arrived))
    check_version_skew(spec, row, now, ctx.settings.max_future_skew_s)
    edited_at = _edited_at(record.get(EDITED_AT)) if spec.version else None
    if problems := time_ahead(EDITED_AT, edited_at, now, ctx.settings.max_future_skew_s):
        raise InvalidRecord(problems)
    return row, edited_at


def version_time(record: Any, received_at: datetime) -> datetime:
    """The time a Tables record without ``updated_at`` is versioned at: Zapier's ``edited_at`` (the time of
    its last change, the same for every redelivery of that change) when readable, else its arrival. Zapier
    stores only the fields a writer sends, so a record created without ``updated_at`` has none. (Not an
    object: the arrival; the parser then rejects it.)"""
    if not isinstance(record, Mapping):
        return received_at
    return _edited_at(record.get(EDITED_AT)) or received_at


# The lease name a direct delivery (a trigger's POST, not an inbox drain) checks zsync.leased_before under: it holds
# no lease of its own, so every earlier edit an inbox drain holds counts.
DIRECT_DELIVERY = "direct-delivery"


def apply_from_tables(ctx: SyncContext, fn: FunctionSpec, record: Mapping[str, Any],
                      received_at: datetime | None = None, *, changed_at: datetime | None = None,
                      changed_at_source: str = "received", origin: str = "live") -> SyncResult:
    """Parse a Tables record and apply it to Supabase under the conflict rule. Raises InvalidRecord.

    A delivery may carry Zapier's ``edited_at`` next to the fields: an edit that did not advance
    ``updated_at`` (a person editing a cell) is then versioned at that time (see zsync.sync_apply).
    ``changed_at``: when the change happened (:func:`change_time`); defaults to the arrival time."""
    spec = fn.table
    now = received_at or datetime.now(UTC)
    changed = changed_at or now
    row, edited_at = _parse_delivery(ctx, spec, record, now, datetime.now(UTC))

    # a live delivery asks the lease ledger, as an inbox drain's deliveries do (replays and append-only tables do not)
    direct = lease_ledger.Lease(DIRECT_DELIVERY, (lease_ledger.Leased("", row["id"], edited_at),)) \
        if origin == "live" and edited_at is not None and not spec.append_only else None

    def work(conn: psycopg.Connection) -> Outcome:
        if spec.append_only:
            return Outcome.APPLIED if supabase_db.append_audit(conn, row) else Outcome.UNCHANGED
        if direct is not None and (held := lease_ledger.waiting(conn, spec, direct, take=False)):
            # an inbox drain holds an earlier edit of this record: applied first, this record would carry that
            # edit's fields at its own, later time (as a drain's later delivery waits, see lease_ledger)
            raise lease_ledger.HeldBack(held)
        supabase_db.settle_blind(conn, spec, [(row, edited_at)])
        supabase_db.base_for_raced_edits(conn, spec, [(row, edited_at)])
        outcome, stored, applied, merge = supabase_db.sync_apply(conn, spec, row, edited_at)
        result = Outcome(outcome)
        remember_delivered(conn, spec, [(row, edited_at)])
        version = parse_supabase_record(spec, applied) if applied else row
        if result in AUDITED:
            supabase_db.append_audit(conn, audit.sync_entry(fn, version, result, datetime.now(UTC), stored,
                                                            changed_at=changed, changed_at_source=changed_at_source,
                                                            origin=origin, merge=merge))
        if result is Outcome.SKIPPED_STALE and Direction.TO_TABLES in spec.directions:
            # Tables sent an older version than Supabase holds: push Supabase's back so Tables converges
            # even if the webhook for the newer version was lost.
            supabase_db.announce(conn, spec, row["id"])
        if result is Outcome.DELETED and Direction.TO_TABLES in spec.directions:
            # A copy of a record deleted in Supabase is still in Tables: send the delete again.
            supabase_db.announce(conn, spec, row["id"], "DELETE")
        return result

    try:
        try:
            outcome = ctx.db.run(work)
        except lease_ledger.HeldBack:
            # a live drain applies its edit in a moment (as a drain's waiting delivery, inbox_consumer): wait for
            # it, then once more; still held (a dead drain's lease), HeldBack goes to the caller: 503, retried
            assert direct is not None  # (only it raises HeldBack here)
            until = time.monotonic() + lease_ledger.HOLD_WAIT_S
            while time.monotonic() < until and lease_ledger.still_waiting(ctx.db, spec, direct):
                time.sleep(lease_ledger.HOLD_POLL_S)
            outcome = ctx.db.run(work)
    except RECORD_ERRORS as exc:  # a value the database refuses that the parser let through: this record's fault
        raise InvalidRecord(db_problems(exc, row)) from None
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=row["id"],
                      lag_ms=_lag_ms(changed, datetime.now(UTC)))


@dataclass
class _Delivery:
    """One parsed delivery of a batch (:func:`apply_many_from_tables`)."""

    index: int
    payload: Any
    row: dict[str, Any]
    edited_at: datetime | None
    changed: datetime
    source: str


def apply_many_from_tables(ctx: SyncContext, fn: FunctionSpec, records: Sequence[Mapping[str, Any]], *,
                           received_at: datetime | Sequence[datetime | None] | None = None, origin: str = "live",
                           changed_at: Sequence[tuple[datetime, str] | None] | None = None,
                           lease: lease_ledger.Lease | None = None) -> list[SyncResult]:
    """:func:`apply_from_tables` for many deliveries of one table in one transaction: one multi-row
    conditional upsert (zsync.sync_apply_many), one audit insert, one push-back statement per batch.

    ``records``: the deliveries as a Zap sends them (flat, or ``{"record": ..., "edited_at": ...}``).
    ``received_at``: one arrival time for all, or one per delivery. ``changed_at``: per delivery
    ``(time, source)`` (default :func:`change_time` of the delivery). -> one result per delivery, in order,
    with the outcome, audit entry and side effects the one-record path gives it (several deliveries of one
    record: one call each, newest first, see :func:`newest_first_rounds`).

    One bad record never holds back or discards another: an invalid delivery (the parser mirrors every CHECK;
    a version too far ahead of the clock) gets a ``rejected`` result (its problems) and a ``sync_failed`` entry
    holding the delivery itself; a value the database still refuses is found by splitting the batch in
    savepoints (:func:`isolate`) and rejected the same way; the others are applied.

    ``lease``: the trigger inbox lease the deliveries came in (their messages, records and edit times): when
    another lease holds an earlier edit of one of their records, nothing is applied and
    :class:`lease_ledger.HeldBack` names those records (:mod:`shared.adapters.lease_ledger`)."""
    spec = fn.table
    now = datetime.now(UTC)
    arrivals = list(received_at) if isinstance(received_at, Sequence) else [received_at] * len(records)
    if len(arrivals) != len(records) or (changed_at is not None and len(changed_at) != len(records)):
        raise ValueError("received_at / changed_at must give one value per record")
    results: list[SyncResult | None] = [None] * len(records)
    parsed: list[_Delivery] = []
    failed: list[dict[str, Any]] = []

    rejected: list[str] = []  # record ids whose Tables copy holds a refused value

    def refuse(i: int, payload: Any, record: Any, problems: list[dict[str, str]]) -> dict[str, Any]:
        record_id = _payload_id(record)
        if record_id is not None:
            rejected.append(record_id)
        results[i] = SyncResult(outcome=Outcome.REJECTED, function=fn.name, table=spec.name, id=record_id,
                                detail="; ".join(f"{p['field']}: {p['problem']}" for p in problems)[:500],
                                problems=problems)
        return audit.failed_entry(fn, _body(payload), problems, now, record_id, 400, keep_body=True)

    for i, payload in enumerate(records):
        arrived = arrivals[i] or now
        changed, source = (changed_at[i] if changed_at is not None and changed_at[i] is not None
                           else change_time(payload, arrived))
        record = unwrap_tables_payload(payload)
        try:
            if not isinstance(record, Mapping):
                raise InvalidRecord([{"field": "record", "problem": "expected a JSON object"}])
            row, edited_at = _parse_delivery(ctx, spec, record, arrived, now)
        except InvalidRecord as exc:
            failed.append(refuse(i, payload, record, exc.problems))
            continue
        parsed.append(_Delivery(i, payload, row, edited_at, changed, source))

    def apply(conn: psycopg.Connection, items: list[_Delivery]) -> list[Any]:
        if spec.append_only:
            return supabase_db.append_audit_each(conn, [d.row for d in items])
        found: list[Any] = [None] * len(items)
        for batch in newest_first_rounds(items, spec.version or "updated_at"):
            round_items = [(items[i].row, items[i].edited_at) for i in batch]
            # after the round before it: Supabase may hold a delivery of this batch that one of this round was
            # made on (taken before the first round, it was not stale yet, and was merged against the newer
            # one's record: its older values won - the suite's soak lost a field so)
            supabase_db.base_for_raced_edits(conn, spec, round_items)
            for i, one in zip(batch, supabase_db.sync_apply_many(conn, spec, round_items), strict=True):
                found[i] = one
        return found

    def work(conn: psycopg.Connection) -> dict[int, Outcome]:
        entries: list[dict[str, Any]] = list(failed)
        if lease is not None and not spec.append_only and (held := lease_ledger.waiting(conn, spec, lease, take=True)):
            raise lease_ledger.HeldBack(held)
        if not spec.append_only:  # the echo of a lost blind write, first (an edit it overwrote may follow)
            supabase_db.settle_blind(conn, spec, [(d.row, d.edited_at) for d in parsed])
        done, refused = isolate(conn, parsed, apply, lambda d: d.row)
        outcomes: dict[int, Outcome] = {}
        for d, problems in refused:
            entries.append(refuse(d.index, d.payload, unwrap_tables_payload(d.payload), problems))
        pushes: list[tuple[str, str]] = []
        for d, found in done:
            if spec.append_only:
                outcomes[d.index] = Outcome.APPLIED if found else Outcome.UNCHANGED
                continue
            outcome, stored, applied, merge = found
            result = outcomes[d.index] = Outcome(outcome)
            if result in AUDITED:
                version = parse_supabase_record(spec, applied) if applied else d.row
                entries.append(audit.sync_entry(fn, version, result, datetime.now(UTC), stored, changed_at=d.changed,
                                                changed_at_source=d.source, origin=origin, merge=merge))
            if Direction.TO_TABLES in spec.directions:
                if result is Outcome.SKIPPED_STALE:
                    pushes.append((d.row["id"], "UPDATE"))
                elif result is Outcome.DELETED:
                    pushes.append((d.row["id"], "DELETE"))
        supabase_db.append_audit_many(conn, entries)
        supabase_db.announce_many(conn, spec, pushes)
        if not spec.append_only:
            remember_delivered(conn, spec, [(d.row, d.edited_at) for d, _ in done])
            # the next write of a record whose Tables copy holds a refused value finds it first (never blind)
            supabase_db.forget_tables(conn, spec, sorted(set(rejected)))
        return outcomes

    if parsed or failed:
        outcomes = ctx.db.run(work)
        for d in parsed:
            if d.index in outcomes:
                results[d.index] = SyncResult(outcome=outcomes[d.index], function=fn.name, table=spec.name,
                                              id=d.row["id"], lag_ms=_lag_ms(d.changed, datetime.now(UTC)))
    return [r for r in results if r is not None]


def newest_first_rounds(items: Sequence[_Delivery], version_field: str) -> list[list[int]]:
    """The indexes of ``items`` in rounds, one delivery of a record per round, its newest (``version_field``, then
    ``edited_at``) first - the order zsync.sync_apply_many takes a record's duplicates in. Each round is one call,
    so a merge sent back to Tables is stamped (``supabase_db._stamp_back_to_tables``) before the record's next
    delivery is compared with it: stamped after the whole call, a merged field counted at the merged row's time
    and beat a later person's edit of it (``tests/test_delivery_order.py``, two edits one blind write overwrote)."""
    def newest(i: int) -> tuple[Any, ...]:
        version = items[i].row.get(version_field)
        return (items[i].row["id"], isinstance(version, datetime), version if isinstance(version, datetime) else 0,
                items[i].edited_at or datetime.min.replace(tzinfo=UTC))

    rounds: list[list[int]] = []
    taken: dict[str, int] = {}
    for i in sorted(range(len(items)), key=newest, reverse=True):
        n = taken[rid] = taken.get(rid := items[i].row["id"], -1) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(i)
    return [sorted(r) for r in rounds]


def remember_delivered(conn: psycopg.Connection, spec: TableSpec,
                       delivered: Sequence[tuple[Mapping[str, Any], datetime | None]]) -> None:
    """A delivery is Tables' copy as it was at its ``edited_at``: it moves the copy the sync knows of forward
    (:func:`supabase_db.remember_tables`; a blind *_to_tables write replaces that copy, and an edit made in
    Tables marks the record as being edited there)."""
    latest: dict[str, supabase_db.Known] = {}
    for row, edited_at in delivered:
        held = latest.get(row["id"])
        if edited_at is not None and (held is None or held.edited_at is None or edited_at > held.edited_at):
            latest[row["id"]] = supabase_db.Known(None, row, edited_at)
    supabase_db.remember_tables(conn, spec, latest)
    # (an edit stamped before the write whose answer is the known copy, but landed on it: the copy now)
    supabase_db.remember_landed_on(conn, spec, delivered)


def _payload_id(record: Any) -> str | None:
    rid = record.get("id") if isinstance(record, Mapping) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 200 else None

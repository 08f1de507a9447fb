"""The two sync operations every function performs, independent of HTTP (replay and reconcile call them
too):

* :func:`apply_from_tables` - a record a Zap sent from Zapier Tables -> Supabase (Zaps 3A, 3C, 3E, 3F);
* :func:`apply_from_supabase` - a Supabase Database Webhook payload -> Zapier Tables (Zaps 3B, 3D, 3G).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psycopg
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField

from shared.adapters import supabase_db
from shared.core import audit
from shared.core.mapping import (
    InvalidRecord,
    check_version_skew,
    coerce_id,
    normalize_timestamp,
    parse_supabase_record,
    parse_tables_record,
    to_tables_fields,
)
from shared.core.outcome import Outcome, outcome_of
from shared.core.spec import FUNCTIONS, Direction, FunctionSpec, TableSpec
from shared.platform.logs import log_event
from shared.platform.settings import Settings, TablesWriter
from shared.services import conflict

if TYPE_CHECKING:  # imported where used: a *_to_supabase function never loads the Tables client (cold start)
    from shared.adapters.catch_hook import CatchHookWriter
    from shared.adapters.zapier_tables import Record, TablesClient


class ConfigurationError(RuntimeError):
    """The deployment is missing a setting this function needs (never caused by the request)."""


class SupabaseWebhook(BaseModel):
    """What a Supabase Database Webhook POSTs (see ../shared/reference/supabase-webhooks.md)."""

    # Built on first use: only the *_to_tables functions validate webhooks (cold start of the others).
    model_config = ConfigDict(extra="ignore", populate_by_name=True, defer_build=True)

    type: Literal["INSERT", "UPDATE", "DELETE"]
    table: str
    schema_: str = PydanticField(alias="schema")
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None


@dataclass
class SyncResult:
    """What one delivery came to (internal: the handler turns it into the JSON answer)."""

    outcome: Outcome
    function: str
    table: str
    id: str | None = None
    detail: str | None = None
    lag_ms: float | None = None  # delivery lag (see shared.core.audit.sync_entry); None when the change time is unknown
    problems: list[dict[str, str]] | None = None  # why rejected (batches)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)  # SQL answers the outcome as text


EDITED_AT = "edited_at"  # top-level key of a Zap delivery: when Zapier saw the record change
_ZAPIER_ID = re.compile(r"^[0-9A-Z]{26}$")  # a Zapier Tables record id (ULID)


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
        from shared.adapters.zapier_tables import client_from_settings

        try:
            return client_from_settings(self.settings)
        except ValueError as exc:  # a required setting is missing
            raise ConfigurationError(str(exc)) from None

    @cached_property
    def hooks(self) -> CatchHookWriter:
        from shared.adapters.catch_hook import catch_hook_writer_from_settings

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
    """A Zap sends the record's fields flat; ``{"record": {...}}`` (optionally with ``edited_at``) too.
    The wrapper's ``edited_at`` then counts as the record's own (lag and version, as in the flat form)
    unless the record carries one."""
    if "record" in payload and set(payload) <= {"record", EDITED_AT}:
        record = payload["record"]
        if EDITED_AT in payload and isinstance(record, Mapping) and EDITED_AT not in record:
            return {**record, EDITED_AT: payload[EDITED_AT]}
        return record
    return payload


def _edited_at(value: Any) -> datetime | None:
    """Zapier Tables' own time of a record's last change (``edited_at``), if given and readable."""
    try:
        return normalize_timestamp(value)
    except ValueError:
        return None


def _check_edited_at(edited_at: datetime | None, now: datetime, max_skew_s: float) -> None:
    """Zapier's ``edited_at`` can become the version (a cell edit): the same future rule as ``updated_at``."""
    if edited_at is not None and (ahead := (edited_at - now).total_seconds()) > max_skew_s:
        raise InvalidRecord([{"field": EDITED_AT, "problem": f"{edited_at.isoformat()} is {ahead:.0f} s ahead of the "
                              f"clock; at most {max_skew_s:g} s allowed (ZSYNC_MAX_FUTURE_SKEW_S)"}])


def version_time(record: Any, received_at: datetime) -> datetime:
    """The time a Tables record without ``updated_at`` is versioned at: Zapier's ``edited_at`` (the time of
    its last change, the same for every redelivery of that change) when readable, else its arrival. Zapier
    stores only the fields a writer sends, so a record created without ``updated_at`` has none. (Not an
    object: the arrival; the parser then rejects it.)"""
    if not isinstance(record, Mapping):
        return received_at
    return _edited_at(record.get(EDITED_AT)) or received_at


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
    row = parse_tables_record(spec, record, received_at=version_time(record, now))
    check_version_skew(spec, row, datetime.now(UTC), ctx.settings.max_future_skew_s)
    edited_at = _edited_at(record.get("edited_at")) if spec.version else None
    _check_edited_at(edited_at, datetime.now(UTC), ctx.settings.max_future_skew_s)

    def work(conn: psycopg.Connection) -> Outcome:
        if spec.append_only:
            return Outcome.APPLIED if supabase_db.append_audit(conn, row) else Outcome.UNCHANGED
        outcome, stored, applied = supabase_db.sync_apply(conn, spec, row, edited_at)
        result = Outcome(outcome)
        version = parse_supabase_record(spec, applied) if applied else row
        if result in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
            supabase_db.append_audit(conn, audit.sync_entry(fn, version, result, datetime.now(UTC), stored,
                                                            changed_at=changed, changed_at_source=changed_at_source,
                                                            origin=origin))
        if result is Outcome.SKIPPED_STALE and Direction.TO_TABLES in spec.directions:
            # Tables sent an older version than Supabase holds: push Supabase's back so Tables converges
            # even if the webhook for the newer version was lost.
            supabase_db.announce(conn, spec, row["id"])
        if result is Outcome.DELETED and Direction.TO_TABLES in spec.directions:
            # A copy of a record deleted in Supabase is still in Tables: send the delete again.
            supabase_db.announce(conn, spec, row["id"], "DELETE")
        return result

    try:
        outcome = ctx.db.run(work)
    except RECORD_ERRORS as exc:  # a value the database refuses that the parser let through: this record's fault
        raise InvalidRecord(db_problems(exc, row)) from None
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=row["id"],
                      lag_ms=_lag_ms(changed, datetime.now(UTC)))


# A statement refused because of a value in the record (a CHECK, NOT NULL, a value out of range, the future-
# skew trigger's 22008, a validation trigger's RAISE EXCEPTION): retrying cannot help and no other record is at
# fault. Connection errors, deadlocks and serialisation failures (OperationalError) are not among them: those
# are retried as a whole.
RECORD_ERRORS: tuple[type[psycopg.Error], ...] = (psycopg.errors.IntegrityError, psycopg.errors.DataError,
                                                  psycopg.errors.RaiseException)


def _constraint_column(constraint: str, row: Mapping[str, Any]) -> str | None:
    """The column a CHECK is about, by its name: ``zsync_<column>_syncable`` (ours), ``<table>_<column>_check``
    (Postgres' default name), else the longest column name the constraint's name contains."""
    if constraint.startswith("zsync_") and constraint.endswith("_syncable"):
        return constraint.removeprefix("zsync_").removesuffix("_syncable")
    named = [c for c in row if c in constraint]
    return max(named, key=len) if named else None


def db_problems(exc: psycopg.Error, row: Mapping[str, Any]) -> list[dict[str, str]]:
    """``[{"field", "problem"}]`` for a statement the database refused because of ``row``: the column (the
    error's own, else the one its constraint names: :func:`_constraint_column`), its value and the message."""
    diag = exc.diag
    column = diag.column_name or _constraint_column(diag.constraint_name or "", row)
    value = row.get(column) if column else None
    shown = value.isoformat() if isinstance(value, datetime) else value
    what = (diag.message_primary or str(exc)).splitlines()[0][:300]
    suffix = f" (value {json.dumps(shown, default=str, ensure_ascii=False)[:200]})" if column else ""
    return [{"field": column or "record", "problem": f"refused by the database: {what}{suffix}"}]


@dataclass
class _Delivery:
    """One parsed delivery of a batch (:func:`apply_many_from_tables`)."""

    index: int
    payload: Any
    row: dict[str, Any]
    edited_at: datetime | None
    changed: datetime
    source: str


def _body(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode("utf-8", "surrogatepass")


T = TypeVar("T")


def _halves(items: list[T], row_of: Callable[[T], Mapping[str, Any]]) -> tuple[list[T], list[T]]:
    """Split a refused batch in two, keeping the versions of one id together while there are several ids."""
    ids = list(dict.fromkeys(row_of(d)["id"] for d in items))
    if len(ids) == 1:
        return items[:len(items) // 2], items[len(items) // 2:]
    first = set(ids[:len(ids) // 2])
    return [d for d in items if row_of(d)["id"] in first], [d for d in items if row_of(d)["id"] not in first]


Refused = list[dict[str, str]]  # the problems of a record the database refused


def isolate(conn: psycopg.Connection, items: list[T], apply: Callable[[psycopg.Connection, list[T]], list[Any]],
            row_of: Callable[[T], Mapping[str, Any]]) -> tuple[list[tuple[T, Any]], list[tuple[T, Refused]]]:
    """``apply`` a batch in a savepoint; when the database refuses a value of one record (a CHECK the parser
    does not mirror, the future-skew trigger, a validation trigger), split the batch in halves until the refused
    records stand alone: they are refused, every other record is applied (``log2(n)`` extra statements per
    refused record). -> ([(item, its result)], [(item, problems)])."""
    if not items:
        return [], []
    try:
        with conn.transaction():
            return list(zip(items, apply(conn, items), strict=True)), []
    except RECORD_ERRORS as exc:
        if len(items) == 1:
            return [], [(items[0], db_problems(exc, row_of(items[0])))]
    done: list[tuple[T, Any]] = []
    refused: list[tuple[T, list[dict[str, str]]]] = []
    for half in _halves(items, row_of):
        d, r = isolate(conn, half, apply, row_of)
        done += d
        refused += r
    return done, refused


def apply_many_from_tables(ctx: SyncContext, fn: FunctionSpec, records: Sequence[Mapping[str, Any]], *,
                           received_at: datetime | Sequence[datetime | None] | None = None, origin: str = "live",
                           changed_at: Sequence[tuple[datetime, str] | None] | None = None) -> list[SyncResult]:
    """:func:`apply_from_tables` for many deliveries of one table in one transaction: one multi-row
    conditional upsert (zsync.sync_apply_many), one audit insert, one push-back statement per batch.

    ``records``: the deliveries as a Zap sends them (flat, or ``{"record": ..., "edited_at": ...}``).
    ``received_at``: one arrival time for all, or one per delivery. ``changed_at``: per delivery
    ``(time, source)`` (default :func:`change_time` of the delivery). -> one result per delivery, in order,
    with the outcome, audit entry and side effects the one-record path gives it (duplicates of one id: the
    newest version is applied, the others are then compared as later deliveries).

    One bad record never holds back or discards another: an invalid delivery (the parser mirrors every CHECK;
    a version too far ahead of the clock) gets a ``rejected`` result (its problems) and a ``sync_failed`` entry
    holding the delivery itself; a value the database still refuses is found by splitting the batch in
    savepoints (:func:`isolate`) and rejected the same way; the others are applied."""
    spec = fn.table
    now = datetime.now(UTC)
    arrivals = list(received_at) if isinstance(received_at, Sequence) else [received_at] * len(records)
    if len(arrivals) != len(records) or (changed_at is not None and len(changed_at) != len(records)):
        raise ValueError("received_at / changed_at must give one value per record")
    results: list[SyncResult | None] = [None] * len(records)
    parsed: list[_Delivery] = []
    failed: list[dict[str, Any]] = []

    def refuse(i: int, payload: Any, record: Any, problems: list[dict[str, str]]) -> dict[str, Any]:
        record_id = _payload_id(record)
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
            row = parse_tables_record(spec, record, received_at=version_time(record, arrived))
            check_version_skew(spec, row, now, ctx.settings.max_future_skew_s)
            edited_at = _edited_at(record.get("edited_at")) if spec.version else None
            _check_edited_at(edited_at, now, ctx.settings.max_future_skew_s)
        except InvalidRecord as exc:
            failed.append(refuse(i, payload, record, exc.problems))
            continue
        parsed.append(_Delivery(i, payload, row, edited_at, changed, source))

    def apply(conn: psycopg.Connection, items: list[_Delivery]) -> list[Any]:
        if spec.append_only:
            return supabase_db.append_audit_each(conn, [d.row for d in items])
        return supabase_db.sync_apply_many(conn, spec, [(d.row, d.edited_at) for d in items])

    def work(conn: psycopg.Connection) -> dict[int, Outcome]:
        entries: list[dict[str, Any]] = list(failed)
        done, refused = isolate(conn, parsed, apply, lambda d: d.row)
        outcomes: dict[int, Outcome] = {}
        for d, problems in refused:
            entries.append(refuse(d.index, d.payload, unwrap_tables_payload(d.payload), problems))
        pushes: list[tuple[str, str]] = []
        for d, found in done:
            if spec.append_only:
                outcomes[d.index] = Outcome.APPLIED if found else Outcome.UNCHANGED
                continue
            outcome, stored, applied = found
            result = outcomes[d.index] = Outcome(outcome)
            if result in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
                version = parse_supabase_record(spec, applied) if applied else d.row
                entries.append(audit.sync_entry(fn, version, result, datetime.now(UTC), stored, changed_at=d.changed,
                                                changed_at_source=d.source, origin=origin))
            if Direction.TO_TABLES in spec.directions:
                if result is Outcome.SKIPPED_STALE:
                    pushes.append((d.row["id"], "UPDATE"))
                elif result is Outcome.DELETED:
                    pushes.append((d.row["id"], "DELETE"))
        supabase_db.append_audit_many(conn, entries)
        supabase_db.announce_many(conn, spec, pushes)
        return outcomes

    if parsed or failed:
        outcomes = ctx.db.run(work)
        for d in parsed:
            if d.index in outcomes:
                results[d.index] = SyncResult(outcome=outcomes[d.index], function=fn.name, table=spec.name,
                                              id=d.row["id"], lag_ms=_lag_ms(d.changed, datetime.now(UTC)))
    return [r for r in results if r is not None]


def _payload_id(record: Any) -> str | None:
    rid = record.get("id") if isinstance(record, Mapping) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 200 else None


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


def _run_recorded(ctx: SyncContext, lock: Callable[[psycopg.Connection], None],
                  work: Callable[[psycopg.Connection], tuple[Outcome, Any]],
                  record: Callable[[psycopg.Connection, Outcome, Any], None]) -> Outcome:
    """Run ``work`` (which calls Zapier Tables under the per-record lock) and ``record`` its outcome (audit,
    outbox ack) in the same transaction. The outcome is recorded exactly once whatever fails after the Tables
    write: a retried attempt reuses the outcome instead of calling Tables again (where it would now look
    "unchanged"), and if the transaction still fails, the outcome is recorded in a fresh one."""
    done: list[tuple[Outcome, Any]] = []

    def attempt(conn: psycopg.Connection) -> Outcome:
        lock(conn)
        if done:
            outcome, extra = done[0]
        else:
            outcome, extra = work(conn)
            done.append((outcome, extra))
        record(conn, outcome, extra)
        return outcome

    try:
        return ctx.db.run(attempt)
    except (supabase_db.DatabaseUnavailable, psycopg.Error):
        if not done:
            raise
        outcome, extra = done[0]
        ctx.db.run(lambda conn: record(conn, outcome, extra))
        return outcome


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
    fields = to_tables_fields(spec, row)
    captured: list[datetime | None] = [None]

    def work(conn: psycopg.Connection) -> tuple[Outcome, Any]:
        captured[0] = supabase_db.outbox_capture_time(conn, spec, row["id"], row.get(spec.version or ""))
        if ctx.settings.tables_writer is TablesWriter.CATCH_HOOK:
            ctx.hooks.send(spec.name, fields)
            return Outcome.APPLIED, None
        return _write_if_newer(ctx, conn, fn, row, fields)

    def record(conn: psycopg.Connection, outcome: Outcome, parked: Any) -> None:
        if outcome in (Outcome.APPLIED, Outcome.SKIPPED_STALE):
            supabase_db.append_audit(conn, audit.sync_entry(fn, row, outcome, datetime.now(UTC),
                                                            changed_at=captured[0], changed_at_source="outbox",
                                                            origin=origin))
        if parked is not None:
            supabase_db.append_audit(conn, parked)
        supabase_db.ack_outbox(conn, spec, row["id"], row.get(spec.version or ""), outcome.value)

    outcome = _run_recorded(ctx, lambda conn: supabase_db.lock_record(conn, spec, row["id"]), work, record)
    return SyncResult(outcome=outcome, function=fn.name, table=spec.name, id=row["id"],
                      lag_ms=_lag_ms(captured[0], datetime.now(UTC)))


def tables_version_row(ctx: SyncContext, spec: TableSpec, record: Record) -> dict[str, Any]:
    """A Tables record as it is read to compare its version (:func:`tables_row`), refused (InvalidRecord) when
    its version is further ahead of the clock than ``max_future_skew_s`` (never compared, so it cannot win)."""
    row = tables_row(spec, record)
    check_version_skew(spec, row, datetime.now(UTC), ctx.settings.max_future_skew_s)
    return row


def tables_row(spec: TableSpec, record: Record) -> dict[str, Any]:
    """A record read from the Tables API -> row, as its trigger delivery is read: an empty ``id`` cell
    reads as the record's Zapier id (see :func:`idless_record`), a record without ``updated_at`` is
    versioned at Zapier's ``edited_at``. Raises InvalidRecord."""
    data = record.data
    if is_empty_id(data.get("id")):
        data = dict(data, id=record.id)
    return parse_tables_record(spec, data, received_at=_edited_at(record.edited_at))


def is_empty_id(value: Any) -> bool:
    return value is None or value == ""


def idless_record(ctx: SyncContext, table_id: str, record_id: str) -> Record | None:
    """The Tables record whose Zapier id is ``record_id`` and whose ``id`` cell is empty, if any.

    A record created in Tables without our ``id`` reaches Supabase under its Zapier record id (the trigger
    delivers that as ``id``); the Supabase row's way back must find that same record (and write the id into
    it), not create a second one."""
    from shared.adapters.zapier_errors import TablesNotFound

    if not _ZAPIER_ID.match(record_id):
        return None
    try:
        record = ctx.tables.get(table_id, record_id)
    except TablesNotFound:
        return None
    if record.deleted_at or not is_empty_id(record.data.get("id")):
        return None
    return record


def _readable(ctx: SyncContext, spec: TableSpec, record: Record) -> dict[str, Any] | None:
    try:
        return tables_version_row(ctx, spec, record)
    except InvalidRecord:
        return None


def _remove_duplicates(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, table_id: str,
                       record_id: str) -> Record:
    """Several Tables records carry one id (a create retried after a lost response, or a hand-made copy):
    keep the one with the newest version, delete the others."""
    records = list(ctx.tables.iter_records(table_id, filters={"id": record_id}))

    def row_of(record: Record) -> dict[str, Any] | None:
        return _readable(ctx, spec, record)

    keep = records[0]
    for candidate in records[1:]:
        a, b = row_of(candidate), row_of(keep)
        if a is not None and (b is None or conflict.compare(conn, spec, a, b) > 0):
            keep = candidate
    removed = [r.id for r in records if r.id != keep.id]
    for rid in removed:
        ctx.tables.delete(table_id, rid, missing_ok=True)
    supabase_db.note_sync_trashed(conn, spec, record_id, removed)
    log_event(ctx.logger, logging.WARNING, "tables_duplicates_removed", record_id=record_id, kept=keep.id,
              removed=removed)
    return keep


def _tables_edited_at(record: Record) -> datetime | None:
    return _edited_at(getattr(record, "edited_at", None) or record.data.get("edited_at"))


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


def _write_if_newer(ctx: SyncContext, conn: psycopg.Connection, fn: FunctionSpec, row: Mapping[str, Any],
                    fields: dict[str, Any]) -> tuple[Outcome, dict[str, Any] | None]:
    """-> (outcome, a ``sync_failed`` entry to record when the Tables record was parked)."""
    spec = fn.table
    table_id = ctx.table_id(spec)
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
        ctx.tables.create(table_id, fields)
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
    current = _tables_version(ctx, conn, spec, current, edited_at, row)
    outcome = outcome_of(conflict.compare(conn, spec, row, current))
    if outcome is Outcome.UNCHANGED and idless:
        outcome = Outcome.APPLIED  # the same version: write it whole, which puts the id into the record
    if outcome is Outcome.APPLIED:
        ctx.tables.update(table_id, existing.id, fields)
    elif outcome is Outcome.SKIPPED_STALE and current is not None:
        # Tables holds a newer version than this webhook carried: make sure Supabase has it too (its own
        # Zap delivery may have been lost). Conditional, so a no-op when Supabase is already current.
        push_back(ctx, conn, spec, current)
    return outcome, None


def push_back(ctx: SyncContext, conn: psycopg.Connection, spec: TableSpec, current: dict[str, Any]) -> None:
    """Tables holds a newer version than Supabase was sending: make sure Supabase has it too (its own
    delivery may have been lost; conditional, so a no-op when Supabase is current), in a savepoint: a value
    Supabase refuses leaves Supabase as it is, with a ``sync_failed`` entry holding the Tables fields, and
    never fails the transaction it runs in (an outbox claim of the whole table)."""
    back = FUNCTIONS[spec.function_name(Direction.TO_SUPABASE)]
    try:
        with conn.transaction():
            pushed, _ = supabase_db.sync_upsert(conn, spec, current)
    except RECORD_ERRORS as exc:
        problems = db_problems(exc, current)
        log_event(ctx.logger, logging.ERROR, "push_back_refused", record_id=current.get("id"), problems=problems)
        supabase_db.append_audit(conn, audit.failed_entry(back, _body(to_tables_fields(spec, current)), problems,
                                                          datetime.now(UTC), current.get("id"), 400, keep_body=True))
        return
    if pushed == Outcome.APPLIED:
        supabase_db.append_audit(conn, audit.sync_entry(back, current, Outcome.APPLIED, datetime.now(UTC),
                                                        origin="repair"))


def _unreadable_is_older(spec: TableSpec, record: Record, edited_at: datetime | None,
                         incoming: Mapping[str, Any]) -> bool:
    """An unparseable Tables record may be overwritten only when it is provably older than ``incoming``:
    its own ``updated_at`` (and Zapier's ``edited_at``, when known) readable and before incoming's."""
    if not spec.version or incoming.get(spec.version) is None:
        return False
    try:
        ts = normalize_timestamp(record.data.get(spec.version))
    except ValueError:
        return False
    if ts is None:
        return False
    latest = max(ts, edited_at) if edited_at else ts
    return latest < incoming[spec.version]
